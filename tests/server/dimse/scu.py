"""A pynetdicom SCU for tests, and DCMTK's storescu driven per transfer syntax."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from server.dimse.ae import DimseServer
from server.dimse.commands import CommandField
from server.dimse.negotiation import request_association
from storage.data_set_structure import skip_file_meta
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
    """C-STORE the data set of ``path`` byte for byte as it is in the file, whatever it holds
    (pynetdicom would decode and re-encode it): Hilum's own requestor, from
    :mod:`server.dimse.negotiation`. Returns the response's status as a Dataset."""
    assoc = request_association(
        "127.0.0.1",
        server.port,
        calling_ae_title="RAWSCU",
        called_ae_title=server.settings.dimse.ae_title,
        contexts=[(sop_class, [syntax])],
        max_pdu_length=16384,
        timeout=30,
    )
    try:
        (context,) = assoc.contexts.values()
        with open(path, "rb") as f:
            f.seek(data_set_offset(path))
            assoc.send_message_stream(
                context,
                {
                    "AffectedSOPClassUID": sop_class,
                    "CommandField": CommandField.C_STORE_RQ,
                    "MessageID": 1,
                    "Priority": 0,
                    # As pynetdicom did: the File Meta Information's UID, else the data set's.
                    "AffectedSOPInstanceUID": announced_instance_uid(path),
                },
                f,
            )
        response = assoc.receive_message()
        assert response is not None and response.command.field == CommandField.C_STORE_RSP
        status = Dataset()
        status.Status = response.command["Status"]
        if "ErrorComment" in response.command:
            status.ErrorComment = response.command["ErrorComment"]
        return status
    finally:
        assoc.release()


def announced_instance_uid(path: Path) -> str:
    """What pynetdicom announced for a file: its File Meta Information's SOP Instance UID, else
    the data set's, read without parsing the rest (a hostile data set may nest 10 000 deep)."""
    try:
        meta_uid = pydicom.filereader.read_file_meta_info(path).get("MediaStorageSOPInstanceUID")
    except Exception:  # noqa: BLE001 (a file without File Meta Information)
        meta_uid = None
    if meta_uid:
        return str(meta_uid)
    header = pydicom.dcmread(path, force=True, specific_tags=["SOPInstanceUID"])
    return str(header.get("SOPInstanceUID", "1.2.3"))


def data_set_offset(path: Path) -> int:
    """Where the data set of ``path`` starts: after the preamble and File Meta Information,
    or after group 0002 of a file without a preamble, or at 0 in a file without either."""
    with open(path, "rb") as f:
        past_meta = skip_file_meta(f)
        if past_meta is not None:
            return f.tell() - len(past_meta)
        f.seek(0)
        offset = 0
        while True:
            group, _element, vr, length = struct.unpack("<HH2sH", f.read(8))
            if group != 0x0002:
                return offset
            if vr in (b"OB", b"UN"):
                (length,) = struct.unpack("<I", f.read(4))
            f.seek(length, 1)
            offset = f.tell()


def echo_works(server: DimseServer) -> bool:
    assoc = associate(server, [(Verification, None)])
    try:
        status = assoc.send_c_echo()
        return status.Status == 0x0000
    finally:
        assoc.release()


def accepted_context_id(assoc: Association, abstract_syntax: str) -> int:
    """The ID of the presentation context the SCP accepted for ``abstract_syntax`` (the one a
    C-CANCEL of a request on it names, PS3.7 9.3.2.3)."""
    for context in assoc.accepted_contexts:
        if context.abstract_syntax == abstract_syntax and context.context_id is not None:
            return context.context_id
    raise LookupError(f"no presentation context accepted for {abstract_syntax}")
