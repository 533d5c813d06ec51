"""A pynetdicom SCU for tests, and DCMTK's storescu driven per transfer syntax."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from server.dimse.ae import DimseServer
from tests.factories import DCMTK_STORESCU

# DCMTK storescu's flag that proposes each transfer syntax (storescu --help).
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu(server: DimseServer, files: list[Path], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DCMTK_STORESCU, "-aet", "STORESCU", "-aec", server.settings.dimse.ae_title,
         *extra, "127.0.0.1", str(server.port), *map(str, files)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def associate(
    server: DimseServer, contexts: list[tuple[str, list[str] | None]] | None = None
) -> Association:
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract, syntaxes in contexts or [(CTImageStorage, None), (Verification, None)]:
        if syntaxes:
            ae.add_requested_context(abstract, syntaxes)
        else:
            ae.add_requested_context(abstract)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.settings.dimse.ae_title)
    assert assoc.is_established, "the SCP refused the association"
    return assoc


def send_file_raw(server: DimseServer, path: Path, sop_class: str, syntax: str) -> Dataset:
    """C-STORE the bytes of ``path`` as they are (pynetdicom's chunked send does not decode)."""
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = associate(server, [(sop_class, [syntax])])
        try:
            return assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked


def echo_works(server: DimseServer) -> bool:
    assoc = associate(server, [(Verification, None)])
    try:
        status = assoc.send_c_echo()
        return status.Status == 0x0000
    finally:
        assoc.release()
