"""The ``hilum`` command: serve, dimse, db upgrade, import, verify; partitions, ae, peers."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pydicom.config  # noqa: F401  (imported first: it resets its logger level on import)

from config import Settings, load_settings
from config.logging import configure_logging
from config.settings import ConfigError
from inference.errors import ModelError
from server.admin_commands import ADMIN_COMMANDS, add_admin_commands
from storage.archive import Archive, open_archive
from storage.audit import AuditEvent
from storage.errors import InvalidArgument, StorageError

if TYPE_CHECKING:
    from server.app import HttpServer
    from server.metrics import Metrics
    from storage.accounts import Accounts

log = logging.getLogger("hilum")
_Bound = TypeVar("_Bound")
# A worker runs one job at a time: its own queries, its lease's heartbeat, a metrics scrape;
# and the orphan janitor's sweep (its lock's connection and its reads).
WORKER_CONNECTIONS = 6


def check_exposure(settings: Settings, command: str) -> None:
    """``hilum serve``, ``web`` and ``dimse`` refuse to listen beyond loopback with
    authentication off, unless ``[auth] insecure_allow_unauthenticated`` says so (then warn at
    every start): an archive of patient data open to whoever reaches the port."""
    if settings.auth.enabled or settings.server.is_loopback:
        return
    if not settings.auth.insecure_allow_unauthenticated:
        raise ConfigError(
            f"`hilum {command}` would listen on [server] host = {settings.server.host!r}, which "
            "is reachable from the network, with [auth] enabled = false: anyone reaching the "
            "port could read and change every study. Turn authentication on ([auth] enabled = "
            "true, then `hilum users add` / `hilum tokens create`; docs/operations.md, "
            "Authentication), or listen on 127.0.0.1, or, only if something in front of Hilum "
            "authenticates every request, set [auth] insecure_allow_unauthenticated = true"
        )
    log.warning(
        "authentication is OFF while listening on %s ([auth] insecure_allow_unauthenticated = "
        "true): whoever reaches the ports can read, store and change every study",
        settings.server.host,
    )


def _run_dimse(settings: Settings, args: argparse.Namespace, *, all_in_one: bool) -> int:
    """``hilum dimse``; with ``all_in_one``, ``hilum serve``: migrate the index first, and serve
    HTTP (DICOMweb) on ``[http] port`` and one AI worker in threads beside the DIMSE SCP.

    With ``[dimse] processes`` > 1 this process starts that many minus one more receiving
    processes (``hilum dimse --receiver``) on the same ports, and stops them when it stops;
    their metrics are added up with its own (prometheus_client's multiprocess mode)."""
    if settings.dimse.processes > 1 and not args.receiver:
        _prepare_multiprocess_metrics(settings.server.data_dir / "metrics" / "dimse")
    from server.dimse.ae import DimseServer
    from server.metrics import Metrics, MetricsServer
    from storage.tiers import marking_reads

    connections = settings.dimse.max_associations
    if all_in_one:  # the HTTP server's threads and the worker share the pool
        connections += settings.http.threads + WORKER_CONNECTIONS + 2  # + event delivery
    archive = open_archive(settings, migrate=all_in_one, connections=connections)
    metrics = Metrics()
    received = dataclasses.replace(
        archive, on_ingest=metrics.ingest_observer("dimse"), blobs=marking_reads(archive)
    )
    server = DimseServer(settings, received, metrics)
    host = settings.server.host
    _binding("DIMSE", host, settings.dimse.port, server.start)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    if args.receiver:
        # A receiving process of another hilum: it lives as long as its parent holds the pipe.
        threading.Thread(target=_stop_at_end_of_input, args=(stopped,), daemon=True).start()
        stopped.wait()
        server.stop()
        archive.close()
        return 0
    receivers = _start_receivers(args, settings.dimse.processes - 1)
    http = None
    if all_in_one:
        http = _binding("HTTP", host, settings.http.port,
                        lambda: _start_http_server(settings, archive, metrics))  # fmt: skip
    worker = _start_worker_thread(settings, archive, metrics) if all_in_one else None
    delivery = _start_delivery_thread(settings, archive) if all_in_one else None
    janitor = _start_orphan_janitor(settings, archive) if all_in_one else None
    metrics_server = None
    if not all_in_one and settings.metrics.port:
        port = settings.metrics.port
        metrics_server = _binding("metrics", host, port, lambda: MetricsServer(metrics, host, port))
    print(
        f"Hilum is listening: DICOM {settings.dimse.ae_title}@{settings.server.host}:"
        f"{server.port}; index {settings.database_url_for_display}; blobs {settings.blob_url}"
        + (
            f"; HTTP {settings.http.scheme}://{settings.server.host}:{http.port}/dicomweb"
            if http
            else ""
        )
        + (f"; metrics on port {metrics_server.port}" if metrics_server else ""),
        flush=True,
    )
    stopped.wait()
    log.info("shutting down")
    server.stop()
    _stop_receivers(receivers)
    if metrics_server is not None:
        metrics_server.stop()
    if http is not None:
        http.stop()
    if worker is not None:
        worker[0].set()  # the job in progress finishes first
        worker[1].join()
    if delivery is not None:
        delivery[0].set()  # the delivery in progress finishes first
        delivery[1].join(settings.events.timeout_s + 5)
    _stop_orphan_janitor(janitor)
    archive.close()
    return 0


def _binding(service: str, host: str, port: int, bind: Callable[[], _Bound]) -> _Bound:
    """``bind()``, its "address already in use" said with the port and the service."""
    try:
        return bind()
    except OSError as error:
        # cheroot wraps the bind error in one of its own, without its errno.
        in_use = error.errno == errno.EADDRINUSE or os.strerror(errno.EADDRINUSE) in str(error)
        if not in_use:
            raise
        raise OSError(
            errno.EADDRINUSE,
            f"{service} port {port} on {host} is already in use (another Hilum, or another "
            "program): stop it, or set another port",
        ) from error


def _start_receivers(args: argparse.Namespace, count: int) -> list[subprocess.Popen]:
    """More receiving processes on the DIMSE ports, each reading its stdin (this process's
    pipe) so that it stops when this process ends, however it ends."""
    command = [sys.executable, "-m", "server.cli"]
    if args.config:
        command += ["--config", str(args.config)]
    if args.verbose:
        command.append("--verbose")
    return [
        subprocess.Popen([*command, "dimse", "--receiver"], stdin=subprocess.PIPE)
        for _ in range(count)
    ]


def _stop_receivers(receivers: list[subprocess.Popen]) -> None:
    for process in receivers:
        process.terminate()
    for process in receivers:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def _stop_at_end_of_input(stopped: threading.Event) -> None:
    sys.stdin.buffer.read()  # returns at end of file: the parent closed the pipe or died
    stopped.set()


def _start_http_server(settings: Settings, archive: Archive, metrics: Metrics) -> HttpServer:
    from server.app import HttpServer, create_app, https_files
    from server.request_deadlines import RequestLimits

    http = HttpServer(
        create_app(settings, dataclasses.replace(archive), metrics),  # the app's own copy
        settings.server.host,
        settings.http.port,
        threads=settings.http.threads,
        limits=RequestLimits.from_settings(settings.http),
        tls=https_files(settings),
    )
    http.start()
    return http


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    check_exposure(settings, "web")
    _prepare_multiprocess_metrics(settings.server.data_dir / "metrics" / "web")
    from server.app import serve_with_gunicorn

    # Fail here, not in every worker, if the index is not ready.
    open_archive(settings, connections=1).close()
    # gunicorn retries a busy port for seconds, then says "Connection in use" without naming
    # Hilum's service or setting: find out first.
    host, port = settings.server.host, settings.http.port
    _binding("HTTP", host, port, lambda: _bind_and_release(host, port))
    serve_with_gunicorn(settings)
    return 0


def _bind_and_release(host: str, port: int) -> None:
    """Bind ``host``:``port`` as gunicorn will (SO_REUSEADDR), then let it go."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socket.create_server((host, port), family=family).close()


def _prepare_multiprocess_metrics(default: Path) -> None:
    """Before anything imports prometheus_client: the directory of its multiprocess mode, in
    which gunicorn's workers add up their metrics (``$PROMETHEUS_MULTIPROC_DIR``, the
    library's own switch, read once when it is imported; else ``default``), emptied of a
    previous run's files as the library requires. The workers inherit the variable."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess mode was set")
    directory = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or default).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def _start_worker_thread(
    settings: Settings, archive: Archive, metrics: Metrics
) -> tuple[threading.Event, threading.Thread] | None:
    if not settings.inference.serve_worker:
        return None
    from inference.registry import load_models
    from inference.worker import Worker

    _observe_gpu_memory(settings, metrics)
    worker = Worker(
        settings,
        archive,
        load_models(settings.inference.models_dirs),
        on_job_ended=metrics.job_observer(),
    )
    stop = threading.Event()
    tier_moves = _start_tier_moves(settings, archive, stop)

    def run() -> None:
        worker.run(stop)
        if tier_moves is not None:
            tier_moves.join()  # the study being moved is finished first

    thread = threading.Thread(target=run, name="ai-worker", daemon=True)
    thread.start()
    return stop, thread


