"""Long fuzz run of medunet's NIfTI and DICOM readers (the in-suite harness, for minutes or hours).

    python scripts/fuzz.py --minutes 60 --out fuzz-run

Runs the seeded mutators of ``tests/fuzzing.py`` case after case (NIfTI and DICOM in turn, every
``--segmenter-every``-th case also through a tiny untrained ``Segmenter``) in chunks, each chunk in a
fresh worker process, so a crash, a leak or a fix made while it runs only affects its own chunk.
Every failing input is saved under ``OUT/failures/<kind>-<seed>/`` with ``failure.json`` (entry point,
error, traceback, recipe). The figures (cases tried per kind, failures, time) are written to
``OUT/summary.json`` after every chunk. ``--replay OUT`` runs every input a run found again, through
every entry point, with the code as it is now (after fixes), and lists those that still fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Cases per worker chunk, per kind (DICOM cases take about 5x as long as NIfTI ones).
CHUNK = {"nifti": 500, "dicom": 100}


def worker(kind: str, start: int, count: int, out: Path, segmenter_every: int, seconds: float) -> None:
    """Run seeds start..start+count-1 of one kind; print one JSON line per failure, then one with totals."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fuzzing
    import torch

    torch.set_num_threads(1)
    segmenter = fuzzing.tiny_segmenter() if segmenter_every else None
    tried = 0
    for seed in range(start, start + count):
        with tempfile.TemporaryDirectory(prefix="medunet-fuzz-") as tmp:
            use = segmenter if segmenter_every and seed % segmenter_every == 0 else None
            failures, recipe = fuzzing.run_case(kind, seed, Path(tmp), segmenter=use, seconds=seconds)
            tried += 1
            if failures:
                saved = out / "failures" / f"{kind}-{seed}"
                shutil.rmtree(saved, ignore_errors=True)
                fresh = Path(tmp) / "fresh"  # the input as made, before any entry point wrote next to it
                fresh.mkdir()
                fuzzing.MAKERS[kind](seed, fresh)
                shutil.copytree(fresh, saved)
                records = [f.__dict__ for f in failures]
                (saved / "failure.json").write_text(json.dumps(records, indent=2))
                for record in records:
                    print(json.dumps({"failure": record}), flush=True)
        print(json.dumps({"tried": tried}), flush=True)  # after each case: a crash loses no count


def run(minutes: float, out: Path, seed_start: int, segmenter_every: int, seconds: float) -> dict:
    """Alternate NIfTI and DICOM chunks until ``minutes`` have passed; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + minutes * 60
    started = time.time()
    tried: Counter[str] = Counter()
    failures: list[dict] = []
    next_seed = {"nifti": seed_start, "dicom": seed_start}
    crashed: list[str] = []
    log = (out / "fuzz.log").open("a")
    while time.monotonic() < deadline:
        for kind in ("nifti", "dicom"):
            if time.monotonic() >= deadline:
                break
            start, count = next_seed[kind], CHUNK[kind]
            command = [
                sys.executable, __file__, "--worker", kind, str(start), str(count), "--out", str(out),
                "--segmenter-every", str(segmenter_every), "--case-seconds", str(seconds),
            ]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
            done = 0
            for line in proc.stdout.splitlines():
                record = json.loads(line) if line.startswith("{") else {}
                if "failure" in record:
                    record["failure"]["found_at_s"] = round(time.time() - started, 1)
                    failures.append(record["failure"])
                    log.write(f"{kind} seed {record['failure']['seed']} [{record['failure']['entry']}] {record['failure']['error']}\n")
                done = record.get("tried", done)
            if proc.returncode != 0:
                crashed.append(f"{kind} seeds {start}..{start + count - 1}: exit {proc.returncode}: {proc.stderr[-500:]}")
                log.write(crashed[-1] + "\n")
            log.flush()
            tried[kind] += done
            next_seed[kind] += count
            summary = {
                "minutes": round((time.time() - started) / 60, 2),
                "tried": dict(tried),
                "seeds": {k: [seed_start, v - 1] for k, v in next_seed.items()},
                "failures": len(failures),
                "failing_inputs": sorted({f"{f['kind']}-{f['seed']}" for f in failures}),
                "by_error": Counter(f["error"].split(":")[0] for f in failures).most_common(),
                "crashed_chunks": crashed,
            }
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            (out / "failures.json").write_text(json.dumps(failures, indent=2))
    return summary


def replay(out: Path, seconds: float) -> int:
    """Re-run each failing input recorded in ``out/failures.json``; print and count those that still fail."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fuzzing

    cases = sorted({(f["kind"], f["seed"]) for f in json.loads((out / "failures.json").read_text())})
    segmenter = fuzzing.tiny_segmenter()
    still = 0
    for kind, seed in cases:
        with tempfile.TemporaryDirectory(prefix="medunet-fuzz-") as tmp:
            failures, recipe = fuzzing.run_case(kind, seed, Path(tmp), segmenter=segmenter, seconds=seconds)
        still += bool(failures)
        print(f"{'FAIL' if failures else 'ok  '} {recipe}", *(f.line() for f in failures), sep="\n    ")
    print(f"{len(cases)} input(s) replayed, {still} still failing")
    return still


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="how long to run")
    parser.add_argument("--out", type=Path, default=Path("fuzz-run"), help="folder for failing inputs and the summary")
    parser.add_argument("--seed-start", type=int, default=100_000, help="first seed (the test suite uses seeds below 1000)")
    parser.add_argument("--segmenter-every", type=int, default=10, help="every n-th case also goes through a Segmenter (0: never)")
    parser.add_argument("--case-seconds", type=float, default=20.0, help="time limit per entry point and case")
    parser.add_argument("--replay", type=Path, help="re-run the failing inputs a run saved in this folder, then exit")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "START", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, start, count = args.worker
        worker(kind, int(start), int(count), args.out, args.segmenter_every, args.case_seconds)
        return
    if args.replay:
        sys.exit(1 if replay(args.replay, args.case_seconds) else 0)
    summary = run(args.minutes, args.out, args.seed_start, args.segmenter_every, args.case_seconds)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
