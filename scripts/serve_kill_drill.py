"""Kill drill of ``medunet serve``: a new CT series per round, ``kill -9`` after receive / while running / while sending, restart.

    python scripts/serve_kill_drill.py --model runs/liver --kills 20

Needs dcmtk (storescu) and Orthanc (the destination); the model must take 48x48x32 CT phantoms (the test suite's
shared model does). Prints the moments hit, and checks every series ended done exactly once with one SEG in Orthanc.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from orthanc import Orthanc, free_port  # noqa: E402
from serve_support import db_rows, kill_drill  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--kills", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="medunet-kill-drill-"))
    (root / "orthanc").mkdir()
    pacs = Orthanc(root / "orthanc", dicom_aet="PACS")
    try:
        result = kill_drill(args.model.resolve(), root, pacs.dicom_port, args.kills, free_port=free_port)
        storage = Path(str(result["storage"]))
        problems = []
        for study, series in result["series"]:  # type: ignore[attr-defined]
            states = [s for (s,) in db_rows(storage, f"SELECT state FROM jobs WHERE series_uid = '{series}'")]
            segs = len(pacs.seg_files(study))
            if states.count("done") != 1 or segs != 1:
                problems.append(f"series {series}: jobs {states}, {segs} SEG(s) in Orthanc")
        partial = sorted(p.name for p in (storage / "results").glob("*.partial"))
        result.update(problems=problems, partial_left=partial)
        print(json.dumps({k: v for k, v in result.items() if k != "series"}, indent=2))
        return 0 if result["all_done"] and not problems and not partial else 1
    finally:
        pacs.stop()


if __name__ == "__main__":
    raise SystemExit(main())
