"""C-STORE SCP (PS3.4 Annex B, Storage Service Class): each data set streamed to a file, then
handed to ingest.

The data set's fragments are written to a temporary Part 10 file under ``<data_dir>/tmp`` as
they arrive (File Meta Information first, PS3.10 7.1), and hashed on the way, so ingest does not
read the file again for its SHA-256; its writing to disk starts when the last fragment is in
(:meth:`ReceivedDataSet.close`). Concurrent associations share index transactions
(:class:`storage.group_commit.GroupCommit`). The response is sent only after ingest has made the
blob durable and committed the index row.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import tempfile
from pathlib import Path
from typing import IO

from server.dimse.association import Association, Context, Message
from server.dimse.commands import Command, CommandField
from server.dimse.negotiation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from server.dimse.statuses import OUT_OF_RESOURCES, SUCCESS, error_comment, status_for
from storage.audit import Transfer
from storage.blobs import start_writeback
from storage.errors import StorageError, StorageUnavailable
from storage.group_commit import GroupCommit
from storage.ingest import Origin, Received
from storage.limits import refuse_too_large

log = logging.getLogger(__name__)

_EXPLICIT_SHORT = struct.Struct("<HH2sH")  # PS3.5 7.1.2: tag, VR, 2-byte length
_EXPLICIT_LONG = struct.Struct("<HH2s2xI")  # OB, with a 4-byte length


class ReceivedDataSet:
    """A C-STORE data set written to its temporary Part 10 file as its fragments arrive.

    A file that cannot be written (disk full), or a data set past ``max_bytes`` (``[limits]
    instance_max_bytes``, checked as it arrives, so an endless data set never fills the disk),
    does not end the association: the rest of the data set is read and dropped, and the request
    is answered with the refusal (``error``).
    """

    def __init__(self, tmp_dir: Path, command: Command, context: Context, max_bytes: int) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.max_bytes = max_bytes
        self.error: OSError | None = None
        self.too_large = False
        self.path: Path | None = None
        self._file: IO[bytes] | None = None
        try:
            # mkstemp and a plain file object: NamedTemporaryFile's wrapper would add a Python
            # call to every write of every fragment's chunk.
            fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="tmp", suffix=".dcm")
            self.path = Path(name)
            self._file = open(fd, "wb")  # noqa: SIM115 (closed in close())
            self._put(
                file_meta(
                    str(command.get("AffectedSOPClassUID", "")),
                    str(command.get("AffectedSOPInstanceUID", "")),
                    context.transfer_syntax,
                )
            )
        except OSError as error:
            self._fail(error)

    def write(self, chunk: memoryview) -> None:
        if self._file is None:
            return
        if self.size + len(chunk) > self.max_bytes:
            self.too_large = True
            self.remove()
            return
        try:
            self._put(chunk)
        except OSError as error:
            self._fail(error)

    def close(self) -> None:
        """Close the file, its writing to disk started (:func:`storage.blobs.start_writeback`):
        the blob store's sync of it (before the response) then overlaps the parse and the index
        row's preparation instead of following them, and the files of concurrent associations
        go to the disk together."""
        self._close(write_back=True)

    def remove(self) -> None:
        self._close(write_back=False)  # deleted next
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _close(self, *, write_back: bool) -> None:
        if self._file is not None:
            try:
                if write_back:
                    self._file.flush()
                    start_writeback(self._file.fileno())
                self._file.close()
            except OSError as error:
                self._fail(error)
            self._file = None

    def _put(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        self._file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def _fail(self, error: OSError) -> None:
        self.error = self.error or error
        if self._file is not None:
            self._file.close()
            self._file = None


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information of a Part 10 file (PS3.10 7.1), explicit VR
    little endian (PS3.10 7.1: group 0002 always is). Nothing in it depends on the sender (no
    Source Application Entity Title), so an identical data set sent again, from any AE, makes
    an identical file: a duplicate, not a replacement."""
    elements = [
        _long(0x0001, b"OB", b"\x00\x01"),  # File Meta Information Version
        _short(0x0002, b"UI", _uid(sop_class_uid)),
        _short(0x0003, b"UI", _uid(sop_instance_uid)),
        _short(0x0010, b"UI", _uid(transfer_syntax)),
        _short(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
        _short(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
    ]
    body = b"".join(elements)
    group_length = _EXPLICIT_SHORT.pack(2, 0x0000, b"UL", 4) + struct.pack("<I", len(body))
    return bytes(128) + b"DICM" + group_length + body


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    return _EXPLICIT_SHORT.pack(2, element, vr, len(value)) + value


def _long(element: int, vr: bytes, value: bytes) -> bytes:
    return _EXPLICIT_LONG.pack(2, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode("ascii", "replace")[:64]
    return data + b"\x00" if len(data) % 2 else data


def _text(value: str) -> bytes:
    data = value.encode("ascii", "replace")[:16]
    return data + b" " if len(data) % 2 else data


def handle_c_store(assoc: Association, message: Message, ingest: GroupCommit) -> None:
    command = message.command
    received = message.data
    assert isinstance(received, ReceivedDataSet)
    origin = Origin(
        calling_ae_title=assoc.calling_ae_title,
        announced_sop_class_uid=str(command.get("AffectedSOPClassUID", "")),
        announced_sop_instance_uid=str(command.get("AffectedSOPInstanceUID", "")),
    )
    comment = ""
    if assoc.transfer is None:
        assoc.transfer = Transfer(assoc.context)
    try:
        received.close()
        if received.too_large:
            refuse_too_large("the data set is larger", "instance_max_bytes", received.max_bytes)
        if received.error is not None or received.path is None:
            raise StorageUnavailable(f"cannot write the received data set: {received.error}")
        result = ingest.ingest(
            Received(
                received.path,
                origin,
                temporary=True,
                sha256=(received.digest.hexdigest(), received.size),
                requestor=assoc.context,
                transfer=assoc.transfer,
            )
        )
        status = SUCCESS
        assoc.stats.stored += 1
        log.debug("[%s] C-STORE %s: %s", assoc.name, result.sop_instance_uid, result.outcome.value)
    except StorageError as error:
        status, comment = status_for(error), str(error)
        assoc.stats.refused += 1
        log.warning(
            "[%s] C-STORE %s from %s refused with 0x%04X: %s",
            assoc.name,
            origin.announced_sop_instance_uid,
            origin.calling_ae_title,
            status,
            error,
        )
    except Exception as error:
        log.exception("[%s] C-STORE %s failed", assoc.name, origin.announced_sop_instance_uid)
        status = status_for(error) if not isinstance(error, OSError) else OUT_OF_RESOURCES
        comment = f"internal error: {type(error).__name__}"
        assoc.stats.refused += 1
    finally:
        received.remove()
    # PS3.7 9.3.1.2: C-STORE-RSP.
    response = {
        "AffectedSOPClassUID": origin.announced_sop_class_uid,
        "CommandField": CommandField.C_STORE_RSP,
        "MessageIDBeingRespondedTo": message.message_id,
        "Status": status,
        "AffectedSOPInstanceUID": origin.announced_sop_instance_uid,
    }
    if comment:
        response["ErrorComment"] = error_comment(comment)
    assoc.send_command(message.context, response)