def _start_orphan_janitor(
    settings: Settings, archive: Archive
) -> tuple[threading.Event, threading.Thread] | None:
    """The periodic orphan sweep of ``hilum serve`` and ``hilum worker`` (storage/janitor.py
    says why those, and how several of them take turns)."""
    from storage.janitor import OrphanJanitor

    storage = settings.storage
    if not storage.orphan_sweep_interval_s:
        return None
    janitor = OrphanJanitor(
        archive, interval_s=storage.orphan_sweep_interval_s, grace_s=storage.orphan_grace_s
    )
    return janitor.start()


def _stop_orphan_janitor(janitor: tuple[threading.Event, threading.Thread] | None) -> None:
    if janitor is not None:
        janitor[0].set()  # a sweep in progress is waited for a while (each delete is whole)
        janitor[1].join(30)


def _start_tier_moves(
    settings: Settings, archive: Archive, stop: threading.Event
) -> threading.Thread | None:
    """The periodic storage-tier moves of the AI worker ([storage] tiers_interval_h), in a
    thread of their own so that AI jobs do not wait for them; the thread ends once ``stop``
    (the worker's) is set and the study being moved is done."""
    if not settings.storage.tiers or not settings.storage.tiers_interval_h:
        return None
    from storage.tiers import apply_tiers_periodically

    thread = threading.Thread(
        target=apply_tiers_periodically,
        args=(archive, settings.storage.tiers, settings.server.data_dir / "tmp",
              settings.storage.tiers_interval_h * 3600, stop),
        name="tier-moves", daemon=True,
    )  # fmt: skip
    thread.start()
    return thread


