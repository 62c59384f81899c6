"""The job store of ``medunet serve`` on real databases: a SQLite file, and a real PostgreSQL server started here.

Every test takes the time as an argument (a fake clock), so leases, stability and back-off are exact.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_support import database_url, instances, postgres_missing, postgres_server

from medunet.errors import ServeError
from medunet.serve.config import RetryConfig
from medunet.serve.records import DeliveryItem
from medunet.serve.store import SCHEMA_VERSION, JobStore

SERIES = "1.2.3.4"
PG_SKIP = postgres_missing()


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    if PG_SKIP:
        pytest.skip(PG_SKIP)
    with postgres_server() as admin_url:
        yield admin_url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    admin_url = request.getfixturevalue("postgres")
    return database_url(admin_url, f"t{abs(hash(request.node.name)) % 10**8}")


@pytest.fixture
def store(url: str) -> Iterator[JobStore]:
    opened = JobStore.connect(url, max_job_attempts=2, max_delivery_attempts=3)
    yield opened
    opened.close()


def received(store: JobStore, series: str = SERIES, count: int = 4, *, at: float = 100.0, association: str = "a1", start: int = 0) -> None:
    store.record_association(association, "CT_SCANNER", "10.0.0.7", instances(series, count, start=start), now=at)


def queued_job(store: JobStore, model: str = "liver", *, at: float = 100.0) -> int:
    received(store, at=at)
    [facts] = store.complete_series(10, now=at + 10)
    [job] = store.enqueue(facts.series_instance_uid, [model], route="abdomen", now=at + 11)
    return job.id


def test_a_series_goes_from_received_to_done(store: JobStore) -> None:
    received(store, at=100.0)
    assert store.complete_series(10, now=109.9) == []  # not silent long enough
    [facts] = store.complete_series(10, now=110.0)
    assert (facts.slices, facts.spacing_mm, facts.modality, facts.body_part_examined) == (4, 2.5, "CT", "ABDOMEN")
    assert store.series_state(SERIES) == ("complete", None)
    assert store.complete_series(10, now=111.0) == [facts]  # still awaiting routing (a crash here loses nothing)
    [job] = store.enqueue(SERIES, ["liver"], route="abdomen", now=111.0)
    assert store.enqueue(SERIES, ["liver"], now=111.5) == []  # routed once only
    assert (job.state, job.received_at, job.queued_at) == ("queued", 100.0, 111.0)
    assert store.claim("w1", ["spleen"], 60, now=112.0) is None  # only jobs of the worker's models
    running = store.claim("w1", ["liver"], 60, now=112.0)
    assert running is not None and (running.id, running.state, running.attempts, running.lease_expires_at) == (job.id, "running", 1, 172.0)
    assert store.claim("w2", None, 60, now=112.0) is None
    assert store.heartbeat(job.id, "w1", 60, now=150.0) and not store.heartbeat(job.id, "w2", 60, now=150.0)
    assert store.finish(job.id, "accept", "/results/1", [DeliveryItem("pacs", "9.1", "/results/1/seg.dcm"),
                                                          DeliveryItem("pacs", "9.2", "/results/1/rtstruct.dcm")], worker="w1", now=160.0)
    due = store.due_deliveries(worker="s1", lease_seconds=30, now=161.0)
    assert [d.item for d in due] == ["9.1", "9.2"]
    assert store.due_deliveries(worker="s2", now=162.0) == []  # leased to s1
    store.delivery_sent(due[0].id, now=163.0)
    assert store.job(job.id).job.state == "sending"  # type: ignore[union-attr]
    store.delivery_sent(due[1].id, now=164.0)
    detail = store.job(job.id)
    assert detail is not None and detail.job.state == "done" and detail.job.finished_at == 164.0
    assert [e.event for e in detail.events] == ["queued", "running", "sending", "sent", "sent", "done"]
    assert {d.state for d in detail.deliveries} == {"sent"}
    assert store.stage_durations() == {"wait": [11.0], "queue": [1.0], "run": [48.0], "send": [4.0], "total": [64.0]}
    counts = store.counts()
    assert counts.jobs["done"] == 1 and counts.jobs["queued"] == 0 and counts.instances == 4 and counts.associations == 1
    assert counts.deliveries == {"pending": 0, "sent": 2, "dead": 0} and counts.series["queued"] == 1


def test_an_association_is_recorded_once_and_an_unrouted_series_is_skipped(store: JobStore) -> None:
    received(store, count=3)
    assert store.record_association("a1", "CT_SCANNER", "10.0.0.7", instances(SERIES, 3, start=3), now=101.0) == ()
    [facts] = store.complete_series(10, now=120.0)
    assert facts.slices == 3
    assert store.skip(SERIES, "no route matches modality CT", now=121.0)
    assert not store.skip(SERIES, "again", now=122.0)
    assert store.series_state(SERIES) == ("skipped", "no route matches modality CT")
    assert store.complete_series(10, now=200.0) == [] and store.jobs() == []


def test_late_instances_reopen_the_series_and_supersede_its_waiting_jobs(store: JobStore) -> None:
    first = queued_job(store, "liver")
    running = store.claim("w1", None, 60, now=115.0)
    assert running is not None and running.id == first
    received(store, count=2, start=4, association="a2", at=130.0)  # two more slices arrive late
    assert store.series_state(SERIES) == ("receiving", None)
    old = store.job(first)
    assert old is not None and old.job.state == "superseded" and old.events[-1].event == "superseded"
    assert not store.finish(first, "accept", "/r", [], worker="w1", now=135.0)  # the worker's result is discarded
    assert not store.heartbeat(first, "w1", 60, now=135.0)
    assert store.complete_series(10, now=139.0) == []
    [facts] = store.complete_series(10, now=140.0)
    assert facts.slices == 6
    [new] = store.enqueue(SERIES, ["liver"], now=141.0)
    assert new.id != first and new.received_at == 130.0


def test_a_killed_workers_job_is_requeued_then_failed_after_max_attempts(store: JobStore) -> None:
    job_id = queued_job(store)
    assert store.claim("w1", None, 60, now=120.0) is not None  # then w1 is killed: no heartbeat, no finish
    assert store.requeue_expired(now=179.0) == []
    assert store.requeue_expired(now=181.0) == [job_id]
    detail = store.job(job_id)
    assert detail is not None and (detail.job.state, detail.job.attempts, detail.job.worker) == ("queued", 1, None)
    again = store.claim("w2", None, 60, now=182.0)
    assert again is not None and again.attempts == 2
    assert not store.finish(job_id, "accept", "/r", [], worker="w1", now=183.0)  # the lost worker came back too late
    assert store.requeue_expired(now=300.0) == [job_id]  # w2 lost as well: max_job_attempts=2
    failed = store.job(job_id)
    assert failed is not None and failed.job.state == "failed" and "lost 2 times" in (failed.job.error or "")
    assert store.retry(job_id, now=301.0).state == "queued"
    assert store.claim("w3", None, 60, now=302.0).attempts == 1  # type: ignore[union-attr]


def test_failed_sends_back_off_then_dead_letter_and_retry_resends(store: JobStore) -> None:
    retry = RetryConfig(max_attempts=3, first_delay_s=10, max_delay_s=15)
    assert [retry.delay(n) for n in (1, 2, 3)] == [10.0, 15.0, 15.0]
    job_id = queued_job(store)
    store.claim("w1", None, 60, now=120.0)
    store.finish(job_id, "accept", "/r", [DeliveryItem("pacs", "9.1", "/r/seg.dcm")], now=121.0)
    now = 121.0
    states = []
    for attempt in (1, 2, 3):
        [delivery] = store.due_deliveries(worker="s1", now=now)
        states.append(store.delivery_failed(delivery.id, "association rejected", now + retry.delay(attempt), now=now))
        assert store.due_deliveries(worker="s1", now=now + retry.delay(attempt) - 1) == []  # waits for the back-off
        now += retry.delay(attempt)
    assert states == ["pending", "pending", "dead"]
    detail = store.job(job_id)
    assert detail is not None and detail.job.state == "failed" and "dead-lettered" in (detail.job.error or "")
    assert detail.deliveries[0].state == "dead" and detail.deliveries[0].last_error == "association rejected"
    assert store.counts().deliveries["dead"] == 1
    assert store.retry(job_id, now=now).state == "sending"
    [delivery] = store.due_deliveries(worker="s1", now=now)
    store.delivery_sent(delivery.id, now=now + 1)
    assert store.job(job_id).job.state == "done"  # type: ignore[union-attr]
    with pytest.raises(ServeError, match="only a failed job"):
        store.retry(job_id)
    with pytest.raises(ServeError, match="no job 999"):
        store.retry(999)


def test_a_result_is_never_sent_twice_to_a_destination(store: JobStore) -> None:
    first = queued_job(store)
    store.claim("w1", None, 60, now=120.0)
    store.finish(first, "accept", "/r1", [DeliveryItem("pacs", "9.1", "/r1/seg.dcm")], now=121.0)
    [delivery] = store.due_deliveries(worker="s1", now=122.0)
    store.delivery_sent(delivery.id, now=123.0)
    store.delivery_sent(delivery.id, now=124.0)  # a repeated acknowledgement changes nothing
    received(store, count=1, start=0, association="a2", at=200.0)  # the same slice sent again: the series is redone
    store.complete_series(10, now=210.0)
    [second] = store.enqueue(SERIES, ["liver"], now=211.0)
    store.claim("w1", None, 60, now=212.0)
    store.finish(second.id, "accept", "/r2", [DeliveryItem("pacs", "9.1", "/r2/seg.dcm"), DeliveryItem("tps", "9.1", "/r2/seg.dcm")], now=213.0)
    [due] = store.due_deliveries(worker="s1", now=214.0)
    assert due.destination == "tps"  # the PACS already holds 9.1
    store.delivery_sent(due.id, now=215.0)
    assert store.job(second.id).job.state == "done"  # type: ignore[union-attr]
    assert store.counts().deliveries["sent"] == 2


def test_qc_review_is_held_or_sent_and_ends_in_review(store: JobStore) -> None:
    job_id = queued_job(store)
    store.claim("w1", None, 60, now=120.0)
    assert store.finish(job_id, "review", "/r", [], now=121.0)  # held: nothing to send
    detail = store.job(job_id)
    assert detail is not None and detail.job.state == "review" and detail.job.qc_decision == "review"


def test_a_failed_inference_is_failed_and_can_be_retried(store: JobStore) -> None:
    job_id = queued_job(store)
    store.claim("w1", None, 60, now=120.0)
    assert not store.fail(job_id, "CUDA out of memory", worker="w2", now=121.0)
    assert store.fail(job_id, "CUDA out of memory", worker="w1", now=121.0)
    assert [j.id for j in store.jobs(state="failed")] == [job_id] and store.jobs(state="queued") == []
    assert store.retry(job_id, now=130.0).state == "queued"
    assert [e.event for e in store.job(job_id).events][-2:] == ["failed", "retry"]  # type: ignore[union-attr]


def test_jobs_are_listed_newest_first_in_pages(store: JobStore) -> None:
    for n in range(5):
        received(store, f"1.9.{n}", 2, association=f"a{n}")
    for facts in store.complete_series(10, now=200.0):
        store.enqueue(facts.series_instance_uid, ["liver"], now=201.0)
    ids = [j.id for j in store.jobs(limit=50)]
    assert ids == sorted(ids, reverse=True) and len(ids) == 5
    assert [j.id for j in store.jobs(limit=2, offset=1)] == ids[1:3]


def test_the_store_survives_reconnecting_and_refuses_a_newer_schema(url: str) -> None:
    store = JobStore.connect(url)
    job_id = queued_job(store)
    store.close()
    again = JobStore.connect(url)
    assert again.job(job_id) is not None and again.backend in ("sqlite", "postgresql")
    again.close()
    if url.startswith("sqlite"):
        with sqlite3.connect(url[len("sqlite:///"):]) as connection:
            connection.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
        with pytest.raises(ServeError, match="newer than this medunet"):
            JobStore.connect(url)


def test_a_missing_driver_or_a_bad_url_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "psycopg", None)
    with pytest.raises(ServeError, match=r"pip install 'medunet\[serve\]'"):
        JobStore.connect("postgresql://nobody@/db")
    with pytest.raises(ServeError, match="must start with"):
        JobStore.connect("mysql://x")


def _claim_until_empty(url: str, worker: str, models: list[str] | None) -> list[int]:
    """A worker process: claim and finish jobs until none is left; the ids it got."""
    store = JobStore.connect(url)
    got = []
    while (job := store.claim(worker, models, 60)) is not None:
        got.append(job.id)
        assert store.finish(job.id, "accept", f"/r/{job.id}", [], worker=worker)
    store.close()
    return got


def test_two_worker_processes_claim_every_job_exactly_once(store: JobStore, url: str) -> None:
    total = 60
    for n in range(total // 2):
        received(store, f"1.8.{n}", 1, association=f"a{n}")
    for facts in store.complete_series(10, now=200.0):
        store.enqueue(facts.series_instance_uid, ["liver", "spleen"], now=201.0)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_claim_until_empty, [(url, "w1", None), (url, "w2", ["liver", "spleen"])])
    claimed = [job_id for ids in results for job_id in ids]
    assert sorted(claimed) == sorted(j.id for j in store.jobs(limit=total)) and len(claimed) == total
    assert store.counts().jobs["done"] == total
