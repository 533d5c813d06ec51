"""What the DIMSE association policy costs: one index read per association (the Called AE
Title's partition, the calling AE's permission).

Interleaved rounds, A B A B: (A) associations with no AE permission stored (loopback: any
calling AE), (B) with ``--permissions`` AE permissions stored, the caller's with a network; each
association is Hilum's own requestor proposing Verification, one C-ECHO, release. Then the
policy read alone (``storage.ae_permissions.association_policy``) on the same index. Prints
medians and ranges per operation and the process's CPU per operation (both sides of the
association run in this process).

    .venv/bin/python benchmarks/association_policy.py --associations 200 --rounds 3
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from config import load_settings
from server.dimse.ae import DimseServer
from server.dimse.association import Context
from server.dimse.commands import CommandField
from server.dimse.negotiation import request_association
from storage.ae_permissions import AEPermissionEntry, association_policy, set_ae_permission
from storage.archive import open_archive
from storage.index.models import AEPermission
from storage.partitions import create_partition

IMPLICIT_LE = "1.2.840.10008.1.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_association(port: int) -> None:
    assoc = request_association(
        "127.0.0.1", port, calling_ae_title="BENCH", called_ae_title="HOSP_A",
        contexts=[(Verification, [IMPLICIT_LE])], max_pdu_length=16384, timeout=10,
    )  # fmt: skip
    (context,) = assoc.contexts.values()
    assert isinstance(context, Context)
    assoc.send_command(context, {"AffectedSOPClassUID": Verification, "MessageID": 1,
                                 "CommandField": CommandField.C_ECHO_RQ})  # fmt: skip
    response = assoc.receive_message()
    assert response is not None and int(response.command.get("Status", 1)) == 0
    assoc.release()


def timed(operation, count: int) -> tuple[float, float]:
    """Wall and CPU seconds per operation over ``count`` operations."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        operation()
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--permissions", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(
            None, server={"data_dir": Path(folder)}, dimse={"port": free_port()}
        )
        archive = open_archive(settings, migrate=True)
        create_partition(archive.index, "hosp-a", ["HOSP_A"], reserved_ae_title="HILUM")
        server = DimseServer(settings, archive)
        server.start()
        port = server.port
        results: dict[str, list[tuple[float, float]]] = {
            "A": [],
            "B": [],
            "read A": [],
            "read B": [],
        }

        def permissions(stored: bool) -> None:
            with archive.index.write() as session:
                session.query(AEPermission).delete()
            if stored:
                for n in range(args.permissions - 1):
                    set_ae_permission(archive.index, AEPermissionEntry(
                        f"AE{n}", "hosp-a", True, False, False))  # fmt: skip
                set_ae_permission(archive.index, AEPermissionEntry(
                    "BENCH", "hosp-a", False, False, False, ("127.0.0.0/8",)))  # fmt: skip

        def read() -> None:
            association_policy(archive.index, "BENCH", "HOSP_A", default_ae_title="HILUM",
                               unknown_called_is_default=False)  # fmt: skip

        for _ in range(args.rounds):
            for label, stored in (("A", False), ("B", True)):
                permissions(stored)
                echo_association(port)  # warm
                results[label].append(timed(lambda: echo_association(port), args.associations))
                results[f"read {label}"].append(timed(read, args.associations))
        server.stop()
        archive.close()
    names = {
        "A": "association + C-ECHO + release, no AE permission stored",
        "B": f"association + C-ECHO + release, {args.permissions} AE permissions stored",
        "read A": "the policy read alone (one index read transaction), none stored",
        "read B": f"the policy read alone, {args.permissions} stored",
    }
    for label, runs in results.items():
        walls = [w * 1000 for w, _ in runs]
        cpus = [c * 1000 for _, c in runs]
        print(
            f"{names[label]}: median {statistics.median(walls):.3f} ms (range "
            f"{min(walls):.3f}-{max(walls):.3f}), CPU {statistics.median(cpus):.3f} ms/op"
        )


if __name__ == "__main__":
    main()
