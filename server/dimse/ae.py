"""The Application Entity: presentation contexts, association policy, and the listening server."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from config import Settings
from config.settings import ConfigError
from server.dimse.c_echo import handle_c_echo
from server.dimse.c_find import handle_c_find
from server.dimse.c_get import handle_c_get
from server.dimse.c_move import handle_c_move
from server.dimse.c_store import handle_c_store
from server.dimse.identifier import INFORMATION_MODEL
from server.dimse.transport import acknowledge_at_once, disable_nagle
from storage.archive import Archive

log = logging.getLogger(__name__)

# Objects are stored as received, so every transfer syntax pydicom knows is accepted as-is:
# uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG/HEVC video.
TRANSFER_SYNTAXES = [str(uid) for uid in AllTransferSyntaxes]
# A temporary data set untouched this long belongs to an aborted association. Generous: an
# ingest of a multi-gigabyte slide to a slow object store must never lose its file, and other
# processes may share the data directory.
STALE_TEMPORARY_FILE_AGE_S = 3600.0


def build_ae(settings: Settings) -> AE:
    dimse = settings.dimse
    ae = AE(ae_title=dimse.ae_title)
    ae.maximum_associations = dimse.max_associations
    ae.maximum_pdu_size = dimse.max_pdu_length
    ae.network_timeout = dimse.network_timeout_s
    ae.acse_timeout = 30
    ae.dimse_timeout = dimse.network_timeout_s
    # PS3.8 7.1.1.2 / 7.1.1.4: reject associations with the wrong called or calling AE title.
    ae.require_called_aet = dimse.require_called_ae_title
    if dimse.allowed_calling_ae_titles:
        ae.require_calling_aet = list(dimse.allowed_calling_ae_titles)
    elif not (settings.server.is_loopback or dimse.accept_any_calling_ae):
        raise ConfigError(
            f"[server] host = {settings.server.host!r} is reachable from the network, but no "
            "calling AE titles are allowed: set [dimse] allowed_calling_ae_titles = [...], or "
            "accept_any_calling_ae = true to accept any modality"
        )
    for context in AllStoragePresentationContexts:
        # PS3.4 C.4.3 / PS3.7 D.3.3.4: a C-GET SCU proposes the storage contexts with SCP/SCU
        # Role Selection so that Hilum sends the instances back over the same association.
        # Accepting either role keeps plain C-STORE (no role item) working as before.
        ae.add_supported_context(
            context.abstract_syntax, TRANSFER_SYNTAXES, scu_role=True, scp_role=True
        )
    ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:4])
    # Query/Retrieve: Patient Root and Study Root, FIND, MOVE and GET (PS3.4 C.6.1, C.6.2).
    for sop_class in INFORMATION_MODEL:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES[:4])
    return ae


class DimseServer:
    """The listening SCP. Data sets are received straight to files under ``<data_dir>/tmp``."""

    def __init__(self, settings: Settings, archive: Archive) -> None:
        self.settings = settings
        self.archive = archive
        self.ae = build_ae(settings)
        self.tmp_dir = (settings.server.data_dir / "tmp").resolve()
        self._server: ThreadedAssociationServer | None = None
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # A whole-slide image can be gigabytes: pynetdicom writes each incoming data set to a
        # temporary file instead of memory, and that file must lie inside Hilum's data dir.
        _config.STORE_RECV_CHUNKED_DATASET = True
        # C-MOVE and C-GET sub-operations send a stored file from its path in PDU-sized chunks
        # when the peer accepts its transfer syntax (server.dimse.storage_scu).
        _config.STORE_SEND_CHUNKED_DATASET = True
        # pynetdicom formats every C-FIND response identifier for its debug log even when that
        # log is off: a third of the cost of each pending response. Hilum logs its own summary.
        _config.LOG_RESPONSE_IDENTIFIERS = False
        tempfile.tempdir = str(self.tmp_dir)
        self.remove_stale_temporary_files(STALE_TEMPORARY_FILE_AGE_S)
        handlers = [
            (evt.EVT_CONN_OPEN, disable_nagle),
            (evt.EVT_DATA_SENT, acknowledge_at_once),  # C-GET's C-STORE sub-operations
            (evt.EVT_C_ECHO, handle_c_echo),
            (evt.EVT_C_STORE, handle_c_store, [self.archive]),
            (evt.EVT_C_FIND, handle_c_find, [self.archive, self.settings]),
            (evt.EVT_C_MOVE, handle_c_move, [self.archive, self.settings]),
            (evt.EVT_C_GET, handle_c_get, [self.archive, self.settings]),
        ]
        self._server = self.ae.start_server(
            (self.settings.server.host, self.settings.dimse.port),
            block=False,
            evt_handlers=handlers,
        )
        threading.Thread(target=self._janitor, name="dimse-tmp-janitor", daemon=True).start()
        log.info(
            "DIMSE SCP %s listening on %s:%d",
            self.settings.dimse.ae_title,
            self.settings.server.host,
            self.port,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def remove_stale_temporary_files(self, max_age_s: float) -> int:
        """Remove data sets left by associations aborted mid-transfer.

        A transfer in progress writes its file at least every ``network_timeout_s`` (or the
        association is aborted), and an ingest reads it for far less than an hour.
        """
        removed = 0
        cutoff = time.time() - max_age_s
        for path in Path(self.tmp_dir).glob("tmp*.dcm"):
            try:
                if path.stat().st_mtime <= cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _janitor(self) -> None:
        while not self._stop.wait(STALE_TEMPORARY_FILE_AGE_S / 6):
            removed = self.remove_stale_temporary_files(STALE_TEMPORARY_FILE_AGE_S)
            if removed:
                log.info("removed %d data set(s) left by aborted associations", removed)
