"""The C-STORE sub-operations of C-MOVE and C-GET (PS3.4 C.4.2.3, C.4.3.3): Hilum as Storage SCU.

Each instance is read from the blob store as a stream and sent in its stored transfer syntax
when the peer accepted it; otherwise it is transcoded to an uncompressed syntax the peer
accepted (explicit VR little endian preferred), decoding its pixel data with pydicom's
plug-ins (pylibjpeg, openjpeg, RLE). When neither works the sub-operation fails, with the
reason logged, and its SOP Instance UID goes to the Failed SOP Instance UID List.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context

from server.dimse.statuses import CANCEL, PENDING
from storage.archive import Archive
from storage.errors import StorageError
from storage.query import Query, StoredInstance, locate_instances

log = logging.getLogger(__name__)

# Uncompressed little endian syntaxes; pynetdicom re-encodes between them as it sends.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255, so at most 128 contexts.
MAX_PRESENTATION_CONTEXTS = 128
# Instances up to this size are read into memory from the blob store; larger ones spill to a
# temporary file, so a retrieve never holds more than one instance (and this much) at a time.
SPOOL_IN_MEMORY_BYTES = 16 << 20


class SubOperationFailed(Exception):
    """This instance cannot be sent to this peer; the message says why."""


@dataclass
class RetrievePlan:
    """What a C-MOVE or C-GET will send: counted before the first sub-operation."""

    number_of_sub_operations: int = 0
    # (SOP Class UID, stored Transfer Syntax UID) pairs among the instances.
    syntaxes: set[tuple[str, str]] = field(default_factory=set)


def plan_retrieve(archive: Archive, query: Query) -> RetrievePlan:
    """One streamed pass over the matching instances (PS3.4 C.4.2.1.4: the count comes first)."""
    plan = RetrievePlan()
    instances = locate_instances(archive, query)
    try:
        for stored in instances:
            plan.number_of_sub_operations += 1
            plan.syntaxes.add((stored.sop_class_uid, stored.transfer_syntax_uid))
    finally:
        instances.close()
    return plan


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
    query: Query,
    peer: Association | None,
) -> Iterator[tuple[int, Dataset | None]]:
    """Yield pynetdicom's (status, data set) pairs: Pending with each instance to send, or
    Cancel when the SCU sent C-CANCEL (PS3.4 C.4.2.3.1, C.4.3.3.1)."""
    assoc = event.assoc
    store_assoc = peer or assoc
    instances = locate_instances(archive, query)
    try:
        for stored in instances:
            if event.is_cancelled:
                log.info("[%s] retrieve cancelled by the SCU", assoc.name)
                yield CANCEL, None
                return
            try:
                dataset = dataset_for_peer(archive, stored, store_assoc)
            except (SubOperationFailed, StorageError) as error:
                log.warning(
                    "[%s] C-STORE sub-operation for %s to %s failed: %s",
                    assoc.name,
                    stored.sop_instance_uid,
                    store_assoc.acceptor.ae_title if peer else assoc.requestor.ae_title,
                    error,
                )
                dataset = unsendable(stored)
            yield PENDING, dataset
    finally:
        instances.close()


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


def dataset_for_peer(archive: Archive, stored: StoredInstance, assoc: Association) -> Dataset:
    """The stored instance, in a transfer syntax the peer accepted; raise SubOperationFailed."""
    accepted = accepted_syntaxes(assoc, stored.sop_class_uid)
    if not accepted:
        raise SubOperationFailed(f"the peer accepted no context for {stored.sop_class_uid}")
    stored_syntax = UID(stored.transfer_syntax_uid)
    uncompressed = [syntax for syntax in UNCOMPRESSED if syntax in accepted]
    if stored_syntax not in accepted and not uncompressed:
        raise SubOperationFailed(
            f"stored as {stored_syntax.name}; the peer accepts only "
            + ", ".join(UID(s).name for s in accepted)
        )
    dataset = read_stored(archive, stored)
    if stored_syntax in accepted or stored_syntax in UNCOMPRESSED:
        return dataset
    return transcoded(dataset, stored_syntax)


def read_stored(archive: Archive, stored: StoredInstance) -> Dataset:
    """Parse the stored file, copied from the blob stream into a spooled temporary file
    (pydicom needs to seek; an S3 stream cannot)."""
    with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY_BYTES) as spool:
        with archive.blobs.open(stored.blob_key) as stream:
            shutil.copyfileobj(stream, spool, 1 << 20)
        spool.seek(0)
        return dcmread(spool)


def transcoded(dataset: Dataset, stored_syntax: UID) -> Dataset:
    """Explicit VR little endian: compressed pixel data decoded; a deflated data set (already
    inflated by pydicom) re-encoded as it is."""
    if stored_syntax == DeflatedExplicitVRLittleEndian:
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return dataset
    if not stored_syntax.is_compressed:
        raise SubOperationFailed(f"cannot convert {stored_syntax.name} to little endian")
    try:
        # The SOP Instance UID is kept: only the encoding changes, not the image (PS3.5 8.2
        # keeps Lossy Image Compression (0028,2110) as it was).
        dataset.decompress(generate_instance_uid=False)
    except Exception as error:  # noqa: BLE001 (a missing plug-in or corrupt pixel data)
        raise SubOperationFailed(f"cannot decode {stored_syntax.name}: {error}") from error
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset
