"""The service's REST API (FastAPI): health, jobs, retry, models and Prometheus metrics.

``create_app(store, models)`` builds the application; :class:`ApiServer` runs it with uvicorn in a thread of the
service's process. Endpoints:

- ``GET /health``: database reachable, disk free above the watermark, and each liveness hook (receiver,
  workers...) true; 200 when all are, else 503, with the details either way.
- ``GET /jobs?state=&limit=&offset=``: jobs, newest first. ``GET /jobs/{id}``: one job with its timeline, QC
  decision, error and deliveries. ``POST /jobs/{id}/retry``: a failed job again (404 unknown, 409 not failed).
- ``GET /models``: the models the service runs. ``GET /metrics``: Prometheus text exposition (format 0.0.4).

Nothing returned holds a patient attribute: jobs carry UIDs, model names, states, times and paths only.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medunet.errors import ServeError
from medunet.serve.config import ServeConfig
from medunet.serve.records import import_serve_extra
from medunet.serve.store import Counts, JobStore

if TYPE_CHECKING:
    from fastapi import FastAPI

#: Content type of the Prometheus text exposition format.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Quantiles reported for each stage's latency summary.
QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class ModelInfo:
    """A model as ``GET /models`` shows it."""

    name: str
    path: str
    device: str
    folds: tuple[int, ...] | None = None
    loaded: bool = False
    """Whether the service holds it loaded now."""
    classes: tuple[str, ...] = ()
    """Its class names, once loaded."""


def models_from_config(config: ServeConfig) -> list[ModelInfo]:
    """The configured models (not yet loaded)."""
    return [ModelInfo(name, m.path, m.device, m.folds) for name, m in config.models.items()]


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return "NaN" if math.isnan(value) else repr(float(value))


def render_metrics(counts: Counts, durations: Mapping[str, Sequence[float]]) -> str:
    """The Prometheus text exposition of the store's counts and per-stage latencies."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: Sequence[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    metric("medunet_serve_instances_received_total", "counter", "Instances received in released associations.", [("", counts.instances)])
    metric("medunet_serve_associations_total", "counter", "Released associations recorded.", [("", counts.associations)])
    metric("medunet_serve_series_received_total", "counter", "Series received.", [("", sum(counts.series.values()))])
    metric("medunet_serve_jobs_created_total", "counter", "Jobs created (one per series and model).", [("", sum(counts.jobs.values()))])
    metric("medunet_serve_series", "gauge", "Series per state.", [(f'{{state="{s}"}}', n) for s, n in counts.series.items()])
    metric("medunet_serve_jobs", "gauge", "Jobs per state (received, queued, running, sending, done, review, failed, superseded).",
           [(f'{{state="{s}"}}', n) for s, n in counts.jobs.items()])
    metric("medunet_serve_deliveries", "gauge", "Result deliveries per state (dead: dead-lettered).",
           [(f'{{state="{s}"}}', n) for s, n in counts.deliveries.items()])
    samples: list[tuple[str, float]] = []
    for stage, values in durations.items():
        samples.extend((f'{{stage="{stage}",quantile="{q}"}}', _quantile(values, q)) for q in QUANTILES)
        samples.extend([(f'_sum{{stage="{stage}"}}', float(sum(values))), (f'_count{{stage="{stage}"}}', len(values))])
    lines.extend(["# HELP medunet_serve_stage_seconds Seconds per stage of finished jobs: wait (last instance to queued), "
                  "queue, run, send, total.", "# TYPE medunet_serve_stage_seconds summary"])
    lines.extend(f"medunet_serve_stage_seconds{labels} {_number(value)}" for labels, value in samples)
    return "\n".join(lines) + "\n"


def health(store: JobStore, storage: Path | None, min_free_disk_mb: int, liveness: Mapping[str, Callable[[], bool]]) -> dict[str, Any]:
    """What ``GET /health`` reports: database, disk and each liveness hook, and ``ok`` when all are fine."""
    components: dict[str, bool] = {}
    for name, alive in liveness.items():
        try:
            components[name] = bool(alive())
        except Exception:  # noqa: BLE001 - a hook that raises reports its component down
            components[name] = False
    report: dict[str, Any] = {"database": store.ping(), "components": components}
    if storage is not None:
        free_mb = shutil.disk_usage(storage).free // (1024 * 1024) if storage.exists() else 0
        report.update(disk_free_mb=free_mb, disk_ok=free_mb >= min_free_disk_mb)
    report["ok"] = report["database"] and report.get("disk_ok", True) and all(components.values())
    return report


def create_app(store: JobStore, models: Sequence[ModelInfo] | Callable[[], Sequence[ModelInfo]], *, storage: Path | None = None,
               min_free_disk_mb: int = 0, liveness: Mapping[str, Callable[[], bool]] | None = None,
               max_page: int = 500) -> FastAPI:
    """The FastAPI application over ``store``; ``liveness`` maps a component name to a callable saying it is alive."""
    import_serve_extra("fastapi", needed_for="the medunet serve REST API")
    from fastapi import FastAPI, HTTPException, Response
    from fastapi.responses import JSONResponse

    app = FastAPI(title="medunet serve", docs_url=None, redoc_url=None)
    hooks = dict(liveness or {})

    @app.get("/health")
    def get_health() -> JSONResponse:
        report = health(store, storage, min_free_disk_mb, hooks)
        return JSONResponse(report, status_code=200 if report["ok"] else 503)

    @app.get("/jobs")
    def get_jobs(state: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        if not 1 <= limit <= max_page or offset < 0:
            raise HTTPException(422, f"limit must be 1 to {max_page} and offset >= 0")
        jobs = store.jobs(state=state, limit=limit, offset=offset)
        return {"jobs": [dataclasses.asdict(j) for j in jobs], "limit": limit, "offset": offset}

    @app.get("/jobs/{job_id}")
    def get_job(job_id: int) -> dict[str, Any]:
        detail = store.job(job_id)
        if detail is None:
            raise HTTPException(404, f"no job {job_id}")
        return dataclasses.asdict(detail)

    @app.post("/jobs/{job_id}/retry")
    def post_retry(job_id: int) -> dict[str, Any]:
        if store.job(job_id) is None:
            raise HTTPException(404, f"no job {job_id}")
        try:
            return dataclasses.asdict(store.retry(job_id))
        except ServeError as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/models")
    def get_models() -> dict[str, Any]:
        listed = models() if callable(models) else models
        return {"models": [dataclasses.asdict(m) for m in listed]}

    @app.get("/metrics")
    def get_metrics() -> Response:
        return Response(render_metrics(store.counts(), store.stage_durations()), media_type=METRICS_CONTENT_TYPE)

    return app


class ApiServer:
    """Runs an ASGI app with uvicorn in a background thread (``port=0``: a free port, read back from :attr:`port`)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        uvicorn = import_serve_extra("uvicorn", needed_for="the medunet serve REST API")
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise ServeError(f"the API cannot listen on {host}:{port} ({exc.strerror}); choose another api.port") from None
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, name="medunet-api", daemon=True)

    def start(self, timeout_s: float = 10.0) -> ApiServer:
        """Start serving; returns once uvicorn accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"the API did not start on {self.host}:{self.port} within {timeout_s:.0f} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()
