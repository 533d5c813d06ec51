"""The change feed's costs: the outbox row per stored instance, and webhook delivery rate.

1. **Outbox cost per stored instance.** The same ingest, with and without the outbox: this
   checkout against a checkout without it (``--without DIR``, e.g. ``git archive main | tar -x
   -C /tmp/hilum-main``), each in a child process of its own interpreter on its own fresh
   embedded archive (SQLite + files, FULL sync), in interleaved rounds (A B A B …). A child
   stores ``--instances`` synthetic CT instances (256x256, 16 bit) in groups of ``--group``
   files per ``ingest_files`` call (one index transaction each, as the group commit does under
   load) and reports wall time and CPU time (process_time) per instance. Reported: medians and
   ranges over the rounds, and the added cost in percent of the median.
2. **Webhooks.** ``--events`` events written (in transactions of 100), then one delivery loop
   delivers them to a local receiver (http.server, one thread per connection, answers 204) over
   keep-alive connections: events per second, median and range over the rounds, and the loop's
   CPU per event.

Figures go to stdout, progress to stderr; nothing is asserted.

    .venv/bin/python benchmarks/events.py --without /tmp/hilum-main [--rounds 5]
        [--instances 400] [--group 16] [--events 2000]
        [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres --threads 4]
        [--skip-webhooks]

   With ``--postgres`` and ``--threads``, the concurrent writers' commits wait for one another
   at the event writers' lock (``storage/events.py``): the cost of ids in commit order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent


def child_ingest(
    instances: int, group: int, database_url: str = "", threads: int = 1
) -> dict[str, float]:
    """In a checkout's own interpreter: store ``instances`` files in groups, from ``threads``
    threads at once (each its own transactions, as separate DIMSE processes would be), into
    the embedded SQLite index or ``database_url``; seconds each."""
    from concurrent.futures import ThreadPoolExecutor

    from pydicom.uid import generate_uid

    from config import load_settings
    from storage.archive import open_archive
    from storage.ingest import Received, ingest_files
    from tests.factories import ct_instance, write_part10

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        files = []
        study, series = generate_uid(), generate_uid()
        for n in range(instances):
            ds = ct_instance(study, series, size=256, seed=n)
            files.append(write_part10(ds, root / f"{n}.dcm"))
        settings = load_settings(
            None,
            server={"data_dir": root / "data"},
            storage={"database_url": database_url},
        )
        archive = open_archive(settings, migrate=True)
        groups = [files[first : first + group] for first in range(0, len(files), group)]

        def store(mine: list[list[Path]]) -> None:
            for paths in mine:
                ingest_files(archive, [Received(path) for path in paths])

        started, cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(store, [groups[n::threads] for n in range(threads)]))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        archive.close()
    return {
        "wall_per_instance_ms": wall / instances * 1000,
        "cpu_per_instance_ms": cpu / instances * 1000,
    }


def run_child(
    checkout: Path, instances: int, group: int, database_url: str = "", threads: int = 1
) -> dict[str, float]:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2]);"
        "from benchmarks_events_child import child_ingest;"
        "print(json.dumps(child_ingest(int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],"
        " int(sys.argv[6]))))"
    )
    # The child imports this file's child_ingest under another name (from this checkout) but
    # config/storage/tests from ``checkout``, first on its path.
    helper = Path(tempfile.gettempdir()) / "benchmarks_events_child.py"
    helper.write_text(Path(__file__).read_text())
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(checkout),
            str(helper.parent),
            str(instances),
            str(group),
            database_url,
            str(threads),
        ],  # fmt: skip
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def webhook_rate(events: int) -> dict[str, float]:
    sys.path.insert(0, str(HERE))

    from config import load_settings
    from server.events.delivery import DeliveryLoop, subscribers_from_settings
    from storage.archive import open_archive
    from storage.events import EventType, NewEvent, record_events

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as scratch:
        secret = Path(scratch) / "secret"
        secret.write_text("benchmark-secret-0123456789")
        settings = load_settings(
            None,
            server={"data_dir": Path(scratch) / "data"},
            events={
                "webhooks": [
                    {
                        "name": "bench",
                        "url": f"http://127.0.0.1:{server.server_port}/hook",
                        "secret_file": secret,
                    }
                ]
            },
        )
        archive = open_archive(settings, migrate=True)
        for first in range(0, events, 100):
            with archive.index.write() as session:
                record_events(
                    session,
                    archive.partition,
                    [
                        NewEvent(EventType.INSTANCE_STORED, "1.2.3", {"SOPInstanceUID": f"1.2.{n}"})
                        for n in range(first, min(events, first + 100))
                    ],
                )
        loop = DeliveryLoop(settings, archive, subscribers_from_settings(settings, archive))
        delivered = 0
        started, cpu = time.perf_counter(), time.process_time()
        while delivered < events:
            delivered += loop.step()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        archive.close()
    server.shutdown()
    server.server_close()
    return {"events_per_s": events / wall, "cpu_per_event_ms": cpu / events * 1000}


@contextlib.contextmanager
def _database(admin_url: str | None) -> Iterator[str]:
    """A fresh PostgreSQL database for one run (dropped after), or "" for SQLite."""
    if not admin_url:
        yield ""
        return
    from sqlalchemy import create_engine, text

    name = f"hilum_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{admin_url.rpartition('/')[0]}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def outbox_insert_cost(group: int, transactions: int, database_url: str) -> dict[str, float]:
    """The outbox rows alone: ``transactions`` write transactions of ``group`` events each,
    against as many without them, interleaved; both update one row, as an ingest transaction
    writes rows (so both commits flush the log: an empty transaction's commit would not). The
    difference of the medians, per event."""
    sys.path.insert(0, str(HERE))
    from sqlalchemy import text

    from config import load_settings
    from storage.archive import open_archive
    from storage.events import EventType, NewEvent, record_events
    from storage.outbox import ensure_subscribers

    payload = {
        "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012",
        "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.98765432109876543210987654321098",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "Modality": "CT",
        "outcome": "stored",
    }
    events = [NewEvent(EventType.INSTANCE_STORED, "1.2.3.4", payload)] * group
    with tempfile.TemporaryDirectory() as scratch:
        settings = load_settings(
            None, server={"data_dir": Path(scratch)}, storage={"database_url": database_url}
        )
        archive = open_archive(settings, migrate=True)
        ensure_subscribers(archive, ["bench"])
        touch = text("UPDATE event_subscriber SET delivered = delivered + 1 WHERE name = 'bench'")
        times: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(transactions):
            for label in ("with", "without"):  # interleaved
                started = time.perf_counter()
                with archive.index.write() as session:
                    connection = session.connection()
                    connection.execute(touch)
                    if label == "with":
                        record_events(connection, archive.partition, events)
                times[label].append(time.perf_counter() - started)
        archive.close()
    extra = statistics.median(times["with"]) - statistics.median(times["without"])
    return {"per_event_ms": extra / group * 1000}


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without", type=Path, help="a checkout without the outbox (main)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument(
        "--postgres",
        help="admin URL of a PostgreSQL server (postgresql+psycopg://postgres@127.0.0.1/postgres):"
        " ingest into a fresh database there for every run instead of SQLite",
    )
    parser.add_argument("--threads", type=int, default=1, help="concurrent ingesting threads")
    parser.add_argument("--skip-webhooks", action="store_true")
    args = parser.parse_args()

    if args.without:
        results: dict[str, list[dict[str, float]]] = {"with outbox": [], "without": []}
        for n in range(args.rounds):
            for label, checkout in (("with outbox", HERE), ("without", args.without)):
                print(f"round {n + 1}: ingest {label}", file=sys.stderr)
                with _database(args.postgres) as url:
                    results[label].append(
                        run_child(checkout, args.instances, args.group, url, args.threads)
                    )
        index = "PostgreSQL" if args.postgres else "SQLite"
        print(
            f"ingest of {args.instances} CT instances (256x256), groups of {args.group}, "
            f"{args.threads} thread(s), {index} + files, {args.rounds} interleaved rounds: "
            "median (range)"
        )
        medians = {}
        for label, rows in results.items():
            wall = [r["wall_per_instance_ms"] for r in rows]
            cpu = [r["cpu_per_instance_ms"] for r in rows]
            medians[label] = (statistics.median(wall), statistics.median(cpu))
            print(
                f"  {label:12} wall {_summary(wall)} ms/instance, CPU {_summary(cpu)} ms/instance"
            )
        added_wall = medians["with outbox"][0] / medians["without"][0] - 1
        added_cpu = medians["with outbox"][1] / medians["without"][1] - 1
        ratios = [
            a["wall_per_instance_ms"] / b["wall_per_instance_ms"] - 1
            for a, b in zip(results["with outbox"], results["without"], strict=True)
        ]
        print(
            f"  outbox row: {added_wall:+.1%} wall, {added_cpu:+.1%} CPU per instance "
            f"(per-round wall ratios {min(ratios):+.1%} to {max(ratios):+.1%})"
        )
        with _database(args.postgres) as url:
            direct = outbox_insert_cost(args.group, 300, url)["per_event_ms"]
        print(
            f"  the outbox rows alone ({args.group} per transaction, 300 transactions each way,"
            f" interleaved): {direct:.3f} ms per event = "
            f"{direct / medians['without'][0]:.1%} of the median ingest time per instance"
        )

    if args.skip_webhooks:
        return
    rates = []
    for n in range(args.rounds):
        print(f"round {n + 1}: webhooks", file=sys.stderr)
        rates.append(webhook_rate(args.events))
    print(f"webhooks: {args.events} events to one local receiver, {args.rounds} rounds")
    print(f"  events/s {_summary([r['events_per_s'] for r in rates])}")
    print(f"  delivery loop CPU {_summary([r['cpu_per_event_ms'] for r in rates])} ms/event")


if __name__ == "__main__":
    main()
