"""Orthanc, the peer Hilum's benchmarks compare against: Debian's ``orthanc`` package (and
``orthanc-dicomweb`` for DICOMweb), started with its defaults on free loopback ports and with
``TCP_NODELAY=1`` in its environment.

Debian's Orthanc links Debian's DCMTK, which leaves Nagle's algorithm on unless ``TCP_NODELAY``
is set: every C-STORE response then waits ~40 ms for the peer's delayed ACK and Orthanc runs at
a fifth of its rate. Hilum's benchmarks compare against the unstalled Orthanc; ``nodelay=False``
starts the stalled one, for a row that says so.

Installed for the benchmarks only (``apt-get install orthanc orthanc-dicomweb``); Hilum does not
depend on it."""

from __future__ import annotations

import contextlib
import json
import shutil
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from benchmarks.processes import DCMTK_NAGLE, DCMTK_NODELAY, accepts_tcp, free_port, running

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
# Debian's orthanc-postgresql: Orthanc's index in PostgreSQL (its files stay on disk).
POSTGRESQL_INDEX_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so")


def orthanc_installed(*, dicomweb: bool = False, postgresql: bool = False) -> bool:
    return (
        shutil.which("Orthanc") is not None
        and (not dicomweb or DICOMWEB_PLUGIN.exists())
        and (not postgresql or POSTGRESQL_INDEX_PLUGIN.exists())
    )


@dataclass(frozen=True)
class RunningOrthanc:
    ae_title: str
    dicom_port: int
    http_port: int
    log: Path
    pid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def count_instances(self) -> int:
        with urllib.request.urlopen(f"{self.url}/statistics", timeout=10) as response:
            return int(json.load(response)["CountInstances"])

    def upload(self, part10: bytes) -> None:
        """Store one instance through Orthanc's REST API (POST /instances)."""
        request = urllib.request.Request(
            f"{self.url}/instances", data=part10, headers={"Content-Type": "application/dicom"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()


@contextlib.contextmanager
def running_orthanc(
    workdir: Path,
    *,
    dicomweb: bool = False,
    nodelay: bool = True,
    postgresql_database: str | None = None,
    config_overrides: Mapping[str, object] | None = None,
) -> Iterator[RunningOrthanc]:
    """Orthanc with its defaults (SQLite index, files, fsync), answering C-FIND from any AE;
    with ``TCP_NODELAY=1`` in its environment unless ``nodelay`` is false; its index in the
    local PostgreSQL's ``postgresql_database`` (the orthanc-postgresql plugin) when given.
    ``config_overrides``: more of its configuration (``DicomModalities`` for a C-MOVE)."""
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "hilum-bench",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowFind": True,
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
        **(config_overrides or {}),
    }
    if postgresql_database is not None:
        config["Plugins"] = [*config["Plugins"], str(POSTGRESQL_INDEX_PLUGIN)]  # type: ignore[misc]
        config["PostgreSQL"] = {
            "EnableIndex": True,
            "EnableStorage": False,
            "Host": "127.0.0.1",
            "Port": 5432,
            "Database": postgresql_database,
            "Username": "postgres",
            "Password": "",
            "Lock": False,
        }
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = workdir / "orthanc.log"
    command = [shutil.which("Orthanc") or "Orthanc", str(config_path)]
    env = DCMTK_NODELAY if nodelay else DCMTK_NAGLE
    with running(command, log, accepts_tcp(dicom_port), env) as process:
        yield RunningOrthanc("ORTHANC", dicom_port, http_port, log, process.pid)