def _observe_gpu_memory(settings: Settings, metrics: Metrics) -> None:
    """The memory of the GPU the AI worker uses, on its metrics (none on the CPU)."""
    from inference.analysis import default_device
    from server.metrics import GpuMemory, read_cuda_memory

    device = settings.inference.device or default_device()
    metrics.collectors.append(GpuMemory(lambda: read_cuda_memory(device)))


def _start_delivery_thread(
    settings: Settings, archive: Archive
) -> tuple[threading.Event, threading.Thread] | None:
    """``hilum serve``'s event delivery loop (webhooks, FHIR push), when there is anything to
    deliver to and ``[events] serve_delivery`` is on."""
    from server.events.delivery import DeliveryLoop, subscribers_from_settings

    subscribers = subscribers_from_settings(settings, archive)
    if not settings.events.serve_delivery or not subscribers:
        return None
    stop = threading.Event()
    loop = DeliveryLoop(settings, archive, subscribers)
    thread = threading.Thread(target=loop.run, args=(stop,), name="event-delivery", daemon=True)
    thread.start()
    return stop, thread


def cmd_events(settings: Settings, args: argparse.Namespace) -> int:
    """``hilum events``: the event delivery loop on its own (scale-out: any number of them)."""
    from server.events.delivery import DeliveryLoop, subscribers_from_settings
    from server.metrics import Metrics, MetricsServer

    archive = open_archive(settings, connections=4)
    subscribers = subscribers_from_settings(settings, archive)
    loop = DeliveryLoop(settings, archive, subscribers)
    metrics_server = None
    if settings.metrics.port:  # /metrics, and the container's health check
        host, port = settings.server.host, settings.metrics.port
        metrics_server = _binding(
            "metrics", host, port, lambda: MetricsServer(Metrics(), host, port, archive=archive)
        )
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    print(
        f"Hilum events is delivering to {len(subscribers)} subscribers "
        f"({', '.join(s.name for s in subscribers) or 'none: see [[events.webhooks]]'}); index "
        f"{settings.database_url_for_display}"
        + (f"; metrics on port {metrics_server.port}" if metrics_server else ""),
        flush=True,
    )
    loop.run(stopped)
    if metrics_server is not None:
        metrics_server.stop()
    archive.close()
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from inference.analysis import default_device
    from inference.registry import load_models
    from inference.worker import Worker
    from server.metrics import Metrics, MetricsServer

    models = load_models(settings.inference.models_dirs)
    archive = open_archive(settings, connections=WORKER_CONNECTIONS)
    metrics = Metrics()
    _observe_gpu_memory(settings, metrics)
    worker = Worker(settings, archive, models, on_job_ended=metrics.job_observer())
    metrics_server = None
    if settings.metrics.port:
        host, port = settings.server.host, settings.metrics.port
        metrics_server = _binding(
            "metrics", host, port, lambda: MetricsServer(metrics, host, port, archive=archive)
        )
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    print(
        f"Hilum worker {worker.name} is running {len(models)} models "
        f"({', '.join(m.name for m in models) or 'none'}) on "
        f"{settings.inference.device or default_device()}; index "
        f"{settings.database_url_for_display}"
        + (f"; metrics on port {metrics_server.port}" if metrics_server else ""),
        flush=True,
    )
    tier_moves = _start_tier_moves(settings, archive, stopped)
    janitor = _start_orphan_janitor(settings, archive)
    worker.run(stopped)  # a stop request lets the job in progress finish
    if tier_moves is not None:
        tier_moves.join()  # the study being moved is finished first
    _stop_orphan_janitor(janitor)
    if metrics_server is not None:
        metrics_server.stop()
    archive.close()
    return 0


