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
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from config import Settings
from config.logging import log_context
from config.settings import ConfigError
from server.access import Action
from server.context import Principal, RequestContext
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
from server.dimse.identifier import FIND_SOP_CLASSES, INFORMATION_MODEL
from server.dimse.mpps import MODALITY_PERFORMED_PROCEDURE_STEP, handle_n_create, handle_n_set
from server.dimse.negotiation import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    LOCAL_LIMIT_EXCEEDED,
    NO_REASON_TRANSIENT,
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
    MessageBroken,
    PduSocket,
    PeerAborted,
    PeerGone,
    ProtocolError,
    abort,
)
from server.dimse.statuses import NOT_AUTHORIZED, UNRECOGNIZED_OPERATION, error_comment
from server.dimse.tls import server_context
from storage.ae_permissions import AssociationPolicy, any_ae_permissions, association_policy
from storage.archive import Archive
from storage.errors import StorageError
from storage.group_commit import GroupCommit
from storage.settings_seed import seed_from_settings

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
# (calling, called) pairs whose last policy is kept for an index outage; emptied when full.
LAST_POLICIES_KEPT = 4096

Handler = Callable[[Association, Message], None]
# The action each request needs (server.access); C-ECHO needs none.
REQUIRED_ACTION: dict[int, Action] = {
    CommandField.C_STORE_RQ: Action.STORE,
    CommandField.C_FIND_RQ: Action.QUERY,
    CommandField.C_MOVE_RQ: Action.RETRIEVE,
    CommandField.C_GET_RQ: Action.RETRIEVE,
    # Modality Performed Procedure Step: what a modality that may store reports.
    CommandField.N_CREATE_RQ: Action.STORE,
    CommandField.N_SET_RQ: Action.STORE,
}
DIMSE_ACTIONS_ORDER = (Action.STORE, Action.QUERY, Action.RETRIEVE)
DIMSE_ACTIONS = frozenset(DIMSE_ACTIONS_ORDER)


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


def supported_contexts(actions: frozenset[Action] = DIMSE_ACTIONS) -> list[PresentationContext]:
    """The contexts an association allowed ``actions`` may have accepted: the others are
    rejected at negotiation (PS3.8 Table 9-18: abstract syntax not supported)."""
    contexts = []
    if actions & {Action.STORE, Action.RETRIEVE}:
        # PS3.4 C.4.3 / PS3.7 D.3.3.4: a C-GET SCU proposes the storage contexts with SCP/SCU
        # Role Selection so that Hilum sends the instances back over the same association.
        # Accepting either role keeps plain C-STORE (no role item) working as before; a
        # C-STORE from an AE that may retrieve but not store is refused with 0x0124.
        contexts += [
            supported_context(sop_class, TRANSFER_SYNTAXES, scu_role=True)
            for sop_class in STORAGE_SOP_CLASSES
        ]
    contexts.append(supported_context(Verification, VERIFICATION_SYNTAXES))
    # Query/Retrieve: Patient Root and Study Root, FIND, MOVE and GET (PS3.4 C.6.1, C.6.2).
    for uid in INFORMATION_MODEL:
        if (Action.QUERY if uid in FIND_SOP_CLASSES else Action.RETRIEVE) in actions:
            contexts.append(supported_context(uid, VERIFICATION_SYNTAXES))
    if Action.STORE in actions:
        # PS3.4 F.7: Modality Performed Procedure Step, SCP (N-CREATE, N-SET), from modalities.
        contexts.append(supported_context(MODALITY_PERFORMED_PROCEDURE_STEP, VERIFICATION_SYNTAXES))
    return contexts


def check_association_policy(settings: Settings, archive: Archive) -> None:
    """Refuse to serve the network to any calling AE unless the settings say so."""
    if not open_to_any_calling_ae(settings) and not any_ae_permissions(archive.index):
        raise ConfigError(
            f"[server] host = {settings.server.host!r} is reachable from the network, but "
            "no calling AE titles are allowed: add AE permissions (`hilum ae add`, or [dimse] "
            "allowed_calling_ae_titles = [...] / [[dimse.ae_permissions]] on first start), "
            "or set accept_any_calling_ae = true to accept any modality"
        )


def open_to_any_calling_ae(settings: Settings) -> bool:
    """Whether, with no AE permission stored, any calling AE may associate."""
    return settings.server.is_loopback or settings.dimse.accept_any_calling_ae


@dataclass(frozen=True)
class Admission:
    """An association request accepted by the policy: its partition and what it may do."""

    partition: str
    actions: frozenset[Action]


class DiscardedDataSet:
    """Where the data set of a C-STORE that will be refused goes: nowhere."""

    def write(self, chunk: memoryview) -> None:
        pass


