"""Every DIMSE status Hilum answers with, and the one table mapping storage errors to them."""

from __future__ import annotations

from dataclasses import dataclass

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
# C-MOVE/C-GET: over 65535 instances.
UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702  # also when every sub-operation failed
MOVE_DESTINATION_UNKNOWN = 0xA801  # not stored (hilum peers), or it refused the association
SUB_OPERATIONS_COMPLETE_WITH_FAILURES = 0xB000  # with the Failed SOP Instance UID List
# PS3.7 C.4.2: a request of a service Hilum does not provide.
UNRECOGNIZED_OPERATION = 0x0211
# PS3.7 Annex C (general statuses): a request the calling AE's permission does not cover.
NOT_AUTHORIZED = 0x0124
# PS3.4 F.7.2.1.2, F.7.2.2.2 and PS3.7 C: Modality Performed Procedure Step (N-CREATE, N-SET).
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
MAY_NO_LONGER_BE_UPDATED = 0x0110  # with the Error Comment saying so (F.7.2.2.2: ID A710)

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


def error_comment(text: str) -> str:
    """PS3.7 C.4: Error Comment (0000,0902) is an LO: at most 64 characters, no backslash."""
    return text.replace("\\", "/")[:64]


@dataclass(frozen=True)
class StatusUse:
    """A status as the conformance statement describes it (docs/conformance.md is generated
    from these tables: :mod:`server.dimse.conformance`)."""

    status: int
    services: str
    meaning: str
    when: str


# PS3.4 Table B.2-1.
C_STORE_STATUSES = (
    StatusUse(SUCCESS, "C-STORE", "Success",
              "the instance is stored and indexed (the database transaction committed), or it "
              "is a duplicate handled by `[storage] on_duplicate`"),
    StatusUse(OUT_OF_RESOURCES, "C-STORE", "Refused: Out of Resources",
              "the index database or the blob store is unreachable, full or failing (the "
              "received data set could not even be written to `<data_dir>/tmp`, included); the "
              "SQLite write lock could not be obtained within 30 s; or another association kept "
              "changing the same instance through 10 attempts; or the audit record of the "
              "transfer could not be written (Error Comment `the audit trail cannot be "
              "written…`). Nothing was stored: send again later. Also: the instance is over a "
              "`[limits]` size (stored, inflated, decoded or per-frame bytes, Number of "
              "Frames); the Error Comment starts with the limit's name "
              "(`over limits.frame_max_bytes (…): …`) and sending again will not help"),
    StatusUse(DATASET_DOES_NOT_MATCH_SOP_CLASS, "C-STORE",
              "Error: Data Set does not match SOP Class",
              "the data set's SOP Class UID or SOP Instance UID differs from the request's "
              "Affected SOP Class UID or Affected SOP Instance UID (so a data set whose SOP "
              "Class is not a storage class, sent on a storage context, gets `0xA900`)"),
    StatusUse(NOT_AUTHORIZED, "C-STORE", "Refused: Not authorized (PS3.7 Annex C)",
              "the calling AE may retrieve (C-GET, for which its storage contexts are accepted) "
              "but not store in this partition (`hilum ae`); the data set is discarded"),
    StatusUse(CANNOT_UNDERSTAND, "C-STORE", "Error: Cannot understand",
              "the data set cannot be parsed; a required UID is missing or invalid; the Pixel "
              "Data is truncated or malformed, or holds fewer bytes or fragments than its frames "
              "need, or has Rows or Columns of 0; sequences nest deeper or elements are more "
              "than `[limits]` allow (Error Comment names the limit); or an unexpected internal "
              "error (Error Comment `internal error: <type>`)"),
)  # fmt: skip

# PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4.
QUERY_RETRIEVE_STATUSES = (
    StatusUse(PENDING, "all", "Pending",
              "one match (C-FIND) or one sub-operation done (C-MOVE/C-GET, with Remaining/"
              "Completed/Failed/Warning counts)"),
    StatusUse(SUCCESS, "all", "Success",
              "all matches sent; all sub-operations completed (or none to do)"),
    StatusUse(CANCEL, "all", "Cancel",
              "C-CANCEL received; C-MOVE/C-GET with the counts, the Remaining ones included"),
    StatusUse(SUB_OPERATIONS_COMPLETE_WITH_FAILURES, "MOVE, GET",
              "Warning: sub-operations complete, one or more failures or warnings",
              "with the Failed SOP Instance UID List (0008,0058) in the Identifier"),
    StatusUse(OUT_OF_RESOURCES, "FIND", "Refused: Out of resources",
              "the index is unreachable, or the query's audit record cannot be written (nothing "
              "is matched unaudited)"),
    StatusUse(UNABLE_TO_CALCULATE_NUMBER_OF_MATCHES, "MOVE, GET",
              "Refused: Out of resources – unable to calculate number of matches",
              "the index is unreachable, or the retrieve's audit record cannot be written "
              "(before any sub-operation)"),
    StatusUse(UNABLE_TO_PERFORM_SUB_OPERATIONS, "MOVE, GET",
              "Refused: Out of resources – unable to perform sub-operations",
              "every sub-operation failed (with the Failed SOP Instance UID List), or more "
              "than 65 535 instances to send"),
    StatusUse(MOVE_DESTINATION_UNKNOWN, "MOVE", "Refused: Move Destination unknown",
              "not stored (`hilum peers`, seeded from `[[dimse.peers]]`), or the destination "
              "is marked `tls` without `[dimse] tls_certificate`, or it rejected the "
              "association or could not be reached (the Error Comment says which)"),
    StatusUse(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "all",
              "Error: Identifier does not match SOP Class",
              "missing or unknown Query/Retrieve Level, PATIENT level in Study Root, an invalid "
              "value (`abc` for an IS, a malformed date or range, a wild card in a UID), an "
              "undecodable Identifier; C-MOVE/C-GET: the retrieve level's unique key missing, "
              "empty or with a wild card, or a list above the retrieve level. Answered before "
              "any sub-operation and before any association to a Move Destination"),
    StatusUse(UNABLE_TO_PROCESS, "FIND", "Error: Unable to process",
              "an unexpected internal error"),
    StatusUse(NOT_AUTHORIZED, "FIND, MOVE, GET", "Refused: Not authorized (PS3.7 Annex C)",
              "the calling AE's permission in this partition does not include the service "
              "(`hilum ae`): a C-FIND sent on a C-MOVE context, or the like. Contexts of a "
              "service the AE may not use are rejected at negotiation"),
    StatusUse(UNRECOGNIZED_OPERATION, "any other", "Unrecognized operation (PS3.7 C.4.2)",
              "a request of a DIMSE service Hilum does not provide (N-GET, N-ACTION, ...; N-CREATE "
              "and N-SET only for MPPS, section 3.2.1.8) on an "
              "accepted context"),
)  # fmt: skip
