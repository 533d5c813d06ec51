"""DICOM TLS (PS3.15 B.9, BCP 195) with DCMTK's +tls options: certificates from a test CA made
with openssl; a client certificate from an unknown CA is refused."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from server.dimse.ae import DimseServer
from storage.archive import open_archive
from storage.index.models import Instance
from storage.ingest import ingest_file
from tests.conftest import free_port, make_settings
from tests.factories import DCMTK_STORESCU, ct_instance, write_part10
from tests.server.dimse.qr_seed import storescp, study_identifier
from tests.server.dimse.scu import echo_works
from tests.server.dimse.test_c_move import move


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]  # key, certificate
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]  # signed by another CA


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=folder)  # fmt: skip


def _signed(folder: Path, name: str, ca: str) -> tuple[Path, Path]:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", cwd=folder)  # fmt: skip
    return folder / f"{name}.key", folder / f"{name}.crt"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "hospital-ca")
    _ca(folder, "unknown-ca")
    return Pki(
        ca=folder / "hospital-ca.crt",
        server=_signed(folder, "hilum", "hospital-ca"),
        client=_signed(folder, "ct01", "hospital-ca"),
        stranger=_signed(folder, "intruder", "unknown-ca"),
    )


TLS_PEER_PORT = free_port()


@pytest.fixture
def tls_server(tmp_path: Path, pki: Pki) -> Iterator[DimseServer]:
    settings = make_settings(
        tmp_path,
        dimse={
            "tls_port": free_port(),
            "tls_private_key": pki.server[0],
            "tls_certificate": pki.server[1],
            "tls_ca_certificates": pki.ca,
            "peers": [
                {"ae_title": "TLSPEER", "host": "127.0.0.1", "port": TLS_PEER_PORT, "tls": True}
            ],
        },
    )
    archive = open_archive(settings, migrate=True)
    server = DimseServer(settings, archive)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        archive.close()


def _dcmtk_tls(tool: str, server: DimseServer, key_cert: tuple[Path, Path], ca: Path, *args: str):
    return subprocess.run(
        [tool, "+tls", str(key_cert[0]), str(key_cert[1]), "+cf", str(ca),
         "-aet", "CT01", "-aec", "HILUM", "127.0.0.1", str(server.tls_port), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_storescu_over_tls_stores_the_instance(
    tls_server: DimseServer, pki: Pki, tmp_path: Path
) -> None:
    ds = ct_instance(generate_uid(), generate_uid())
    path = write_part10(ds, tmp_path / "ct.dcm")
    echo = _dcmtk_tls("/usr/bin/echoscu", tls_server, pki.client, pki.ca)
    stored = _dcmtk_tls(DCMTK_STORESCU, tls_server, pki.client, pki.ca, str(path))
    assert echo.returncode == 0, echo.stderr
    assert stored.returncode == 0, stored.stderr
    with tls_server.archive.index.read() as session:
        uids = set(session.execute(select(Instance.sop_instance_uid)).scalars())
    assert uids == {ds.SOPInstanceUID}


def test_client_certificate_from_an_unknown_ca_is_refused(
    tls_server: DimseServer, pki: Pki
) -> None:
    refused = _dcmtk_tls("/usr/bin/echoscu", tls_server, pki.stranger, pki.ca)
    anonymous = subprocess.run(
        ["/usr/bin/echoscu", "+tla", "+cf", str(pki.ca), "-aec", "HILUM",
         "127.0.0.1", str(tls_server.tls_port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0 and "Association Request Failed" in refused.stderr
    assert anonymous.returncode != 0
    assert echo_works(tls_server)  # the plain port serves on


def test_plain_dimse_on_the_tls_port_is_refused(tls_server: DimseServer) -> None:
    plain = subprocess.run(
        ["/usr/bin/echoscu", "-to", "10", "-aec", "HILUM", "127.0.0.1", str(tls_server.tls_port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert plain.returncode != 0
    assert echo_works(tls_server)


def test_c_move_to_a_tls_peer(tls_server: DimseServer, pki: Pki, tmp_path: Path) -> None:
    """A Move Destination marked ``tls = true``: Hilum associates over TLS with its own
    certificate, and the peer (DCMTK's storescp with +tls) verifies it."""
    study = generate_uid()
    sent = [ct_instance(study, generate_uid(), seed=n) for n in range(2)]
    for n, ds in enumerate(sent):
        ingest_file(tls_server.archive, write_part10(ds, tmp_path / f"{n}.dcm"))
    peer_options = ("+tls", str(pki.client[0]), str(pki.client[1]), "+cf", str(pki.ca))
    with storescp(tmp_path / "received", "TLSPEER", TLS_PEER_PORT, *peer_options) as received:
        statuses = move(tls_server, study_identifier(study), "TLSPEER")
        arrived = {str(pydicom.dcmread(p).SOPInstanceUID) for p in received.iterdir()}
    assert int(statuses[-1].Status) == 0x0000
    assert arrived == {ds.SOPInstanceUID for ds in sent}


def test_ae_permissions_apply_to_tls_associations(
    tls_server: DimseServer, pki: Pki, tmp_path: Path
) -> None:
    from storage.ae_permissions import AEPermissionEntry, set_ae_permission

    set_ae_permission(
        tls_server.archive.index, AEPermissionEntry("CT01", "default", False, True, False)
    )
    path = write_part10(ct_instance(), tmp_path / "ct.dcm")
    query_only = _dcmtk_tls(DCMTK_STORESCU, tls_server, pki.client, pki.ca, str(path))
    assert query_only.returncode != 0
    assert "No Acceptable Presentation Contexts" in query_only.stderr, query_only.stderr
    stranger = subprocess.run(
        ["/usr/bin/echoscu", "+tls", str(pki.client[0]), str(pki.client[1]), "+cf", str(pki.ca),
         "-aet", "OTHER", "-aec", "HILUM", "127.0.0.1", str(tls_server.tls_port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Calling AE Title Not Recognized" in stranger.stderr, stranger.stderr
    assert _dcmtk_tls("/usr/bin/echoscu", tls_server, pki.client, pki.ca).returncode == 0
