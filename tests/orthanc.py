"""A throw-away Orthanc on loopback for tests (Debian packages orthanc and orthanc-dicomweb), shared by the PACS and serve tests."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

USER, PASSWORD = "medunet-test", "pw-CANARY-7f3a"  # the password must never show up in any output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dicomweb_plugin() -> Path | None:
    """The Orthanc DICOMweb plugin from the Debian package orthanc-dicomweb, wherever dpkg put it."""
    if shutil.which("dpkg") is not None:
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=10).stdout
        found = [Path(line) for line in listed.splitlines() if Path(line).name.startswith("libOrthancDicomWeb.so")]
        if found:
            return sorted(found, key=lambda p: len(p.name))[0]
    fallback = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    return fallback if fallback.exists() else None


ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
PLUGIN = dicomweb_plugin()
needs_orthanc = pytest.mark.skipif(
    ORTHANC is None or PLUGIN is None,
    reason="Orthanc with its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb; .ci/run installs them)",
)


class Orthanc:
    """A throw-away Orthanc on 127.0.0.1 with a temporary storage folder and basic-auth login."""

    def __init__(self, folder: Path, *, dicom_aet: str | None = None) -> None:
        """Start Orthanc in ``folder``; with ``dicom_aet`` its DICOM server listens too (on :attr:`dicom_port`, any calling AE may store)."""
        self.folder = folder
        self.http = requests.Session()
        self.http.trust_env = False  # straight to loopback, whatever proxy the environment names
        self.http.auth = (USER, PASSWORD)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.base}/dicom-web"
        self.dicom_port = free_port()
        config = {
            "Name": "medunet-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.port,
            "DicomPort": self.dicom_port,
            "DicomServerEnabled": dicom_aet is not None,
            "DicomAet": dicom_aet or "ORTHANC",
            "DicomCheckCalledAet": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "SaveJobs": False,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = folder / "orthanc.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([str(ORTHANC), str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.ConnectionError):
                if self.http.get(f"{self.base}/system", timeout=2).ok:
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"Orthanc did not start; its log ends with:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def rest(self, path: str) -> object:
        answer = self.http.get(f"{self.base}{path}", timeout=10)
        answer.raise_for_status()
        return answer.json() if "json" in answer.headers.get("Content-Type", "") else answer.content

    def upload(self, paths: list[Path]) -> None:
        for path in paths:
            self.http.post(f"{self.base}/instances", data=path.read_bytes(), timeout=10).raise_for_status()

    def instances(self) -> list[str]:
        return list(self.rest("/instances"))  # type: ignore[arg-type]

    def seg_files(self, study_uid: str) -> list[bytes]:
        """Every SEG instance stored under ``study_uid``, fetched through Orthanc's own REST API (not DICOMweb)."""
        found = []
        for series in self.rest("/series?expand"):  # type: ignore[union-attr]
            if series["MainDicomTags"].get("Modality") != "SEG":
                continue
            study = self.rest(f"/studies/{series['ParentStudy']}")
            if study["MainDicomTags"]["StudyInstanceUID"] == study_uid:  # type: ignore[index]
                found += [self.rest(f"/instances/{i}/file") for i in series["Instances"]]
        return found  # type: ignore[return-value]
