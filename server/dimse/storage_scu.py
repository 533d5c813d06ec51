"""The C-STORE sub-operations of C-MOVE and C-GET (PS3.4 C.4.2.3, C.4.3.3): Hilum as Storage SCU.

Each instance of the plan is copied from the blob store (a stream) into a temporary file under
``<data_dir>/tmp``. When the peer accepted its stored transfer syntax, pynetdicom sends that file
as it is, in PDU-sized chunks, without parsing it. Otherwise it is read into memory and
transcoded to an uncompressed syntax the peer accepted (explicit VR little endian preferred),
decoding its pixel data (:mod:`server.transcoding`); an instance larger than
``[server] transcode_max_bytes`` is not transcoded. When
neither works the sub-operation fails, with the reason logged, and its SOP Instance UID goes to
the Failed SOP Instance UID List.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context

from server.dimse.retrieve import RetrievePlan
from server.dimse.statuses import CANCEL, PENDING
from server.dimse.transport import keep_alive
from server.transcoding import TranscodingRefused, check_size, transcode
from storage.archive import Archive
from storage.errors import StorageError
from storage.query import StoredInstance

log = logging.getLogger(__name__)

# Uncompressed little endian syntaxes; pynetdicom re-encodes between them as it sends.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255, so at most 128 contexts.
MAX_PRESENTATION_CONTEXTS = 128


class SubOperationFailed(Exception):
    """This instance cannot be sent to this peer; the message says why."""


class SpooledFile(Dataset):
    """A sub-operation's data set left in its file: pynetdicom's retrieve loop takes only a
    Dataset, and :func:`send_spooled_files` hands pynetdicom the file's path instead."""

    def __init__(self, stored: StoredInstance, path: Path) -> None:
        super().__init__()
        # For pynetdicom's Failed SOP Instance UID List, should the C-STORE fail.
        self.SOPClassUID = stored.sop_class_uid
        self.SOPInstanceUID = stored.sop_instance_uid
        self.spooled_path = path


def send_spooled_files(assoc: Association) -> None:
    """Make ``assoc.send_c_store`` send a :class:`SpooledFile` from its path.

    Given a path (and ``_config.STORE_SEND_CHUNKED_DATASET``, set by the server), pynetdicom
    streams the data set from the file in PDU-sized chunks; given a Dataset, it encodes the
    whole data set in memory. Its C-MOVE and C-GET loops pass on only Datasets, so the one
    association that sends the sub-operations gets this wrapper around its public method.
    """
    if "send_c_store" in vars(assoc):
        return  # already wrapped (an earlier C-GET on the same association)
    send = assoc.send_c_store

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if isinstance(dataset, SpooledFile):
            return send(dataset.spooled_path, *args, **kwargs)
        return send(dataset, *args, **kwargs)

    assoc.send_c_store = send_c_store  # type: ignore[method-assign]


