"""The ``medunet serve`` config (strict YAML, cross references) and its routing rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from medunet.errors import ConfigError
from medunet.serve.config import DeliveryConfig, ServeConfig, load_serve_config, serve_config_from_dict
from medunet.serve.routing import SeriesFacts, route, skip_reason, slice_spacing

EXAMPLE: dict[str, Any] = {
    "node": {"ae_title": "MEDUNET", "port": 11112, "storage": "/var/lib/medunet", "stable_seconds": 5,
             "allowed_callers": [{"ae_title": "CT1", "ip": "10.1.2.0/24"}, {"ae_title": "PACS"}]},
    "models": {"liver": {"path": "/models/liver", "device": "cuda:0"}, "lung": {"path": "/models/lung", "folds": [0, 1]}},
    "routes": [
        {"name": "thin-abdomen", "match": {"modality": ["CT"], "body_part": ["ABDOMEN"], "max_spacing_mm": 3.0}, "models": ["liver"]},
        {"name": "chest", "match": {"modality": ["ct"], "series_description": "lung|thorax", "min_slices": 50}, "models": ["lung"]},
    ],
    "destinations": {"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "pacs.local", "port": 104, "formats": ["dicom-seg", "rtstruct"]},
                     "review": {"kind": "folder", "path": "/review", "formats": ["nifti", "qc"]},
                     "web": {"kind": "stowrs", "url": "https://pacs/dicom-web"}},
    "delivery": {"send_to": ["pacs", "web"], "review_to": ["review"]},
    "retry": {"max_attempts": 4, "first_delay_s": 5, "max_delay_s": 60},
    "workers": {"jobs_per_model": 2, "lease_seconds": 120},
}


def with_change(section: str, value: Any) -> dict[str, Any]:
    values = {**EXAMPLE, section: value}
    return values


def test_the_example_loads_with_its_defaults(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(EXAMPLE))
    config = load_serve_config(path)
    assert config.node.stable_seconds == 5.0 and config.models["lung"].folds == (0, 1)
    assert config.database_url == "sqlite:////var/lib/medunet/jobs.sqlite"
    assert config.audit_path == Path("/var/lib/medunet/audit.jsonl")
    assert config.routes[1].match.modality == ("ct",) and config.api.port == 8080
    assert config.node.allows("CT1", "10.1.2.99") and not config.node.allows("CT1", "10.1.3.1")
    assert config.node.allows("PACS", "192.168.0.1") and not config.node.allows("OTHER", "10.1.2.3")
    assert ServeConfig().node.allows("ANYONE", "1.2.3.4")  # an empty allow-list accepts any caller
    assert config.delivery.destinations("accept") == ("pacs", "web") and config.delivery.destinations("review") == ("review",)
    assert DeliveryConfig(("pacs",), ("review",), hold_review=False).destinations("review") == ("pacs", "review")


@pytest.mark.parametrize(("section", "value", "message"), [
    ("node", {"stabel_seconds": 5}, r"unknown config key 'node.stabel_seconds'; did you mean 'stable_seconds'"),
    ("node", {"port": "eleven"}, r"node.port must be an integer"),
    ("node", {"allowed_callers": [{"ae_title": "CT1", "ip": "10.1.2.300/24"}]}, r"ip of 'CT1' must be an address or a CIDR"),
    ("routes", [{"name": "x", "match": {"modality": ["CT"]}, "models": ["livr"]}], r"routes\[0\].models names 'livr'.*did you mean 'liver'"),
    ("routes", [{"name": "x", "match": {"series_description": "(unclosed"}, "models": ["liver"]}], r"not a valid regular expression"),
    ("routes", [{"name": "x", "match": {"min_slices": 9, "max_slices": 3}, "models": ["liver"]}], r"min_slices \(9\) is above max_slices"),
    ("routes", [{"name": "x", "models": ["liver"]}, {"name": "x", "models": ["lung"]}], r"routes\[1\].name must be set and unique"),
    ("destinations", {"pacs": {"kind": "dicom", "ae_title": "PACS"}}, r"destinations.pacs: kind dicom needs host, port"),
    ("destinations", {"pacs": {"kind": "smtp"}}, r"destinations.pacs.kind must be one of"),
    ("destinations", {"pacs": {"kind": "dicom", "ae_title": "P", "host": "h", "port": 1, "formats": ["nifti"]}}, r"can only go to a folder"),
    ("delivery", {"send_to": ["archive"]}, r"delivery.send_to names 'archive', which is not in destinations"),
    ("retry", {"first_delay_s": 100, "max_delay_s": 10}, r"first_delay_s <= max_delay_s"),
    ("database", {"url": "mysql://db"}, r"database.url must start with sqlite:/// or postgresql://"),
])
def test_a_bad_value_names_its_field(tmp_path: Path, section: str, value: Any, message: str) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(with_change(section, value)))
    with pytest.raises(ConfigError, match=message) as caught:
        load_serve_config(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_serve_config(tmp_path / "nope.yaml")


def facts(modality: str = "CT", body_part: str = "ABDOMEN", description: str = "venous", slices: int = 120,
          spacing: float | None = 2.5) -> SeriesFacts:
    return SeriesFacts("1.2", "1.2.3", modality, body_part, description, slices, spacing)


def test_the_first_matching_rule_wins() -> None:
    routes = serve_config_from_dict(EXAMPLE).routes
    assert route(facts(), routes).name == "thin-abdomen"  # type: ignore[union-attr]
    assert route(facts(body_part="abdomen", description="LUNG"), routes).name == "thin-abdomen"  # type: ignore[union-attr]
    assert route(facts(body_part="CHEST", description="Thorax 1mm"), routes).name == "chest"  # type: ignore[union-attr]
    assert route(facts(body_part="CHEST", description="Thorax", slices=20), routes) is None  # too few slices
    assert route(facts(spacing=5.0), routes) is None  # too thick for the abdomen rule, not a chest series
    assert route(facts(spacing=None), routes) is None  # a spacing limit never matches an unknown spacing
    assert route(facts(modality="MR"), routes) is None
    assert "modality MR" in skip_reason(facts(modality="MR")) and "2.50 mm" in skip_reason(facts())


def test_slice_spacing_from_positions_or_thickness() -> None:
    assert slice_spacing([0.0, 5.0, 2.5, 7.5, 7.5]) == 2.5  # sorted, duplicates ignored
    assert slice_spacing([None, None], [3.0, 3.0]) == 3.0
    assert slice_spacing([], []) is None