def cmd_viewer(settings: Settings, args: argparse.Namespace) -> int:
    """``hilum viewer install``: the pinned OHIF viewer into ``[web] ohif_dir`` (web/ohif.py)."""
    from web.ohif import OHIF_VERSION, ViewerInstallError, install_ohif, ohif_dir

    target = args.dir or ohif_dir(settings)
    try:
        fresh = install_ohif(target, tarball=args.tarball)
    except ViewerInstallError as error:
        print(f"hilum: viewer not installed: {error}", file=sys.stderr)
        return 1
    state = "installed" if fresh else "already installed"
    print(f"OHIF viewer {OHIF_VERSION} {state} in {target}; open http://HOST:PORT/viewer")
    return 0


def cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    from inference.registry import load_models

    models = load_models(settings.inference.models_dirs)
    for model in models:
        manifest = model.manifest
        applies = manifest.applies_to
        series = ", ".join(
            f"{name}={'|'.join(values)}"
            for name, values in (
                ("Modality", applies.modalities),
                ("SOPClassUID", applies.sop_class_uids),
                ("BodyPartExamined", applies.body_parts),
            )
            if values
        )
        outputs = "+".join(
            n for n, on in (("SEG", manifest.outputs.seg), ("SR", manifest.outputs.sr)) if on
        )
        print(
            f"{model.name} {model.version}  {manifest.kind}  {series or 'any series'}  -> {outputs}"
        )
        labels = ", ".join(label.label for label in manifest.labels)
        print(f"    {manifest.algorithm_name}; labels: {labels}")
        print(f"    {model.path}")
    dirs = ", ".join(map(str, settings.inference.models_dirs))
    print(f"{len(models)} models in {dirs}")
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    check_exposure(settings, "serve")
    args.receiver = False
    return _run_dimse(settings, args, all_in_one=True)


def cmd_dimse(settings: Settings, args: argparse.Namespace) -> int:
    check_exposure(settings, "dimse")
    return _run_dimse(settings, args, all_in_one=False)


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    from storage.index.database import create_index_engine, upgrade_database

    engine = create_index_engine(settings.database_url, pool_size=1)
    upgrade_database(engine)
    engine.dispose()
    print(f"index database {settings.database_url_for_display} is at the newest schema")
    return 0