def proposed_contexts(syntaxes: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """The contexts Hilum proposes to a Move Destination: for each SOP class, one with each
    stored compressed syntax (sent as stored when accepted) and one uncompressed fallback."""
    by_class: dict[str, set[str]] = {}
    for sop_class, syntax in syntaxes:
        by_class.setdefault(sop_class, set()).add(syntax)
    fallbacks = [build_context(sop_class, list(UNCOMPRESSED)) for sop_class in sorted(by_class)]
    as_stored = [
        build_context(sop_class, syntax)
        for sop_class, stored in sorted(by_class.items())
        for syntax in sorted(stored)
        if syntax not in UNCOMPRESSED
    ]
    # Past 128 contexts the compressed ones go first: those instances are then decoded.
    return (fallbacks + as_stored)[:MAX_PRESENTATION_CONTEXTS]


def sub_operations(
    event: Event,
    archive: Archive,
    plan: RetrievePlan,
    peer: Association | None,
    spool_dir: Path,
    transcode_max_bytes: int,
) -> Iterator[tuple[int, Dataset | None]]:
    """Yield pynetdicom's (status, data set) pairs: Pending with each instance of the plan, or
    Cancel when the SCU sent C-CANCEL (PS3.4 C.4.2.3.1, C.4.3.3.1)."""
    assoc = event.assoc
    store_assoc = peer or assoc
    send_spooled_files(store_assoc)
    for stored in plan.instances:
        if event.is_cancelled:
            log.info("[%s] retrieve cancelled by the SCU", assoc.name)
            yield CANCEL, None
            return
        spooled = None
        try:
            spooled = spool(archive, stored, spool_dir)
            dataset = dataset_for_peer(stored, spooled, store_assoc, transcode_max_bytes)
        except (SubOperationFailed, StorageError, OSError) as error:
            log.warning(
                "[%s] C-STORE sub-operation for %s to %s failed: %s",
                assoc.name,
                stored.sop_instance_uid,
                store_assoc.acceptor.ae_title if peer else assoc.requestor.ae_title,
                error,
            )
            dataset = unsendable(stored)
        keep_alive(assoc)
        try:
            yield PENDING, dataset  # pynetdicom performs the C-STORE before resuming here
        finally:
            if spooled is not None:
                spooled.unlink(missing_ok=True)


def unsendable(stored: StoredInstance) -> Dataset:
    """A data set pynetdicom counts as a failed sub-operation without sending anything: it has
    no Transfer Syntax, so no presentation context can carry it; its SOP Instance UID goes to
    the Failed SOP Instance UID List (PS3.4 C.4.2.1.4.2)."""
    ds = Dataset()
    ds.SOPClassUID = stored.sop_class_uid
    ds.SOPInstanceUID = stored.sop_instance_uid
    return ds


def accepted_syntaxes(assoc: Association, sop_class_uid: str) -> list[str]:
    """Transfer syntaxes accepted for ``sop_class_uid`` in contexts where Hilum is the SCU."""
    return [
        str(context.transfer_syntax[0])
        for context in assoc.accepted_contexts
        if context.abstract_syntax == sop_class_uid and context.as_scu
    ]


def spool(archive: Archive, stored: StoredInstance, spool_dir: Path) -> Path:
    """Copy the stored file from the blob stream into a temporary file (the caller removes
    it); raise NotFound when the blob is gone, StorageUnavailable when unreadable."""
    with tempfile.NamedTemporaryFile(
        dir=spool_dir,
        prefix="tmp",
        suffix=".dcm",
        delete=False,  # the janitor's pattern
    ) as spooled:
        path = Path(spooled.name)
        try:
            with archive.blobs.open(stored.blob_key) as stream:
                shutil.copyfileobj(stream, spooled, 1 << 20)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return path


def dataset_for_peer(
    stored: StoredInstance, spooled: Path, assoc: Association, transcode_max_bytes: int
) -> Dataset:
    """The spooled instance in a transfer syntax the peer accepted: as stored when it can (a
    :class:`SpooledFile`), transcoded in memory otherwise; raise SubOperationFailed."""
    accepted = accepted_syntaxes(assoc, stored.sop_class_uid)
    if not accepted:
        raise SubOperationFailed(f"the peer accepted no context for {stored.sop_class_uid}")
    stored_syntax = UID(stored.transfer_syntax_uid)
    if stored_syntax in accepted:
        return SpooledFile(stored, spooled)
    uncompressed = [syntax for syntax in UNCOMPRESSED if syntax in accepted]
    if not uncompressed:
        raise SubOperationFailed(
            f"stored as {stored_syntax.name}; the peer accepts only "
            + ", ".join(UID(s).name for s in accepted)
        )
    try:
        check_size(stored.size, read(spooled, stop_before_pixels=True), transcode_max_bytes)
        dataset = read(spooled)
        if stored_syntax in UNCOMPRESSED:
            return dataset  # pynetdicom re-encodes it in the accepted little endian syntax
        return transcode(dataset, ExplicitVRLittleEndian)
    except TranscodingRefused as refused:
        raise SubOperationFailed(str(refused)) from refused


def read(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=stop_before_pixels)
    except Exception as error:  # noqa: BLE001 (pydicom raises many kinds on a corrupt file)
        raise SubOperationFailed(f"the stored file cannot be read: {error}") from error
