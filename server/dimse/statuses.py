"""Every DIMSE status Hilum answers with, and the one table mapping storage errors to them."""

from __future__ import annotations

from pydicom.dataset import Dataset

from storage.errors import InvalidInstance, SOPClassMismatch, StorageError, StorageUnavailable

SUCCESS = 0x0000
# PS3.4 Table B.2-1, C-STORE statuses.
OUT_OF_RESOURCES = 0xA700  # Refused: index or blob store unavailable, or full. Retry later.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error
CANNOT_UNDERSTAND = 0xC000  # Error: unparseable, or required UIDs missing/invalid

STORAGE_ERROR_STATUS: dict[type[StorageError], int] = {
    StorageUnavailable: OUT_OF_RESOURCES,
    SOPClassMismatch: DATASET_DOES_NOT_MATCH_SOP_CLASS,
    InvalidInstance: CANNOT_UNDERSTAND,
}


def status_for(error: Exception) -> int:
    for error_type, status in STORAGE_ERROR_STATUS.items():
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
