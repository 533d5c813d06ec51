"""Every HTTP status the DICOMweb services answer with for a storage error, and the STOW-RS
failure reasons: one table each."""

from __future__ import annotations

from storage.errors import (
    Conflict,
    InstanceTooLarge,
    InvalidArgument,
    InvalidInstance,
    InvalidQuery,
    NotFound,
    SOPClassMismatch,
    StorageError,
    StorageUnavailable,
)

# PS3.18 8.6.1.2: the HTTP status of a request that fails with a storage error.
STORAGE_ERROR_HTTP_STATUS: dict[type[StorageError], int] = {
    NotFound: 404,
    InvalidQuery: 400,
    InvalidArgument: 400,  # the admin API: a bad partition name, AE title, network
    InvalidInstance: 400,
    InstanceTooLarge: 413,
    SOPClassMismatch: 400,
    Conflict: 409,
    StorageUnavailable: 503,
}

# PS3.18 10.5.3 / PS3.4 Table B.2-1: Failure Reason (0008,1197) of a STOW-RS instance.
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# Not in the standard's table; dcm4chee answers this when an instance names another study
# than the one in the request URL (PS3.18 10.5.1: "shall be ... of that study").
STUDY_INSTANCE_UID_MISMATCH = 0xC409
# Warning Reason (0008,1196), PS3.18 Table 10.5.3-2: the instance was received again; the
# stored copy was kept (storage.on_duplicate = "keep").
ELEMENTS_DISCARDED = 0xB006

STORAGE_ERROR_FAILURE_REASON: dict[type[StorageError], int] = {
    StorageUnavailable: OUT_OF_RESOURCES,
    InstanceTooLarge: OUT_OF_RESOURCES,  # over a [limits] size; InstanceTooComplex: C000
    SOPClassMismatch: DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    InvalidInstance: CANNOT_UNDERSTAND,
}


def http_status_for(error: StorageError) -> int:
    for error_type, status in STORAGE_ERROR_HTTP_STATUS.items():
        if isinstance(error, error_type):
            return status
    return 500


def failure_reason_for(error: Exception) -> int:
    for error_type, reason in STORAGE_ERROR_FAILURE_REASON.items():
        if isinstance(error, error_type):
            return reason
    return PROCESSING_FAILURE


def warning_text(text: str, limit: int = 200) -> str:
    """``text`` made safe for the quoted warn-text of a Warning header (RFC 7234 5.5): printable
    ASCII only, quotes and backslashes escaped, at most ``limit`` characters."""
    printable = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return printable.replace("\\", "\\\\").replace('"', '\\"')
