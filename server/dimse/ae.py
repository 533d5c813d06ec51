"""The Application Entity: supported presentation contexts, association policy, and the
listening server on Hilum's own transport.

One thread per association, blocked in ``recv`` while the peer is silent (no polling: an idle
association costs no CPU), each with a fixed read buffer (:mod:`server.dimse.pdu`). Beyond
``[dimse] max_associations`` a request is rejected (PS3.8 Table 9-21: transient, local limit
exceeded); a few more connections than that are read only to be rejected, any further are
closed at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from config import Settings
from config.settings import ConfigError
from server.dimse.association import (
    Association,
    BufferSink,
    Context,
    DataSink,
    Message,
    configure_socket,
)
from server.dimse.c_echo import handle_c_echo
from server.dimse.c_find import handle_c_find
from server.dimse.c_get import handle_c_get
from server.dimse.c_move import handle_c_move
from server.dimse.c_store import ReceivedDataSet, handle_c_store
from server.dimse.commands import Command, CommandField
from server.dimse.identifier import INFORMATION_MODEL
from server.dimse.mpps import MODALITY_PERFORMED_PROCEDURE_STEP, handle_n_create, handle_n_set
from server.dimse.negotiation import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    LOCAL_LIMIT_EXCEEDED,
    AssociationRequest,
    Rejection,
    accept,
    read_association_request,
    reject,
    supported_context,
)
from server.dimse.pdu import (
    AbortReason,
    AssociationEnded,
    PduSocket,
    PeerAborted,
    PeerGone,
    ProtocolError,
    abort,
)
from server.dimse.statuses import UNRECOGNIZED_OPERATION
from server.dimse.tls import server_context
from storage.archive import Archive
from storage.group_commit import GroupCommit

log = logging.getLogger(__name__)

# Objects are stored as received, so every transfer syntax pydicom knows is accepted as-is:
# uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG/HEVC video.
TRANSFER_SYNTAXES = [str(uid) for uid in AllTransferSyntaxes]
# Verification and Query/Retrieve: the uncompressed ones (PS3.5 A.1, A.2, A.5).
VERIFICATION_SYNTAXES = TRANSFER_SYNTAXES[:4]
STORAGE_SOP_CLASSES = [str(context.abstract_syntax) for context in AllStoragePresentationContexts]
# A temporary data set untouched this long belongs to an aborted association. Generous: an
# ingest of a multi-gigabyte slide to a slow object store must never lose its file, and other
# processes may share the data directory.
STALE_TEMPORARY_FILE_AGE_S = 3600.0
# PS3.8 9.1.4 (ARTIM): how long a new connection may take to send its A-ASSOCIATE-RQ.
ASSOCIATION_REQUEST_TIMEOUT_S = 30.0
# Connections beyond max_associations still read (to be rejected politely); past this many
# more they are closed unread.
EXTRA_CONNECTIONS_TO_REJECT = 16

Handler = Callable[[Association, Message], None]


class DimseObserver(Protocol):
    """What the server tells whoever counts (``server.metrics.Metrics``); no patient data."""

    def association_opened(self) -> None: ...

    def association_closed(self, ending: str) -> None:
        """``ending``: released, aborted (by either side), or lost (the peer went away)."""

    def association_rejected(self) -> None: ...

    def dimse_request(self, service: str, status: int, seconds: float) -> None:
        """A request answered with final ``status``, ``seconds`` after it arrived."""

    def sub_operations(self, service: str, outcome: str, count: int) -> None:
        """C-STORE sub-operations of C-MOVE / C-GET: completed, warning or failed."""


class NoObserver:
    def association_opened(self) -> None:
        pass

    def association_closed(self, ending: str) -> None:
        pass

    def association_rejected(self) -> None:
        pass

    def dimse_request(self, service: str, status: int, seconds: float) -> None:
        pass

    def sub_operations(self, service: str, outcome: str, count: int) -> None:
        pass


def supported_contexts() -> list[PresentationContext]:
    contexts = [
        # PS3.4 C.4.3 / PS3.7 D.3.3.4: a C-GET SCU proposes the storage contexts with SCP/SCU
        # Role Selection so that Hilum sends the instances back over the same association.
        # Accepting either role keeps plain C-STORE (no role item) working as before.
        supported_context(sop_class, TRANSFER_SYNTAXES, scu_role=True)
        for sop_class in STORAGE_SOP_CLASSES
    ]
    contexts.append(supported_context(Verification, VERIFICATION_SYNTAXES))
    # Query/Retrieve: Patient Root and Study Root, FIND, MOVE and GET (PS3.4 C.6.1, C.6.2).
    contexts += [supported_context(uid, VERIFICATION_SYNTAXES) for uid in INFORMATION_MODEL]
    # PS3.4 F.7: Modality Performed Procedure Step, SCP (N-CREATE, N-SET).
    contexts.append(supported_context(MODALITY_PERFORMED_PROCEDURE_STEP, VERIFICATION_SYNTAXES))
    return contexts


def check_association_policy(settings: Settings) -> None:
    dimse = settings.dimse
    open_to_any = not (dimse.allowed_calling_ae_titles or settings.server.is_loopback)
    if open_to_any and not dimse.accept_any_calling_ae:
        raise ConfigError(
            f"[server] host = {settings.server.host!r} is reachable from the network, but "
            "no calling AE titles are allowed: set [dimse] allowed_calling_ae_titles = "
            "[...], or accept_any_calling_ae = true to accept any modality"
        )


class DimseServer:
    """The listening SCP. Data sets are received straight to files under ``<data_dir>/tmp``."""

    def __init__(
        self, settings: Settings, archive: Archive, observer: DimseObserver | None = None
    ) -> None:
        check_association_policy(settings)
        self.settings = settings
        self.archive = archive
        self.observer: DimseObserver = observer or NoObserver()
        self.tmp_dir = (settings.server.data_dir / "tmp").resolve()
        self._contexts = supported_contexts()
        self.ingest = GroupCommit(archive)
        self._listener: socket.socket | None = None
        self._tls_listener: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[PduSocket] = set()
        self._associations = 0
        self._handlers: dict[int, Handler] = {
            CommandField.C_ECHO_RQ: handle_c_echo,
            CommandField.C_STORE_RQ: functools.partial(handle_c_store, ingest=self.ingest),
            CommandField.C_FIND_RQ: functools.partial(
                handle_c_find, archive=archive, settings=settings
            ),
            CommandField.C_MOVE_RQ: functools.partial(
                handle_c_move, archive=archive, settings=settings
            ),
            CommandField.C_GET_RQ: functools.partial(
                handle_c_get, archive=archive, settings=settings
            ),
            CommandField.N_CREATE_RQ: functools.partial(handle_n_create, archive=archive),
            CommandField.N_SET_RQ: functools.partial(handle_n_set, archive=archive),
        }

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    @property
    def tls_port(self) -> int | None:
        return int(self._tls_listener.getsockname()[1]) if self._tls_listener else None

    def start(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporary_files(STALE_TEMPORARY_FILE_AGE_S)
        host, dimse = self.settings.server.host, self.settings.dimse
        # Several processes ([dimse] processes) listen on the same ports; one alone fails
        # loudly when another program holds the port.
        shared = dimse.processes > 1
        self._listener = socket.create_server((host, dimse.port), backlog=128, reuse_port=shared)
        self._start_accepting(self._listener, None)
        if dimse.tls_port:
            self._tls_listener = socket.create_server(
                (host, dimse.tls_port), backlog=128, reuse_port=shared
            )
            self._start_accepting(self._tls_listener, server_context(dimse))
        threading.Thread(target=self._janitor, name="dimse-tmp-janitor", daemon=True).start()
        log.info(
            "DIMSE SCP %s listening on %s:%d%s",
            dimse.ae_title,
            host,
            self.port,
            f", DICOM TLS on {self.tls_port}" if self._tls_listener else "",
        )

    def _start_accepting(self, listener: socket.socket, tls: ssl.SSLContext | None) -> None:
        threading.Thread(
            target=self._accept_loop,
            args=(listener, tls),
            name="dimse-accept-tls" if tls else "dimse-accept",
            daemon=True,
        ).start()

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for wire in connections:
            wire.close()

    # -- connections ----------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket, tls: ssl.SSLContext | None) -> None:
        limit = self.settings.dimse.max_associations + EXTRA_CONNECTIONS_TO_REJECT
        while not self._stop.is_set():
            try:
                sock, address = listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)  # EMFILE and the like: let other connections end first
                continue
            with self._lock:
                crowded = len(self._connections) >= limit
            if crowded:
                log.warning("connection from %s closed: %d connections open", address[0], limit)
                sock.close()
                continue
            threading.Thread(
                target=self._serve_connection,
                args=(sock, f"{address[0]}:{address[1]}", tls),
                name=f"dimse-{address[0]}:{address[1]}",
                daemon=True,
            ).start()

    def _serve_connection(self, sock: socket.socket, peer: str, tls: ssl.SSLContext | None) -> None:
        timeout = self.settings.dimse.network_timeout_s
        configure_socket(sock)
        if tls is not None:
            try:
                sock = handshake(sock, tls, ASSOCIATION_REQUEST_TIMEOUT_S)
            except (ssl.SSLError, OSError) as error:
                log.info("DICOM TLS connection from %s refused: %s", peer, error)
                sock.close()
                return
        wire = PduSocket(sock, idle_timeout=timeout, pdu_timeout=timeout)
        with self._lock:
            self._connections.add(wire)
        assoc: Association | None = None
        admitted = False
        try:
            request = read_association_request(wire, ASSOCIATION_REQUEST_TIMEOUT_S)
            with self._lock:
                admitted = self._associations < self.settings.dimse.max_associations
                self._associations += admitted
            rejection = self._rejection(request, admitted)
            if rejection is not None:
                log.info(
                    "association from %s (%s -> %s) rejected: %s",
                    peer,
                    request.calling_ae_title,
                    request.called_ae_title,
                    rejection.why,
                )
                reject(wire, request, rejection)
                self.observer.association_rejected()
                return
            assoc = accept(
                wire,
                request,
                self._contexts,
                max_pdu_length=self.settings.dimse.max_pdu_length,
                peer_address=peer,
            )
            self.observer.association_opened()
            self._serve(assoc)
            ending = "released"
        except ProtocolError as error:
            log.warning("[%s] %s: aborted: %s", _name(assoc), peer, error)
            _send_abort(wire, error.reason)
            ending = "aborted"
        except PeerAborted as error:
            log.info("[%s] %s: %s", _name(assoc), peer, error)
            ending = "aborted"
        except PeerGone as error:
            log.info("[%s] connection from %s ended: %s", _name(assoc), peer, error)
            ending = "lost"
        except Exception:
            log.exception("[%s] association from %s failed", _name(assoc), peer)
            _send_abort(wire, AbortReason.NOT_SPECIFIED)
            ending = "aborted"
        finally:
            with self._lock:
                self._connections.discard(wire)
                self._associations -= admitted
            wire.close()
            if assoc is not None:
                self.observer.association_closed(ending)
                _log_association(assoc)

    def _rejection(self, request: AssociationRequest, admitted: bool) -> Rejection | None:
        dimse = self.settings.dimse
        allowed = dimse.allowed_calling_ae_titles
        if allowed and request.calling_ae_title not in allowed:
            return Rejection(
                *CALLING_AE_NOT_RECOGNIZED, f"calling AE {request.calling_ae_title!r} not allowed"
            )
        if dimse.require_called_ae_title and request.called_ae_title != dimse.ae_title:
            return Rejection(
                *CALLED_AE_NOT_RECOGNIZED, f"called AE {request.called_ae_title!r} is not ours"
            )
        if not admitted:
            return Rejection(
                *LOCAL_LIMIT_EXCEEDED, f"{dimse.max_associations} associations already open"
            )
        return None

    def _serve(self, assoc: Association) -> None:
        receiving: list[ReceivedDataSet] = []

        def sink_for(command: Command, context: Context) -> DataSink:
            if command.field == CommandField.C_STORE_RQ:
                received = ReceivedDataSet(
                    self.tmp_dir, command, context, self.archive.limits.instance_max_bytes
                )
                receiving.append(received)
                return received
            return BufferSink()

        try:
            while True:
                message = assoc.receive_message(sink_for)
                if message is None:
                    return  # released
                self._dispatch(assoc, message)
                receiving.clear()  # C-STORE removed its file
        finally:
            for received in receiving:  # a data set cut short by an abort or a lost peer
                received.remove()

    def _dispatch(self, assoc: Association, message: Message) -> None:
        field = message.command.field
        handler = self._handlers.get(field)
        if handler is not None:
            service = CommandField(field).name.removesuffix("_RQ").replace("_", "-")
            assoc.stats.services.add(service)
            started = time.monotonic()
            before = dict(assoc.stats.sub_operations)
            handler(assoc, message)
            status = assoc.last_status if assoc.last_status is not None else 0
            self.observer.dimse_request(service, status, time.monotonic() - started)
            for outcome, count in assoc.stats.sub_operations.items():
                if count > before.get(outcome, 0):
                    self.observer.sub_operations(service, outcome, count - before.get(outcome, 0))
        elif field == CommandField.C_CANCEL_RQ:
            return  # PS3.7 9.3.2.3: a cancel of a request already answered
        elif field & 0x8000:
            raise ProtocolError(
                f"a response (0x{field:04X}) to no request", AbortReason.UNEXPECTED_PDU
            )
        else:
            self._unrecognized(assoc, message)

    def _unrecognized(self, assoc: Association, message: Message) -> None:
        """PS3.7 C.4.2: a request of a service Hilum does not provide (N-GET, N-ACTION, ...)."""
        log.info("[%s] unrecognized command 0x%04X", assoc.name, message.command.field)
        assoc.send_command(
            message.context,
            {
                "AffectedSOPClassUID": message.command.get("AffectedSOPClassUID"),
                "CommandField": message.command.field | 0x8000,
                "MessageIDBeingRespondedTo": message.message_id,
                "Status": UNRECOGNIZED_OPERATION,
            },
        )

    # -- temporary files ------------------------------------------------------------------

    def remove_stale_temporary_files(self, max_age_s: float) -> int:
        """Remove data sets left by associations aborted mid-transfer, or by a killed process.

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


def handshake(sock: socket.socket, tls: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    """The TLS handshake of an accepted connection, within ``timeout``."""
    sock.settimeout(timeout)
    return tls.wrap_socket(sock, server_side=True)


def _name(assoc: Association | None) -> str:
    return assoc.name if assoc is not None else "-"


def _send_abort(wire: PduSocket, reason: AbortReason) -> None:
    with contextlib.suppress(AssociationEnded):
        wire.send(abort(reason))


def _log_association(assoc: Association) -> None:
    stats = assoc.stats
    log.info(
        "[%s] association %s -> %s from %s: %s; %d stored, %d refused; %.1f s",
        assoc.name,
        assoc.calling_ae_title,
        assoc.called_ae_title,
        assoc.peer_address,
        ", ".join(sorted(stats.services)) or "no request",
        stats.stored,
        stats.refused,
        time.monotonic() - assoc.started,
    )
