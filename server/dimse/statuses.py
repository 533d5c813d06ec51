"""Every DIMSE status Hilum answers with, and the one table mapping storage errors to them."""

from __future__ import annotations

from pydicom.dataset import Dataset

from storage.errors import (
    InstanceTooLarge,
    InvalidInstance,
    InvalidQuery,
    SOPClassMismatch,
    StorageError,
    StorageUnavailable,
)

SUCCESS = 0x0000
# PS3.4 Table B.2-1, C-STORE statuses.
# Refused: index or blob store unavailable, or full (retry later); or the instance is over a
# [limits] size (the Error Comment names the limit).
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error
CANNOT_UNDERSTAND = 0xC000  # Error: unparseable, or required UIDs missing/invalid

STORAGE_ERROR_STATUS: dict[type[StorageError], int] = {
    StorageUnavailable: OUT_OF_RESOURCES,
    InstanceTooLarge: OUT_OF_RESOURCES,
    SOPClassMismatch: DATASET_DOES_NOT_MATCH_SOP_CLASS,
    InvalidInstance: CANNOT_UNDERSTAND,  # also InstanceTooComplex: nesting, element count
}

# PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4: Query/Retrieve statuses (C-FIND, C-MOVE, C-GET).
PENDING = 0xFF00  # Matches (or sub-operations) are continuing
CANCEL = 0xFE00  # Matching or sub-operations terminated due to Cancel
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Failure: bad level, key or value
UNABLE_TO_PROCESS = 0xC000  # Failure: unexpected error while matching
UNABLE_TO_CALCULATE_NUMBER_OF_MATCHES = 0xA701  # C-MOVE/C-GET: index unavailable
# C-MOVE/C-GET: over 65535 instances; pynetdicom also sends it when every sub-operation failed.
UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702
# pynetdicom itself sends the other retrieve statuses: 0xA801 Move Destination unknown (not in
# [[dimse.peers]], or it refused the association) and 0xB000 sub-operations complete with
# failures (with the Failed SOP Instance UID List).

FIND_ERROR_STATUS: dict[type[StorageError], int] = {
    StorageUnavailable: OUT_OF_RESOURCES,
    InvalidQuery: IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
}
RETRIEVE_ERROR_STATUS: dict[type[StorageError], int] = {
    StorageUnavailable: UNABLE_TO_CALCULATE_NUMBER_OF_MATCHES,
    InvalidQuery: IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
}


def status_for(
    error: Exception, table: dict[type[StorageError], int] = STORAGE_ERROR_STATUS
) -> int:
    for error_type, status in table.items():
        if isinstance(error, error_type):
            return status
    return CANNOT_UNDERSTAND


def status_dataset(status: int, comment: str = "") -> Dataset:
    """A status with an Error Comment (0000,0902), which is an LO: at most 64 characters."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds
