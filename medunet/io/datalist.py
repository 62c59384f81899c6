"""The datalist: which cases exist, where their files are, and how they are split.

The format is the Medical Segmentation Decathlon / MONAI one::

    {
      "labels": {"0": "background", "1": "liver"},
      "modality": {"0": "CT"},
      "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
      "validation": [...],                       # optional
      "test": ["imagesTs/c.nii.gz", ...]         # or [{"image": ...}], optionally with "label"
    }

Paths are relative to the JSON file's folder. An ``image`` may be a list of paths
(one per channel, e.g. T1 and FLAIR). Paths that are absolute or leave the folder
(``..``, symlinks) are refused unless ``allow_outside_root`` is set, so a datalist
cannot quietly pull in files from elsewhere on a hospital server.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medunet.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One case: its name, one image path per channel and (for training) a label path."""

    name: str
    image: tuple[Path, ...]
    label: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """The dictionary MONAI datasets and our transforms consume."""
        item: dict[str, Any] = {"case": self.name, "image": [str(p) for p in self.image]}
        if self.label is not None:
            item["label"] = str(self.label)
        return item


@dataclass(frozen=True)
class Datalist:
    """A parsed, checked datalist."""

    path: Path
    training: list[Case]
    validation: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)
    labels: dict[int, str] | None = None
    modality: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The decoded JSON, so a caller checking under other options (:func:`load_datalist`) does not read the file again."""
    options: tuple[bool, bool, bool] | None = field(default=None, compare=False, repr=False)
    """(allow_outside_root, need_training, require_files) it was checked under; None: built by hand."""

    @property
    def root(self) -> Path:
        """The folder paths are relative to."""
        return self.path.parent


def strip_image_suffix(name: str) -> str:
    """``"liver_003.nii.gz"`` -> ``"liver_003"``."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def unique_case_names(paths: Sequence[Path]) -> list[str]:
    """Names for output files that never collide, even for equal file names in different folders.

    Clashing names take their parent folder as a prefix (``a/ct.nii.gz`` -> ``a_ct``); any clash
    left after that gets a numeric suffix.
    """
    base = [Path(p).name if Path(p).is_dir() else strip_image_suffix(Path(p).name) for p in paths]  # a folder: a DICOM series
    names = [
        f"{Path(p).parent.name}_{b}" if base.count(b) > 1 and Path(p).parent.name else b for p, b in zip(paths, base)
    ]
    clean = [re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case" for name in names]
    taken: set[str] = set()
    result = []
    for name in clean:
        candidate, n = name, 1
        while candidate in taken or (candidate != name and candidate in clean):
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate)
        result.append(candidate)
    return result


def _resolve(
    root: Path, raw: Any, *, where: str, allow_outside_root: bool, must_exist: bool = True, folder_ok: bool = False
) -> Path:
    if not isinstance(raw, str) or not raw:
        raise DataError(f"{where} must be a file path (string), got {raw!r}", path=str(root))
    candidate = Path(raw).expanduser()
    if candidate.is_absolute() and not allow_outside_root:
        raise DataError(
            f"{where} is an absolute path ({raw}); datalist paths must be relative to the datalist's folder "
            "(or pass --allow-outside-root)",
        )
    path = candidate if candidate.is_absolute() else root / candidate
    if not allow_outside_root:
        try:
            path.resolve().relative_to(root.resolve())
        except ValueError:
            raise DataError(
                f"{where} ({raw}) points outside the datalist's folder {root}; move the data under it "
                "or pass --allow-outside-root",
            ) from None
    if must_exist and not (path.is_file() or (folder_ok and path.is_dir())):  # folder_ok: images may be DICOM series folders
        raise DataError(f"{where}: file does not exist", path=str(path))
    return path


def _parse_cases(
    entries: Any, section: str, root: Path, *, need_label: bool, allow_outside_root: bool, must_exist: bool = True
) -> list[Case]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise DataError(f'"{section}" must be a list of cases, got {type(entries).__name__}')
    parsed: list[tuple[tuple[Path, ...], Path | None]] = []
    for i, entry in enumerate(entries):
        where = f'"{section}"[{i}]'
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(f'{where} must be {{"image": ..., "label": ...}}, got {entry!r}')
        raw_images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        if not raw_images:
            raise DataError(f'{where}: "image" is an empty list')
        images = tuple(
            _resolve(root, r, where=f'{where}.image', allow_outside_root=allow_outside_root, must_exist=must_exist, folder_ok=True)
            for r in raw_images
        )
        label = None
        if need_label and "label" not in entry:
            raise DataError(f'{where} has no "label"; training and validation cases need one')
        if "label" in entry:  # optional for "test" cases; kept so `medunet evaluate --split test` can use it
            label = _resolve(
                root, entry["label"], where=f"{where}.label", allow_outside_root=allow_outside_root, must_exist=must_exist
            )
        parsed.append((images, label))
    names = unique_case_names([images[0] for images, _ in parsed])
    return [Case(name=n, image=images, label=label) for n, (images, label) in zip(names, parsed)]


