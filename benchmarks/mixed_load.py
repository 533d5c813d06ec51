"""Mixed load (issue 15): C-STORE and STOW-RS senders at once, re-sending the same instances.

``--senders`` (default 4) DCMTK ``storescu`` processes (TCP_NODELAY=1, ``--dimse-timeout 60``:
a C-STORE not answered within 60 s counts as a failure) and as many STOW-RS clients (requests
of 10 instances) send, all at the same time, the same ``--shared`` (default 200) 512x512 CT
instances, every other sender in reverse order, plus ``--own`` (default 50) instances of their
own, to one ``hilum serve`` on the embedded default (SQLite + files; a fresh one each round).

Per round: the wall time until the last sender finished, the instances sent per second (all
senders together) and the distinct instances stored per second, C-STOREs that failed or were
not answered (storescu's E/F lines), STOW-RS requests that were not 200, whether the index holds
exactly the distinct instances sent, and the server's CPU per instance sent. Medians and ranges
over ``--rounds``. Nothing is asserted (tests/server/test_resend_across_transports.py checks
that nothing is lost).

    .venv/bin/python benchmarks/mixed_load.py [--rounds 3] [--senders 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dicomweb import BOUNDARY, stow_body  # noqa: E402
from benchmarks.ingest import STORESCU, count_sqlite, hilum, write_series  # noqa: E402
from benchmarks.processes import (  # noqa: E402
    DCMTK_NODELAY,
    cpu_seconds,
    free_port,
    progress,
    start_process,
    stop_process,
)

STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
PER_REQUEST = 10
TIMEOUT_S = 900


def stow(base: str, paths: list[Path]) -> list[str]:
    """STOW-RS ``paths`` in requests of PER_REQUEST; what went wrong."""
    problems = []
    with requests.Session() as session:
        for at in range(0, len(paths), PER_REQUEST):
            response = session.post(
                f"{base}/dicomweb/studies",
                data=stow_body([path.read_bytes() for path in paths[at : at + PER_REQUEST]]),
                headers={"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"},
                timeout=300,
            )
            if response.status_code != 200:
                problems.append(f"STOW-RS {response.status_code}: {response.text[:200]}")
    return problems


def one_round(
    work: Path, shared: list[Path], own: list[list[Path]], senders: int
) -> dict[str, float | str]:
    http_port = free_port()
    data = work / "data"
    env = {"HILUM_HTTP__PORT": str(http_port), "HILUM_INFERENCE__SERVE_WORKER": "false"}
    with hilum(work, "hilum", env, lambda: count_sqlite(data / "index.sqlite")) as target:
        base = f"http://127.0.0.1:{http_port}"
        cpu_before = cpu_seconds(target.pid)
        started = time.perf_counter()
        logs = [work / f"storescu-{n}.log" for n in range(senders)]
        stores = [
            start_process(
                [
                    STORESCU,
                    "-nh",
                    "--dimse-timeout",
                    "60",
                    "-aet",
                    f"MIXED{n}",
                    "-aec",
                    target.ae_title,
                    "127.0.0.1",
                    str(target.port),
                    *(shared[::-1] if n % 2 else shared),
                    *own[n],
                ],
                logs[n],
                DCMTK_NODELAY,
            )  # fmt: skip
            for n in range(senders)
        ]
        with ThreadPoolExecutor(senders) as pool:
            posted = [
                pool.submit(stow, base, [*(shared[::-1] if n % 2 else shared), *own[n]])
                for n in range(senders, 2 * senders)
            ]
            problems = [problem for future in posted for problem in future.result(TIMEOUT_S)]
        for process in stores:
            try:
                process.wait(TIMEOUT_S)
            except Exception:  # noqa: BLE001 (reported, not raised)
                stop_process(process, grace_s=1)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(target.pid) - cpu_before
        for process, log in zip(stores, logs, strict=True):
            errors = [line for line in log.read_text(errors="replace").splitlines()
                      if line[:2] in ("E:", "F:")]  # fmt: skip
            if process.returncode != 0 or errors:
                problems.append(f"{log.name}: exit {process.returncode}, {len(errors)} E/F lines")
                problems += [f"  {line}" for line in errors[:3]]
            log.unlink()
        stored = target.count_stored()
    sent = 2 * senders * len(shared) + sum(len(files) for files in own)
    distinct = len(shared) + sum(len(files) for files in own)
    return {
        "seconds": seconds,
        "sent/s": sent / seconds,
        "stored/s": distinct / seconds,
        "cpu ms/sent": 1000 * cpu / sent,
        "stored": f"{stored} of {distinct}",
        "problems": "; ".join(problems[:6]) or "none",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--shared", type=int, default=200)
    parser.add_argument("--own", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hilum-mixed-") as folder:
        root = Path(folder)
        progress("writing the instances")
        shared = write_series(root / "shared", args.shared, seed=1)
        own = [write_series(root / f"own{n}", args.own, seed=10 + n)
               for n in range(2 * args.senders)]  # fmt: skip
        results = []
        for round_ in range(args.rounds):
            work = root / f"round{round_}"
            work.mkdir()
            results.append(one_round(work, shared, own, args.senders))
            progress(f"round {round_ + 1}: {results[-1]}")
    print(f"\nload average {os.getloadavg()[0]:.1f}; {args.senders} storescu + {args.senders} "
          f"STOW-RS senders, {args.shared} shared + {args.own} own instances each")  # fmt: skip
    for key in ("seconds", "sent/s", "stored/s", "cpu ms/sent"):
        values = [float(r[key]) for r in results]
        print(f"{key:>12}: {statistics.median(values):8.1f} ({min(values):.1f}-{max(values):.1f})")
    for n, result in enumerate(results, 1):
        print(f"round {n}: stored {result['stored']}; problems: {result['problems']}")


if __name__ == "__main__":
    main()
