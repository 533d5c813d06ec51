"""C-MOVE and C-GET of a study from Hilum at two versions of its code: another checkout
(``--baseline``, e.g. a worktree of main) against this one, same study, same receivers.

Both run as ``hilum serve`` from this checkout's ``.venv`` at once, each with its own data
directory; the baseline with ``PYTHONPATH`` set to its checkout, so that its ``server``,
``storage`` and ``config`` packages are imported from there (the venv's editable install is
looked up after ``PYTHONPATH``). The receivers and operations are ``benchmarks/retrieve.py``'s
(``--operations``: any of its C-MOVE and C-GET ones). In each round every operation runs on
both versions, the baseline first in odd rounds, ``--repeat`` times each. Prints instances/s,
server CPU per instance (10 ms resolution), the receiver's CPU per instance, medians and ranges,
and this / baseline within each round; the load average at the start and the end. For the lean
receiver on one association (``c-move-lean``, ``c-get-lean``) also its median time from one
C-STORE-RSP to the next (``benchmarks/discard_store.py``), which a loaded machine disturbs less
than a rate.

    .venv/bin/python benchmarks/retrieve_versions.py --baseline /work/wt-main
        [--operations c-move,c-move-lean,c-get-lean] [--rounds 5] [--repeat 2]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.ingest import count_sqlite, spread, write_series  # noqa: E402
from benchmarks.processes import progress  # noqa: E402
from benchmarks.retrieve import (  # noqa: E402
    RECEIVERS,
    RETRIEVES,
    Measurement,
    Server,
    Study,
    hilum_server,
    measure,
    operation_run,
    receivers,
    store_study,
)

CYCLE = re.compile(r"C-STORE cycle median (\d+) us")
LEAN_ONCE = ("c-move-lean", "c-get-lean")


def cycle_us(operation: str, work: Path, seen: int) -> tuple[float | None, int]:
    """The lean receiver's median C-STORE cycle of the retrieve just run, and how many cycle
    lines its log now holds (the Move Destination's log grows; the C-GET client's is new)."""
    log = work / ("receiver-LEAN.log" if operation == "c-move-lean" else "c-get-0.log")
    deadline = time.monotonic() + 5  # the destination writes it once the release is answered
    while True:
        found = CYCLE.findall(log.read_text(errors="replace"))
        if operation == "c-get-lean" or len(found) > seen or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    fresh = found if operation == "c-get-lean" else found[seen:]
    return (float(fresh[-1]) if fresh else None), len(found)


def check_imported_from(checkout: Path, work: Path) -> None:
    """Stop unless this interpreter, with ``PYTHONPATH`` at ``checkout`` and outside any
    checkout, imports Hilum's packages from there (as ``hilum serve`` will)."""
    imported = subprocess.run(
        [sys.executable, "-c", "import server, storage; print(server.__file__, storage.__file__)"],
        env={**os.environ, "PYTHONPATH": str(checkout)},
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not all(Path(path).is_relative_to(checkout) for path in imported):
        raise SystemExit(f"PYTHONPATH={checkout} does not take precedence: {imported}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout")
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--operations", default="c-move,c-move-lean,c-get,c-get-lean")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    operations = [name.strip() for name in args.operations.split(",") if name.strip()]
    unknown = [name for name in operations if name not in RETRIEVES]
    if unknown:
        parser.error(
            f"unknown operation(s) {', '.join(unknown)}; choose from {', '.join(RETRIEVES)}"
        )

    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="hilum-retrieve-versions-"))
    results: dict[tuple[str, str], list[Measurement]] = {}
    cycles: dict[tuple[str, str], list[float | None]] = {}
    move_cycles_seen = 0
    notes: list[str] = []
    try:
        files = write_series(work / "series", args.instances)
        headers = [dcmread(path, stop_before_pixels=True) for path in files]
        study = Study(
            str(headers[0].StudyInstanceUID),
            str(headers[0].SeriesInstanceUID),
            [str(header.SOPInstanceUID) for header in headers],
        )
        with contextlib.ExitStack() as stack:
            destinations = stack.enter_context(receivers(work))
            servers: dict[str, Server] = {}
            for version, path in (("baseline", args.baseline.resolve()), ("this", None)):
                (work / version).mkdir()
                if path is not None:
                    check_imported_from(path, work)
                    os.environ["PYTHONPATH"] = str(path)  # inherited by that hilum serve only
                try:
                    server = stack.enter_context(hilum_server(work / version, destinations))
                finally:
                    os.environ.pop("PYTHONPATH", None)
                index = work / version / "data" / "index.sqlite"
                store_study(server, files, work / version, lambda index=index: count_sqlite(index))
                servers[version] = dataclasses.replace(server, name=f"Hilum {version}")
            for k in range(1, args.rounds + 1):
                order = ["baseline", "this"] if k % 2 else ["this", "baseline"]
                for operation in operations:
                    service, name = RETRIEVES[operation]
                    receiver_pid = None
                    if service == "c-move":
                        receiver_pid = destinations[RECEIVERS[name].ae_title][1]
                    for version in order:
                        server = servers[version]
                        for _ in range(args.repeat):
                            run = operation_run(operation, server, study, work, [], 0)
                            results.setdefault((operation, version), []).append(
                                measure(
                                    operation, server, k, run, args.instances, notes, receiver_pid
                                )  # fmt: skip
                            )
                            if operation in LEAN_ONCE:
                                cycle, seen = cycle_us(operation, work, move_cycles_seen)
                                if operation == "c-move-lean":
                                    move_cycles_seen = seen
                                cycles.setdefault((operation, version), []).append(cycle)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    progress("done")
    print(f"Hilum {REPO} against {args.baseline}; {args.instances} instances")
    print(f"load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
          f"{args.rounds} rounds x {args.repeat}")  # fmt: skip
    print()
    print("| operation | baseline inst/s | this inst/s | this / baseline | baseline CPU ms/inst | "
          "this CPU ms/inst | receiver CPU ms/inst (baseline / this) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for operation in operations:
        base, this = results[(operation, "baseline")], results[(operation, "this")]
        ratios = [b.rate / a.rate for a, b in zip(base, this, strict=True)]
        print(
            f"| {operation} | {spread([m.rate for m in base])} | {spread([m.rate for m in this])}"
            f" | {spread(ratios, 2)} | {spread([m.cpu_ms_per_instance for m in base], 2)} | "
            f"{spread([m.cpu_ms_per_instance for m in this], 2)} | "
            f"{spread([m.receiver_cpu_ms_per_instance for m in base], 2)} / "
            f"{spread([m.receiver_cpu_ms_per_instance for m in this], 2)} |"
        )
    lean = [operation for operation in operations if operation in LEAN_ONCE]
    if lean:
        print()
        print("| operation | baseline C-STORE cycle us | this C-STORE cycle us | this / baseline |")
        print("|---|---|---|---|")
    for operation in lean:
        pairs = list(zip(cycles[(operation, "baseline")], cycles[(operation, "this")], strict=True))
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if not pairs:
            print(f"| {operation} | - | - | - |")
            continue
        base_us, this_us = [a for a, _ in pairs], [b for _, b in pairs]
        ratios = [b / a for a, b in pairs]
        print(f"| {operation} | {spread(base_us)} | {spread(this_us)} | {spread(ratios, 2)} |")
    if notes:
        print("\nnotes:")
        for note in notes:
            print(f"  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