def _parse_labels(raw: Any, path: Path) -> dict[int, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f'"labels" must be a mapping like {{"0": "background", "1": "liver"}}, got {raw!r}', path=str(path))
    try:
        labels = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise DataError(f'"labels" keys must be class indices ("0", "1", ...), got {list(raw)}', path=str(path)) from None
    if sorted(labels) != list(range(len(labels))):
        raise DataError(f'"labels" must number classes 0..K without gaps, got {sorted(labels)}', path=str(path))
    return labels


def _parse_modality(raw: Any) -> str | None:
    if isinstance(raw, dict) and raw:
        return str(next(iter(raw.values())))
    return str(raw) if raw else None


def read_json(path: Path, *, what: str) -> Any:
    """Parse a JSON file, or raise a DataError naming ``what`` it is (e.g. "datalist") and the problem."""
    if not path.is_file():
        raise DataError(f"{what} not found", path=str(path))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} is not valid JSON ({exc})", path=str(path)) from exc


#: What names a datalist: its JSON file, or one already parsed (a run reads and decodes the file once and passes this down).
DatalistSource = str | Path | Datalist


def datalist_file(source: DatalistSource) -> Path:
    """The JSON file of a datalist source."""
    return source.path if isinstance(source, Datalist) else Path(source)


def load_datalist(
    source: DatalistSource, *, allow_outside_root: bool = False, need_training: bool = True, require_files: bool = True
) -> Datalist:
    """Read and check a datalist JSON; every referenced file must exist (unless ``require_files`` is False,
    as for ``medunet check``, which reports every missing file instead of stopping at the first).

    ``source`` may be a :class:`Datalist` parsed before (one read of the file per run): checked under the
    same options, it is returned as is; under others, its decoded JSON is checked again (no file read),
    with the same results and errors as reading the file would give.

    Raises:
        DataError: naming the entry and file when anything is missing or malformed.
    """
    options = (allow_outside_root, need_training, require_files)
    if isinstance(source, Datalist) and source.options is not None:
        if source.options == options:
            return source
        return _checked(source.raw, source.path, options)
    path = Path(source) if not isinstance(source, Datalist) else source.path
    return _checked(read_json(path, what="datalist"), path, options)


def _checked(raw: Any, path: Path, options: tuple[bool, bool, bool]) -> Datalist:
    """The datalist of the decoded JSON ``raw`` of ``path``, checked under ``options`` (see :func:`load_datalist`)."""
    allow_outside_root, need_training, require_files = options
    if not isinstance(raw, dict):
        raise DataError("datalist must be a JSON object with a \"training\" list", path=str(path))
    root = path.parent
    try:
        outside, exist = allow_outside_root, require_files
        training = _parse_cases(raw.get("training"), "training", root, need_label=True, allow_outside_root=outside, must_exist=exist)
        validation = _parse_cases(
            raw.get("validation"), "validation", root, need_label=True, allow_outside_root=outside, must_exist=exist
        )
        test = _parse_cases(raw.get("test"), "test", root, need_label=False, allow_outside_root=outside, must_exist=exist)
    except DataError as exc:
        if exc.path is None:
            raise DataError(exc.problem, case=exc.case, path=str(path)) from exc
        raise
    if need_training and not training:
        raise DataError('the "training" list is empty; add cases as {"image": ..., "label": ...}', path=str(path))
    names = [c.name for c in training + validation]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"case names appear twice across training and validation: {dup}", path=str(path))
    return Datalist(
        path=path,
        training=training,
        validation=validation,
        test=test,
        labels=_parse_labels(raw.get("labels"), path),
        modality=_parse_modality(raw.get("modality")),
        raw=raw,
        options=options,
    )


def split_cases(cases: Sequence[Case], *, val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split: the same cases and seed always give the same split."""
    if len(cases) < 2:
        raise DataError(
            f"need at least 2 training cases to hold some out for validation, got {len(cases)}; "
            'add cases or a "validation" list to the datalist'
        )
    order = sorted(cases, key=lambda c: c.name)
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    val_names = {c.name for c in order[:n_val]}
    return [c for c in cases if c.name not in val_names], [c for c in cases if c.name in val_names]
