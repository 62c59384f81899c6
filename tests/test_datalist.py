"""Tests of medunet.io.datalist: parsing the MSD format, path safety, case names, the train/val split."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import pytest

from medunet.errors import DataError
from medunet.io.datalist import Case, load_datalist, split_cases, strip_image_suffix, unique_case_names

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def touch(root: Path, *relative: str) -> None:
    """The datalist only checks that files exist, so empty files stand in for volumes."""
    for rel in relative:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def write_datalist(root: Path, content: Any, name: str = "dataset.json") -> Path:
    path = root / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def msd(root: Path) -> Path:
    touch(root, "imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz", "imagesTr/liver_1.nii", "labelsTr/liver_1.nii")
    return write_datalist(
        root,
        {
            "labels": {"0": "background", "1": "liver", "2": "tumour"},
            "modality": {"0": "CT"},
            "training": [
                {"image": "imagesTr/liver_0.nii.gz", "label": "labelsTr/liver_0.nii.gz"},
                {"image": "imagesTr/liver_1.nii", "label": "labelsTr/liver_1.nii"},
            ],
        },
    )


# --- parsing -----------------------------------------------------------------------


def test_msd_format(tmp_path: Path) -> None:
    dl = load_datalist(msd(tmp_path))
    assert dl.labels == {0: "background", 1: "liver", 2: "tumour"}
    assert dl.modality == "CT"
    assert dl.root == tmp_path
    assert [c.name for c in dl.training] == ["liver_0", "liver_1"]
    first = dl.training[0]
    assert first.image == (tmp_path / "imagesTr/liver_0.nii.gz",)
    assert first.label == tmp_path / "labelsTr/liver_0.nii.gz"
    assert dl.validation == [] and dl.test == []
    assert first.as_dict() == {
        "case": "liver_0",
        "image": [str(tmp_path / "imagesTr/liver_0.nii.gz")],
        "label": str(tmp_path / "labelsTr/liver_0.nii.gz"),
    }


def test_no_labels_or_modality_is_none(tmp_path: Path) -> None:
    touch(tmp_path, "a.nii.gz", "a_seg.nii.gz")
    dl = load_datalist(write_datalist(tmp_path, {"training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}]}))
    assert dl.labels is None
    assert dl.modality is None


def test_multichannel_image_list_keeps_channel_order(tmp_path: Path) -> None:
    touch(tmp_path, "img/p1_t1.nii.gz", "img/p1_flair.nii.gz", "lab/p1.nii.gz")
    path = write_datalist(
        tmp_path,
        {
            "modality": {"0": "T1", "1": "FLAIR"},
            "training": [{"image": ["img/p1_t1.nii.gz", "img/p1_flair.nii.gz"], "label": "lab/p1.nii.gz"}],
        },
    )
    case = load_datalist(path).training[0]
    assert case.image == (tmp_path / "img/p1_t1.nii.gz", tmp_path / "img/p1_flair.nii.gz")
    assert case.name == "p1_t1"  # named after the first channel
    assert case.as_dict()["image"] == [str(p) for p in case.image]


def test_empty_image_list_refused(tmp_path: Path) -> None:
    touch(tmp_path, "l.nii.gz")
    with pytest.raises(DataError, match="empty list"):
        load_datalist(write_datalist(tmp_path, {"training": [{"image": [], "label": "l.nii.gz"}]}))


def test_test_list_as_strings_and_dicts(tmp_path: Path) -> None:
    touch(tmp_path, "imagesTs/c.nii.gz", "imagesTs/d.nii.gz")
    path = write_datalist(tmp_path, {"test": ["imagesTs/c.nii.gz", {"image": "imagesTs/d.nii.gz"}]})
    dl = load_datalist(path, need_training=False)
    assert [c.name for c in dl.test] == ["c", "d"]
    assert [c.image for c in dl.test] == [(tmp_path / "imagesTs/c.nii.gz",), (tmp_path / "imagesTs/d.nii.gz",)]
    assert all(c.label is None for c in dl.test)
    assert "label" not in dl.test[0].as_dict()


def test_validation_list(tmp_path: Path) -> None:
    touch(tmp_path, "i/a.nii.gz", "l/a.nii.gz", "i/b.nii.gz", "l/b.nii.gz")
    path = write_datalist(
        tmp_path,
        {
            "training": [{"image": "i/a.nii.gz", "label": "l/a.nii.gz"}],
            "validation": [{"image": "i/b.nii.gz", "label": "l/b.nii.gz"}],
        },
    )
    dl = load_datalist(path)
    assert [c.name for c in dl.training] == ["a"]
    assert [c.name for c in dl.validation] == ["b"]
    assert dl.validation[0].label == tmp_path / "l/b.nii.gz"


# --- errors ---------------------------------------------------------------------------


def test_missing_image_file_named(tmp_path: Path) -> None:
    touch(tmp_path, "labelsTr/a.nii.gz")
    path = write_datalist(tmp_path, {"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]})
    with pytest.raises(DataError, match="does not exist") as info:
        load_datalist(path)
    assert str(tmp_path / "imagesTr/a.nii.gz") in str(info.value)
    assert info.value.path == str(tmp_path / "imagesTr/a.nii.gz")


def test_missing_label_file_named(tmp_path: Path) -> None:
    touch(tmp_path, "imagesTr/a.nii.gz")
    path = write_datalist(tmp_path, {"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]})
    with pytest.raises(DataError) as info:
        load_datalist(path)
    assert str(tmp_path / "labelsTr/a.nii.gz") in str(info.value)
    assert '"training"[0].label' in str(info.value)


def test_training_case_without_label(tmp_path: Path) -> None:
    touch(tmp_path, "a.nii.gz")
    with pytest.raises(DataError, match='no "label"'):
        load_datalist(write_datalist(tmp_path, {"training": [{"image": "a.nii.gz"}]}))


def test_missing_datalist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        load_datalist(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(info.value)


def test_absolute_path_refused_unless_allowed(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    touch(outside, "a.nii.gz", "a_seg.nii.gz")
    root = tmp_path / "root"
    root.mkdir()
    path = write_datalist(root, {"training": [{"image": str(outside / "a.nii.gz"), "label": str(outside / "a_seg.nii.gz")}]})
    with pytest.raises(DataError, match="absolute path") as info:
        load_datalist(path)
    assert str(path) in str(info.value)
    dl = load_datalist(path, allow_outside_root=True)
    assert dl.training[0].image == (outside / "a.nii.gz",)


def test_absolute_path_refused_even_inside_root(tmp_path: Path) -> None:
    touch(tmp_path, "a.nii.gz", "a_seg.nii.gz")
    path = write_datalist(tmp_path, {"training": [{"image": str(tmp_path / "a.nii.gz"), "label": "a_seg.nii.gz"}]})
    with pytest.raises(DataError, match="absolute path"):
        load_datalist(path)


def test_home_relative_path_counts_as_absolute(tmp_path: Path) -> None:
    touch(tmp_path, "a_seg.nii.gz")
    path = write_datalist(tmp_path, {"training": [{"image": "~/a.nii.gz", "label": "a_seg.nii.gz"}]})
    with pytest.raises(DataError, match="absolute path"):
        load_datalist(path)


def test_dotdot_escape_refused_unless_allowed(tmp_path: Path) -> None:
    touch(tmp_path, "secret/a.nii.gz", "root/a_seg.nii.gz")
    path = write_datalist(tmp_path / "root", {"training": [{"image": "../secret/a.nii.gz", "label": "a_seg.nii.gz"}]})
    with pytest.raises(DataError, match="outside the datalist's folder") as info:
        load_datalist(path)
    assert "../secret/a.nii.gz" in str(info.value)
    assert load_datalist(path, allow_outside_root=True).training[0].image[0].resolve() == (tmp_path / "secret/a.nii.gz")


def test_dotdot_that_stays_inside_is_fine(tmp_path: Path) -> None:
    touch(tmp_path, "imagesTr/a.nii.gz", "labelsTr/a.nii.gz")
    path = write_datalist(tmp_path, {"training": [{"image": "labelsTr/../imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]})
    assert load_datalist(path).training[0].image[0].resolve() == (tmp_path / "imagesTr/a.nii.gz").resolve()


def test_symlink_outside_refused_unless_allowed(tmp_path: Path) -> None:
    touch(tmp_path, "secret/a.nii.gz", "root/labelsTr/a.nii.gz")
    (tmp_path / "root/imagesTr").mkdir(parents=True)
    os.symlink(tmp_path / "secret/a.nii.gz", tmp_path / "root/imagesTr/a.nii.gz")
    path = write_datalist(tmp_path / "root", {"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]})
    with pytest.raises(DataError, match="outside the datalist's folder"):
        load_datalist(path)
    assert load_datalist(path, allow_outside_root=True).training[0].name == "a"


def test_symlinked_folder_outside_refused(tmp_path: Path) -> None:
    touch(tmp_path, "secret/a.nii.gz", "root/labelsTr/a.nii.gz")
    os.symlink(tmp_path / "secret", tmp_path / "root/imagesTr")
    path = write_datalist(tmp_path / "root", {"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]})
    with pytest.raises(DataError, match="outside"):
        load_datalist(path)


def test_symlink_inside_root_accepted(tmp_path: Path) -> None:
    touch(tmp_path, "data/a.nii.gz", "labelsTr/a.nii.gz")
    (tmp_path / "imagesTr").mkdir()
    os.symlink(tmp_path / "data/a.nii.gz", tmp_path / "imagesTr/a.nii.gz")
    path = write_datalist(tmp_path, {"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]})
    assert load_datalist(path).training[0].image == (tmp_path / "imagesTr/a.nii.gz",)


@pytest.mark.parametrize("content", [{"training": []}, {"test": []}, {}])
def test_empty_training_refused(tmp_path: Path, content: dict) -> None:
    path = write_datalist(tmp_path, content)
    with pytest.raises(DataError, match='"training" list is empty') as info:
        load_datalist(path)
    assert str(path) in str(info.value)


def test_invalid_json(tmp_path: Path) -> None:
    path = write_datalist(tmp_path, '{"training": [ {"image": "a.nii.gz", }')
    with pytest.raises(DataError, match="not valid JSON") as info:
        load_datalist(path)
    assert str(path) in str(info.value)


def test_json_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="JSON object"):
        load_datalist(write_datalist(tmp_path, '["a.nii.gz"]'))


def test_training_not_a_list(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="must be a list"):
        load_datalist(write_datalist(tmp_path, {"training": {"image": "a.nii.gz"}}))


def test_entry_without_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r'"training"\[0\]'):
        load_datalist(write_datalist(tmp_path, {"training": [{"img": "a.nii.gz", "label": "b.nii.gz"}]}))


@pytest.mark.parametrize(
    "labels, phrase",
    [
        ({"0": "background", "2": "tumour"}, "without gaps"),
        ({"1": "liver", "2": "tumour"}, "without gaps"),
        ({"zero": "background"}, "class indices"),
        ([], "mapping"),
    ],
)
def test_bad_labels(tmp_path: Path, labels: Any, phrase: str) -> None:
    touch(tmp_path, "a.nii.gz", "a_seg.nii.gz")
    path = write_datalist(tmp_path, {"labels": labels, "training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}]})
    with pytest.raises(DataError, match=phrase) as info:
        load_datalist(path)
    assert str(path) in str(info.value)


def test_same_case_in_training_and_validation_refused(tmp_path: Path) -> None:
    touch(tmp_path, "i/a.nii.gz", "l/a.nii.gz", "i/b.nii.gz", "l/b.nii.gz")
    path = write_datalist(
        tmp_path,
        {
            "training": [{"image": "i/a.nii.gz", "label": "l/a.nii.gz"}, {"image": "i/b.nii.gz", "label": "l/b.nii.gz"}],
            "validation": [{"image": "i/a.nii.gz", "label": "l/a.nii.gz"}],
        },
    )
    with pytest.raises(DataError, match="twice") as info:
        load_datalist(path)
    assert "'a'" in str(info.value)


# --- case names ---------------------------------------------------------------------------


def test_strip_image_suffix() -> None:
    assert strip_image_suffix("liver_003.nii.gz") == "liver_003"
    assert strip_image_suffix("brain.v2.nii") == "brain.v2"
    assert strip_image_suffix("scan.mha") == "scan"


def test_equal_file_names_in_different_folders_do_not_collide() -> None:
    names = unique_case_names([Path("site1/ct.nii.gz"), Path("site2/ct.nii.gz"), Path("site1/mr.nii.gz")])
    assert names == ["site1_ct", "site2_ct", "mr"]


def test_equal_names_in_different_folders_via_datalist(tmp_path: Path) -> None:
    touch(tmp_path, "siteA/ct.nii.gz", "siteA/seg.nii.gz", "siteB/ct.nii.gz", "siteB/seg.nii.gz")
    path = write_datalist(
        tmp_path,
        {
            "training": [
                {"image": "siteA/ct.nii.gz", "label": "siteA/seg.nii.gz"},
                {"image": "siteB/ct.nii.gz", "label": "siteB/seg.nii.gz"},
            ]
        },
    )
    assert [c.name for c in load_datalist(path).training] == ["siteA_ct", "siteB_ct"]


def test_same_parent_name_gets_numeric_suffix() -> None:
    names = unique_case_names([Path("x/a/ct.nii.gz"), Path("y/a/ct.nii.gz")])
    assert len(set(names)) == 2
    assert names[0] == "a_ct"


def test_names_are_sanitised() -> None:
    paths = [Path("pat 01 (arterial).nii.gz"), Path("../weird/ä ö.nii.gz"), Path(".hidden.nii.gz"), Path("a;rm -rf.nii")]
    names = unique_case_names(paths)
    assert names[0] == "pat_01_arterial"
    assert names[2] == "hidden"
    for name in names:
        assert SAFE_NAME.match(name), name
        assert "/" not in name and ".." not in name
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    "paths",
    [
        ["a.nii.gz", "a.nii.gz", "a_2.nii.gz"],
        ["a b.nii.gz", "a_b.nii.gz", "a_b_2.nii.gz"],
    ],
)
def test_numeric_suffix_never_collides_with_an_existing_name(paths: list[str]) -> None:
    names = unique_case_names([Path(p) for p in paths])
    assert len(set(names)) == len(names), names


# --- split -------------------------------------------------------------------------------------


def cases(n: int) -> list[Case]:
    return [Case(name=f"case_{i:02d}", image=(Path(f"img/{i}.nii.gz"),), label=Path(f"lab/{i}.nii.gz")) for i in range(n)]


def names(items: list[Case]) -> list[str]:
    return [c.name for c in items]


def test_split_is_deterministic_and_partitions() -> None:
    all_cases = cases(20)
    train, val = split_cases(all_cases, val_fraction=0.2, seed=3)
    train2, val2 = split_cases(all_cases, val_fraction=0.2, seed=3)
    assert names(train) == names(train2) and names(val) == names(val2)
    assert len(val) == 4 and len(train) == 16
    assert sorted(names(train) + names(val)) == names(all_cases)
    assert not set(names(train)) & set(names(val))


def test_split_ignores_input_order() -> None:
    all_cases = cases(12)
    shuffled = all_cases[:]
    random.Random(5).shuffle(shuffled)
    _, val = split_cases(all_cases, val_fraction=0.25, seed=0)
    _, val_shuffled = split_cases(shuffled, val_fraction=0.25, seed=0)
    assert set(names(val)) == set(names(val_shuffled))


def test_split_differs_for_another_seed() -> None:
    all_cases = cases(20)
    vals = {frozenset(names(split_cases(all_cases, val_fraction=0.2, seed=s)[1])) for s in range(4)}
    assert len(vals) > 1
    assert set(names(split_cases(all_cases, val_fraction=0.2, seed=0)[1])) != set(
        names(split_cases(all_cases, val_fraction=0.2, seed=1)[1])
    )


@pytest.mark.parametrize("n, fraction", [(2, 0.01), (2, 0.99), (5, 0.01), (5, 0.99), (3, 0.5)])
def test_split_never_leaves_either_side_empty(n: int, fraction: float) -> None:
    train, val = split_cases(cases(n), val_fraction=fraction, seed=0)
    assert len(val) >= 1
    assert len(train) >= 1
    assert len(train) + len(val) == n


@pytest.mark.parametrize("n", [0, 1])
def test_split_needs_two_cases(n: int) -> None:
    with pytest.raises(DataError, match="at least 2"):
        split_cases(cases(n), val_fraction=0.2, seed=0)


def test_a_parsed_datalist_is_checked_again_under_other_options_without_reading_the_file(tmp_path: Path) -> None:
    """One read per run: the loose parse of `medunet train` serves the stricter checks of the later steps."""
    path = msd(tmp_path)
    loose = load_datalist(path, allow_outside_root=True, need_training=False, require_files=False)
    path.unlink()  # nothing below may read it again
    assert load_datalist(loose, allow_outside_root=True, need_training=False, require_files=False) is loose
    strict = load_datalist(loose)
    assert strict == load_datalist(loose, allow_outside_root=False) and strict.training == loose.training
    (tmp_path / "labelsTr/liver_1.nii").unlink()
    with pytest.raises(DataError, match=r'"training"\[1\].label: file does not exist'):
        load_datalist(loose)  # the same error the file would give
    assert load_datalist(loose, require_files=False).training == loose.training