class DimseServer:
    """The listening SCP. Data sets are received straight to files under ``<data_dir>/tmp``."""

    def __init__(
        self, settings: Settings, archive: Archive, observer: DimseObserver | None = None
    ) -> None:
        # [[dimse.ae_permissions]] and [[dimse.peers]] seed the index on first start.
        seed_from_settings(archive.index, settings)
        check_association_policy(settings, archive)
        self.settings = settings
        self.archive = archive
        self.observer: DimseObserver = observer or NoObserver()
        self.tmp_dir = (settings.server.data_dir / "tmp").resolve()
        # What an association may do decides which contexts it may have: one list per case.
        self._contexts = {
            actions: supported_contexts(actions)
            for actions in (
                frozenset(a for a, on in zip(DIMSE_ACTIONS_ORDER, bits, strict=True) if on)
                for bits in itertools.product((False, True), repeat=len(DIMSE_ACTIONS_ORDER))
            )
        }
        # One group commit per partition: a group's files go into one partition.
        self._ingest: dict[str, GroupCommit] = {}
        # The last policy read for each (calling, called) pair: used while the index is down.
        self._last_policies: dict[tuple[str, str], AssociationPolicy] = {}
        self._listener: socket.socket | None = None
        self._tls_listener: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[PduSocket] = set()
        self._associations = 0

    def ingest_for(self, partition: str) -> GroupCommit:
        """The group commit storing into ``partition``."""
        with self._lock:
            ingest = self._ingest.get(partition)
            if ingest is None:
                ingest = self._ingest[partition] = GroupCommit(self.archive.scoped(partition))
            return ingest

    def _handlers_for(self, assoc: Association) -> dict[int, Handler]:
        """The handlers of one association, each working on its partition only."""
        archive = self.archive.scoped(assoc.context.partition)
        settings = self.settings
        return {
            CommandField.C_ECHO_RQ: handle_c_echo,
            CommandField.C_STORE_RQ: functools.partial(
                handle_c_store, ingest=self.ingest_for(assoc.context.partition)
            ),
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
        # Every line logged for this connection names its peer, and its association once
        # accepted (config/logging.py).
        with log_context(peer=peer), contextlib.ExitStack() as association_logs:
            self._serve_peer(sock, peer, tls, association_logs)

    def _serve_peer(
        self,
        sock: socket.socket,
        peer: str,
        tls: ssl.SSLContext | None,
        association_logs: contextlib.ExitStack,
    ) -> None:
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
            decision = self._association_policy(request, peer.rpartition(":")[0], admitted)
            if isinstance(decision, Rejection):
                rejection = decision
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
                self._contexts[decision.actions],
                max_pdu_length=self.settings.dimse.max_pdu_length,
                peer_address=peer,
            )
            association_logs.enter_context(log_context(association=assoc.name))
            # The one place an association learns who it is, what it may do and where.
            assoc.permitted = decision.actions
            assoc.context = RequestContext(
                Principal("ae", request.calling_ae_title,
                          partitions=frozenset({decision.partition})),
                peer.rpartition(":")[0],
                "dimse",
                partition=decision.partition,
                request_id=assoc.name,
            )  # fmt: skip
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
        except MessageBroken as error:  # its A-ABORT already sent
            log.error("[%s] %s: %s", _name(assoc), peer, error)
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
                self._record_transfer(assoc)
                self.observer.association_closed(ending)
                _log_association(assoc)

    def _record_transfer(self, assoc: Association) -> None:
        """The DICOM Instances Transferred record of each study the peer sent (PS3.15
        A.5.3.7: when the transfer has completed). Its Begin Transferring record was written
        with the study's first instance; if this one cannot be written the instances are
        stored and audited as begun, and the gap is logged for the administrator."""
        if assoc.transfer is None:
            return
        entries = assoc.transfer.completion_entries()
        if not entries:
            return
        try:
            self.archive.record(assoc.context, *entries)
        except StorageError as error:
            log.error(
                "[%s] audit: the end of the transfer of %d studies not recorded: %s",
                assoc.name,
                len(entries),
                error,
            )

    def _association_policy(
        self, request: AssociationRequest, address: str, admitted: bool
    ) -> Admission | Rejection:
        """Who may associate, in which partition, to do what (PS3.8 7.1.1.3, Table 9-21):
        the Called AE Title selects the partition (``[dimse] ae_title``: default; a partition's
        AE title: that partition; another: rejected when ``require_called_ae_title``, else
        default); the calling AE's permission in it (and its networks) says what it may do.
        With no AE permission stored at all, any calling AE may do everything, where
        :func:`open_to_any_calling_ae`. One index read per association."""
        dimse = self.settings.dimse
        calling, called = request.calling_ae_title, request.called_ae_title
        if not admitted:
            return Rejection(
                *LOCAL_LIMIT_EXCEEDED, f"{dimse.max_associations} associations already open"
            )
        try:
            policy = association_policy(
                self.archive.index,
                calling,
                called,
                default_ae_title=dimse.ae_title,
                unknown_called_is_default=not dimse.require_called_ae_title,
            )
            with self._lock:
                if len(self._last_policies) >= LAST_POLICIES_KEPT:
                    self._last_policies.clear()
                self._last_policies[(calling, called)] = policy
        except StorageError as error:
            # The index is down: a peer admitted before is admitted as it was then, so that
            # its C-STORE gets Out of Resources (0xA700: retry later) as without a policy;
            # it can store or read nothing meanwhile. Any other peer: rejected, transient.
            with self._lock:
                last = self._last_policies.get((calling, called))
            if last is None:
                return Rejection(*NO_REASON_TRANSIENT, f"the index cannot be read: {error}")
            log.warning("index unreadable (%s): %s -> %s as last admitted", error, calling, called)
            policy = last
        if policy.partition is None:
            return Rejection(*CALLED_AE_NOT_RECOGNIZED, f"called AE {called!r} is not ours")
        if not policy.restricted:
            if open_to_any_calling_ae(self.settings):
                return Admission(policy.partition, DIMSE_ACTIONS)
            return Rejection(
                *CALLING_AE_NOT_RECOGNIZED, f"calling AE {calling!r}: no AE permission stored"
            )
        permission = policy.permission
        if permission is None:
            return Rejection(
                *CALLING_AE_NOT_RECOGNIZED,
                f"calling AE {calling!r} has no permission in partition {policy.partition}",
            )
        if not permission.allows_address(address):
            return Rejection(
                *CALLING_AE_NOT_RECOGNIZED,
                f"calling AE {calling!r} is not allowed from {address}",
            )
        actions = frozenset(
            action
            for action, on in (
                (Action.STORE, permission.store),
                (Action.QUERY, permission.query),
                (Action.RETRIEVE, permission.retrieve),
            )
            if on
        )
        return Admission(policy.partition, actions)

    def _serve(self, assoc: Association) -> None:
        receiving: list[ReceivedDataSet] = []
        handlers = self._handlers_for(assoc)

        def sink_for(command: Command, context: Context) -> DataSink:
            if command.field == CommandField.C_STORE_RQ:
                if Action.STORE not in assoc.permitted:
                    return DiscardedDataSet()  # refused with 0x0124 once it has arrived
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
                self._dispatch(assoc, message, handlers)
                receiving.clear()  # C-STORE removed its file
        finally:
            for received in receiving:  # a data set cut short by an abort or a lost peer
                received.remove()

    def _dispatch(self, assoc: Association, message: Message, handlers: dict[int, Handler]) -> None:
        field = message.command.field
        handler = handlers.get(field)
        if handler is not None:
            service = CommandField(field).name.removesuffix("_RQ").replace("_", "-")
            assoc.stats.services.add(service)
            started = time.monotonic()
            before = dict(assoc.stats.sub_operations)
            needed = REQUIRED_ACTION.get(field)
            if needed is not None and needed not in assoc.permitted:
                _refuse_not_authorized(assoc, message, service)
            else:
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


def _refuse_not_authorized(assoc: Association, message: Message, service: str) -> None:
    """0x0124 Refused: Not authorized (PS3.7 Annex C, the status codes common to every
    service), for a request the calling AE may not make on a context it has (a C-STORE on the
    storage contexts of an AE allowed C-GET only; a C-FIND sent on a C-MOVE context)."""
    log.warning(
        "[%s] %s from %s refused: not permitted in partition %s",
        assoc.name,
        service,
        assoc.calling_ae_title,
        assoc.context.partition,
    )
    if message.command.field == CommandField.C_STORE_RQ:
        assoc.stats.refused += 1
    values = {
        "AffectedSOPClassUID": message.command.get("AffectedSOPClassUID")
        or message.context.abstract_syntax,
        "CommandField": message.command.field | 0x8000,
        "MessageIDBeingRespondedTo": message.message_id,
        "Status": NOT_AUTHORIZED,
        "ErrorComment": error_comment(f"{service} not permitted for {assoc.calling_ae_title}"),
    }
    if message.command.field == CommandField.C_STORE_RQ:
        values["AffectedSOPInstanceUID"] = message.command.get("AffectedSOPInstanceUID", "")
    assoc.send_command(message.context, values)


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
