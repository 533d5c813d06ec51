"""C-STORE SCP (PS3.4 Annex B, Storage Service Class): hand the received file to ingest."""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pynetdicom.events import Event

from server.dimse.statuses import SUCCESS, status_dataset, status_for
from server.dimse.transport import keep_alive
from storage.archive import Archive
from storage.errors import StorageError
from storage.ingest import Origin, ingest_file

log = logging.getLogger(__name__)


def handle_c_store(event: Event, archive: Archive) -> int | Dataset:
    request = event.request
    assoc = event.assoc
    origin = Origin(
        calling_ae_title=str(assoc.requestor.ae_title).strip(),
        announced_sop_class_uid=str(request.AffectedSOPClassUID),
        announced_sop_instance_uid=str(request.AffectedSOPInstanceUID),
    )
    try:
        # STORE_RECV_CHUNKED_DATASET: pynetdicom wrote the data set, as received, to a file
        # under <data_dir>/tmp that it deletes after this handler.
        result = ingest_file(archive, event.dataset_path, origin, temporary=True)
    except StorageError as error:
        status = status_for(error)
        log.warning(
            "[%s] C-STORE %s from %s refused with 0x%04X: %s",
            assoc.name,
            origin.announced_sop_instance_uid,
            origin.calling_ae_title,
            status,
            error,
        )
        return status_dataset(status, str(error))
    except Exception as error:
        log.exception("[%s] C-STORE %s failed", assoc.name, origin.announced_sop_instance_uid)
        return status_dataset(status_for(error), f"internal error: {type(error).__name__}")
    finally:
        # Storing a large data set may take longer than network_timeout_s: the association was
        # busy, not idle, and the SCU may send its next instance.
        keep_alive(assoc)
    log.debug(
        "C-STORE %s: %s",
        result.sop_instance_uid,
        result.outcome.value,
        extra={"association": assoc.name},
    )
    return SUCCESS