def cmd_echo(settings: Settings, args: argparse.Namespace) -> int:
    """C-ECHO (PS3.4 A.4, Verification) to this configuration's DIMSE SCP: the health check of
    ``hilum dimse`` (a real association, accepted and answered, not just an open port)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    # Bound to every address: ask over loopback.
    host = args.host or (
        "127.0.0.1" if settings.server.host in ("0.0.0.0", "::", "") else settings.server.host
    )
    ae = AE(ae_title=args.calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    where = f"{settings.dimse.ae_title}@{host}:{settings.dimse.port}"
    association = ae.associate(host, settings.dimse.port, ae_title=settings.dimse.ae_title)
    if not association.is_established:
        print(f"hilum: C-ECHO to {where} failed: no association", file=sys.stderr)
        return 1
    try:
        status = association.send_c_echo()
    finally:
        association.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        print(f"hilum: C-ECHO to {where} failed: status {code}", file=sys.stderr)
        return 1
    print(f"C-ECHO to {where}: success")
    return 0


def cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    from server.import_files import import_files

    archive = open_archive(settings, migrate=True)
    try:
        summary = import_files(archive, args.paths, workers=max(1, args.workers))
    finally:
        archive.close()
    for line in summary.lines():
        print(line)
    return 1 if summary.failures else 0


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from storage.janitor import record_removal
    from storage.verify import remove_orphans, verify_archive

    grace_s = args.orphan_grace_s
    if grace_s is None:
        grace_s = settings.storage.orphan_grace_s
    archive = open_archive(settings)
    try:
        with tqdm(unit="instance", desc="verifying") as bar:
            report = verify_archive(archive, checksums=not args.quick, progress=bar.update)
        if args.repair:
            # What the orphan janitor does (storage/janitor.py), now: logged and audited.
            remove_orphans(archive, report, grace_s=grace_s, now=time.time())
            record_removal(archive, report.removed, grace_s)
    finally:
        archive.close()
    print(
        f"{report.instances} instances checked: {len(report.missing)} missing blobs, "
        f"{len(report.mismatched)} checksum mismatches, {len(report.orphans)} orphan blobs"
        + (f", {len(report.removed)} orphan blobs removed" if args.repair else "")
    )
    for key in report.removed:
        print(f"  removed orphan blob: {key}")
    for uid in report.missing:
        print(f"  missing blob: instance {uid}")
    for uid in report.mismatched:
        print(f"  checksum mismatch: instance {uid}")
    for key in report.orphans:
        print(f"  orphan blob: {key}")
    if report.orphans and not args.repair:
        print(f"  (`hilum verify --repair` removes orphans older than {grace_s:.0f} s)")
    return 0 if report.ok else 1


def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from storage.backup import backup_archive, sqlite_path

    sqlite_path(settings.database_url)  # PostgreSQL: refused before anything is opened
    archive = open_archive(settings)
    try:
        with tqdm(unit="instance", desc="backing up") as bar:
            report = backup_archive(archive, settings.database_url, args.folder, bar.update)
    finally:
        archive.close()
    print(
        f"backed up the index and {report.instances} instances ({report.bytes} bytes, every "
        f"SHA-256 checked) to {args.folder}"
    )
    return 0


def cmd_restore(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from storage.backup import restore_archive
    from storage.verify import verify_archive

    with tqdm(unit="blob", desc="restoring") as bar:
        report = restore_archive(args.folder, settings, bar.update)
    archive = open_archive(settings, migrate=True)  # a backup of an older version: migrated
    try:
        with tqdm(unit="instance", desc="verifying") as bar:
            verified = verify_archive(archive, progress=bar.update)
    finally:
        archive.close()
    print(
        f"restored the index and {report.instances} blobs from {args.folder}; verify: "
        f"{verified.instances} instances, {len(verified.missing)} missing blobs, "
        f"{len(verified.mismatched)} checksum mismatches, {len(verified.orphans)} orphan blobs"
    )
    return 0 if verified.ok else 1


def cmd_tiers(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from storage.tiers import TIERS_LOCK, TieredBlobStore, apply_tiers

    if not settings.storage.tiers:
        print("no [[storage.tiers]] configured: every blob stays in the primary blob store")
        return 0
    archive = open_archive(settings)
    try:
        assert isinstance(archive.blobs, TieredBlobStore)
        with archive.index.alone(TIERS_LOCK) as alone:
            if not alone:
                print("another process (a `hilum worker`'s schedule, or another `hilum tiers "
                      "apply`) is moving studies between tiers now; try again when it is done",
                      file=sys.stderr)  # fmt: skip
                return 1
            with tqdm(unit="instance", desc="applying tiers") as bar:
                report = apply_tiers(
                    archive.index,
                    archive.blobs,
                    settings.storage.tiers,
                    None,  # every partition
                    settings.server.data_dir / "tmp",
                    progress=bar.update,
                )
    finally:
        archive.close()
    if report.leftovers_deleted:
        print(f"deleted {report.leftovers_deleted} old copies left by an interrupted run")
    for (source, target), count in sorted(report.moved.items()):
        print(f"moved {count} instances from {source} to {target}")
    for failure in report.failed:
        print(f"  not moved: {failure}")
    print(f"{report.instances} instances moved, {len(report.failed)} studies not moved")
    return 1 if report.failed else 0


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    """``hilum audit verify``: walk the hash chain; 1 at the first altered or missing record."""
    from storage.audit import verify_chain

    archive = open_archive(settings)
    try:
        report = verify_chain(archive.index)
    finally:
        archive.close()
    if report.fault is not None:
        print(
            f"audit trail BROKEN: {report.fault.reason}. {report.records} records before it "
            f"verified. Compare with the JSON lines copy and the archived records "
            f"(docs/operations.md#audit-trail).",
            file=sys.stderr,
        )
        return 1
    if not report.records:
        print("audit trail: no records yet")
        return 0
    pruned = f" (records before {report.first_id} were pruned)" if report.first_id != 1 else ""
    print(
        f"audit trail intact: {report.records} records, {report.first_id} to {report.last_id}, "
        f"each chained to the one before{pruned}"
    )
    return 0


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    """``hilum export``: studies as Part 10 files, or (``--dataset``) a partition's training set;
    de-identified under a ``[[research.projects]]`` project with ``--deidentify``."""
    from tqdm import tqdm

    from server.context import cli_context
    from storage.audit import export_entry
    from storage.deidentify import Deidentifier
    from storage.export import export_studies, export_training_set

    if args.dataset == bool(args.studies):
        print("hilum export: give STUDY_UIDs, or --dataset (not both)", file=sys.stderr)
        return 2
    deidentifier = None
    if args.deidentify or args.project:
        project = settings.research.project(args.project or "")
        if not args.deidentify or project is None:
            known = ", ".join(p.name for p in settings.research.projects) or "none configured"
            print(
                "hilum export: --deidentify needs --project NAME, one of the "
                f"[[research.projects]] ({known})",
                file=sys.stderr,
            )
            return 2
        deidentifier = Deidentifier(
            project.name, project.secret, frozenset(settings.research.held_back_modalities)
        )
    if args.to.exists() and (not args.to.is_dir() or any(args.to.iterdir())):
        print(f"hilum export: {args.to} exists and is not an empty folder", file=sys.stderr)
        return 2
    args.to.mkdir(parents=True, exist_ok=True)
    archive = open_archive(settings).scoped(args.partition)
    try:
        with tqdm(unit="instance", desc="exporting") as bar:
            if args.dataset:
                summary = export_training_set(
                    archive, settings.inference, args.to, deidentifier=deidentifier,
                    progress=bar.update,
                )  # fmt: skip
            else:
                summary = export_studies(
                    archive, args.studies, args.to, deidentifier=deidentifier,
                    progress=bar.update,
                )  # fmt: skip
        exported = [uid for uid in args.studies if uid not in summary.missing]
        try:
            archive.record(
                cli_context("hilum export"),
                export_entry(exported, summary.instances, str(args.to.resolve()),
                             deidentified=deidentifier is not None),
            )  # fmt: skip
        except StorageError as error:  # no export the audit trail does not hold
            shutil.rmtree(args.to)
            print(f"hilum export: nothing exported, the audit record failed: {error}",
                  file=sys.stderr)  # fmt: skip
            return 1
    finally:
        archive.close()
    for line in summary.lines():
        print(line)
    if args.dataset:
        print(f"training set in {args.to} (manifest.json)")
    return 1 if summary.missing else 0


def _accounts(settings: Settings) -> tuple[Archive, Accounts]:
    from storage.accounts import Accounts

    archive = open_archive(settings, migrate=True, connections=1)
    return archive, Accounts(archive.index)


def _audit_change(
    archive: Archive, command: str, event: AuditEvent, subject: str, change: str
) -> None:
    """Record a security change made by a ``hilum`` command (who: the operating-system user)."""
    from server.context import cli_context
    from storage.audit import security_change_entry

    archive.record(cli_context(f"hilum {command}"), security_change_entry(event, subject, change))


def cmd_users(settings: Settings, args: argparse.Namespace) -> int:
    """``hilum users add|list|disable``: the accounts of the HTTP interfaces."""
    from server.access import ROLES

    archive, accounts = _accounts(settings)
    try:
        if args.users_command == "add":
            if args.role not in ROLES:
                print(
                    f"hilum: unknown role {args.role!r}; one of {', '.join(ROLES)}", file=sys.stderr
                )
                return 2
            password = None
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\r\n")
            user = accounts.add_account(args.name, args.role, args.partition or (), password)
            where = ", ".join(user.partitions) or "every partition"
            _audit_change(archive, "users add", AuditEvent.USER_CHANGE, user.name,
                          f"created: role {user.role}, {where}")  # fmt: skip
            login = "password login" if user.has_password else "API tokens only (no password)"
            print(f"user {user.name} added: role {user.role}, {where}, {login}")
        elif args.users_command == "list":
            for user in accounts.accounts():
                print(
                    f"{user.name}\t{user.role}\t{','.join(user.partitions) or '*'}\t"
                    f"{'disabled' if user.disabled else 'enabled'}\t"
                    f"{'password' if user.has_password else 'no password'}"
                )
        else:
            user = accounts.disable_account(args.name)
            _audit_change(archive, "users disable", AuditEvent.USER_CHANGE, user.name, "disabled")
            print(
                f"user {user.name} disabled: its logins and tokens are refused within "
                f"[auth] token_cache_ttl_s ({settings.auth.token_cache_ttl_s:g} s)"
            )
    finally:
        archive.close()
    return 0


def cmd_tokens(settings: Settings, args: argparse.Namespace) -> int:
    """``hilum tokens create|list|revoke``: API tokens (``Authorization: Bearer TOKEN``)."""
    archive, accounts = _accounts(settings)
    try:
        if args.tokens_command == "create":
            token, secret = accounts.create_token(args.user, args.expires_days)
            _audit_change(archive, "tokens create", AuditEvent.TOKEN_CHANGE, token.id,
                          f"created for user {token.account}")  # fmt: skip
            until = token.expires_at.isoformat(timespec="seconds") if token.expires_at else "never"
            # The secret alone on stdout (for `TOKEN=$(hilum tokens create …)`); what it is on
            # stderr. It is shown once: only its hash is kept.
            print(secret, flush=True)
            print(f"token {token.id} of user {token.account}, expires {until}", file=sys.stderr)
        elif args.tokens_command == "list":
            now = accounts.clock()
            for token in accounts.tokens():
                until = token.expires_at.isoformat(timespec="seconds") if token.expires_at else "-"
                print(
                    f"{token.id}\t{token.account}\t{token.state(now)}\t"
                    f"created {token.created_at.isoformat(timespec='seconds')}\texpires {until}"
                )
        else:
            token = accounts.revoke_token(args.id)
            _audit_change(archive, "tokens revoke", AuditEvent.TOKEN_CHANGE, token.id, "revoked")
            print(
                f"token {token.id} of user {token.account} revoked: refused within [auth] "
                f"token_cache_ttl_s ({settings.auth.token_cache_ttl_s:g} s)"
            )
    finally:
        archive.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hilum", description="Hilum PACS")
    parser.add_argument("--config", type=Path, help="TOML configuration file (or $HILUM_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("serve", help="run everything in one process (migrates the database)")
    dimse = commands.add_parser("dimse", help="run the DIMSE SCP only")
    # One of the [dimse] processes that `hilum serve` / `hilum dimse` start: no banner, stops
    # at the end of its standard input.
    dimse.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    commands.add_parser("web", help="serve DICOMweb under gunicorn ([http] port, workers)")
    db = commands.add_parser("db", help="index database administration")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply database migrations")

    echo = commands.add_parser("echo", help="C-ECHO this configuration's DIMSE SCP (health check)")
    echo.add_argument("--host", help="address to call (default: [server] host, or loopback)")
    echo.add_argument("--calling-ae", default="HILUM_HEALTH", help="calling AE title")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    imp = commands.add_parser("import", help="import DICOM files and folders")
    imp.add_argument("paths", nargs="+", type=Path)
    imp.add_argument("--workers", type=int, default=4, help="parallel files (default 4)")

    verify = commands.add_parser("verify", help="check the index against the blob store")
    verify.add_argument("--quick", action="store_true", help="check existence, not checksums")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="delete orphan blobs last written over --orphan-grace-s ago (unreferenced still), "
        "as the orphan janitor does; recorded in the audit trail",
    )
    verify.add_argument(
        "--orphan-grace-s",
        type=float,
        default=None,
        help="age in seconds an orphan must reach before --repair deletes it (default "
        "[storage] orphan_grace_s, 3600: a blob being stored now is an orphan until its index "
        "rows commit)",
    )

    backup = commands.add_parser(
        "backup", help="copy the embedded archive (SQLite index + blobs) to a new folder"
    )
    backup.add_argument("folder", type=Path)
    restore = commands.add_parser(
        "restore", help="restore a `hilum backup` folder into an empty data_dir, then verify"
    )
    restore.add_argument("folder", type=Path)

    tiers = commands.add_parser("tiers", help="storage tiers ([[storage.tiers]])")
    tiers_commands = tiers.add_subparsers(dest="tiers_command", required=True)
    tiers_commands.add_parser(
        "apply", help="move studies to the tier their age calls for (copy, verify, index, delete)"
    )

    audit = commands.add_parser("audit", help="the audit trail")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_commands.add_parser(
        "verify", help="check every audit record's hash chain; exit 1 at the first broken one"
    )
    export = commands.add_parser(
        "export", help="write studies as DICOM files, or a training set (--dataset), to a folder"
    )
    export.add_argument("studies", nargs="*", metavar="STUDY_UID", help="Study Instance UIDs")
    export.add_argument("--to", type=Path, required=True, help="a new or empty folder")
    export.add_argument(
        "--dataset",
        action="store_true",
        help="the partition's image series, the AI's SEG and SR, and manifest.json",
    )
    export.add_argument("--partition", default="default", help="partition (default: default)")
    export.add_argument(
        "--deidentify", action="store_true", help="PS3.15 Annex E de-identification (--project)"
    )
    export.add_argument("--project", help="a [[research.projects]] name: its secret keys the UIDs")

    commands.add_parser("worker", help="run the AI worker: claim jobs, run models, store results")
    commands.add_parser(
        "events", help="deliver the change feed: webhooks and the FHIR push ([events], [fhir])"
    )
    models = commands.add_parser("models", help="AI model plug-ins")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="list the installed models ([inference] models_dirs)")
    viewer = commands.add_parser("viewer", help="the OHIF viewer served at /viewer")
    viewer_commands = viewer.add_subparsers(dest="viewer_command", required=True)
    install = viewer_commands.add_parser("install", help="install the pinned OHIF viewer (npm)")
    install.add_argument("--dir", type=Path, help="where (default: [web] ohif_dir)")
    install.add_argument("--tarball", type=Path, help="a downloaded ohif-app-3.12.10.tgz")

    admin_groups = add_admin_commands(commands)  # partitions, ae, peers

    users = commands.add_parser("users", help="user accounts of the HTTP interfaces")
    users_commands = users.add_subparsers(dest="users_command", required=True)
    add = users_commands.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument(
        "--role",
        required=True,
        help="admin, radiologist, technologist, modality, researcher or worker",
    )
    add.add_argument(
        "--partition", action="append", help="a partition the user may see (repeat; none: all)"
    )
    add.add_argument(
        "--password-stdin", action="store_true",
        help="read the password from the first line of standard input (none: API tokens only)",
    )  # fmt: skip
    users_commands.add_parser("list", help="list the users")
    disable = users_commands.add_parser("disable", help="refuse a user's logins and tokens")
    disable.add_argument("name")

    tokens = commands.add_parser("tokens", help="API tokens (Authorization: Bearer TOKEN)")
    tokens_commands = tokens.add_subparsers(dest="tokens_command", required=True)
    create = tokens_commands.add_parser("create", help="make a token; prints it alone on stdout")
    create.add_argument("--user", required=True)
    create.add_argument(
        "--expires-days", type=float, help="valid this many days (default: no expiry)"
    )
    tokens_commands.add_parser("list", help="list the tokens (never their secrets)")
    revoke = tokens_commands.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id")

    # `hilum serve --config FILE` as well as `hilum --config FILE serve`: every command takes it.
    groups = (commands, db_commands, models_commands, tiers_commands, viewer_commands,
              users_commands, tokens_commands, *admin_groups, audit_commands)  # fmt: skip
    for group in groups:
        for command in group.choices.values():
            command.add_argument(
                "--config", type=Path, default=argparse.SUPPRESS, help="TOML configuration file"
            )
    return parser


COMMANDS = {
    "serve": cmd_serve,
    "web": cmd_web,
    "dimse": cmd_dimse,
    "db": cmd_db_upgrade,
    "echo": cmd_echo,
    "import": cmd_import,
    "verify": cmd_verify,
    "backup": cmd_backup,
    "restore": cmd_restore,
    "tiers": cmd_tiers,
    "audit": cmd_audit,
    "export": cmd_export,
    "worker": cmd_worker,
    "events": cmd_events,
    "models": cmd_models,
    "viewer": cmd_viewer,
    **ADMIN_COMMANDS,
    "users": cmd_users,
    "tokens": cmd_tokens,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        configure_logging(args.verbose, settings.log.format, args.command)
        return COMMANDS[args.command](settings, args)
    except ConfigError as error:
        print(f"hilum: configuration error: {error}", file=sys.stderr)
        return 2
    except InvalidArgument as error:
        print(f"hilum: {error}", file=sys.stderr)
        return 2
    except StorageError as error:
        print(f"hilum: {error}", file=sys.stderr)
        return 3
    except ModelError as error:
        print(f"hilum: model plug-in error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        print(
            f"hilum: `hilum {args.command}` runs the AI models and needs torch, which this "
            "installation lacks: pip install 'hilum[ai]' (or use the worker image), or set "
            "[inference] serve_worker = false for `hilum serve`",
            file=sys.stderr,
        )
        return 2
    except OSError as error:
        print(f"hilum: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
