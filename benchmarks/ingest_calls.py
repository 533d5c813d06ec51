"""Python function calls per received C-STORE instance, counted by cProfile (deterministic,
unlike timings on a shared machine).

Each of ``--instances`` synthetic CT slices (``benchmarks/ingest.py``'s, 512x512) is turned into
the temporary file a C-STORE SCP writes (Hilum's File Meta Information, then the data set as
sent, hashed on the way) and stored through :class:`storage.group_commit.GroupCommit` on the
embedded backend (SQLite + files in a temporary data directory), one file at a time as on one
association, with the association's audit transfer. The first ``--warm-up`` files are not
profiled. Printed: function calls per instance, then the ``--top`` functions by own time and
by calls.

    .venv/bin/python benchmarks/ingest_calls.py [--instances 200] [--warm-up 20] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import write_series  # noqa: E402 (benchmarks/ingest.py)

from config.settings import load_settings  # noqa: E402
from server.context import Principal, RequestContext  # noqa: E402
from server.dimse.c_store import file_meta  # noqa: E402
from storage.archive import open_archive  # noqa: E402
from storage.audit import Transfer  # noqa: E402
from storage.data_set_structure import skip_file_meta  # noqa: E402
from storage.group_commit import GroupCommit  # noqa: E402
from storage.ingest import Origin, Received  # noqa: E402

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def received_file(source: Path, tmp: Path) -> tuple[Path, str, tuple[str, int]]:
    """The file a C-STORE SCP writes for ``source``: (path, SOP Instance UID, (SHA-256, size))."""
    import pydicom

    uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    with open(source, "rb") as f:
        rest = skip_file_meta(f)
        assert rest is not None
        data = rest + f.read()
    body = file_meta(CT_IMAGE_STORAGE, uid, EXPLICIT_VR_LITTLE_ENDIAN) + data
    path = tmp / f"tmp-{source.name}"
    path.write_bytes(body)
    return path, uid, (hashlib.sha256(body).hexdigest(), len(body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--warm-up", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cumulative", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hilum-calls-") as folder:
        root = Path(folder)
        sources = write_series(root / "series", args.instances)
        settings = load_settings(None, server={"data_dir": root / "data"})
        archive = open_archive(settings, migrate=True)
        tmp = settings.server.data_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        received = [received_file(source, tmp) for source in sources]
        context = RequestContext(Principal("ae", "STORESCU"), "127.0.0.1", "dimse", request_id="A1")
        transfer = Transfer(context)
        ingest = GroupCommit(archive)
        profile = cProfile.Profile()
        for n, (path, uid, digest) in enumerate(received):
            item = Received(
                path,
                Origin("STORESCU", CT_IMAGE_STORAGE, uid),
                temporary=True,
                sha256=digest,
                requestor=context,
                transfer=transfer,
            )
            if n >= args.warm_up:
                profile.enable()
            ingest.ingest(item)
            profile.disable()
            path.unlink()
        archive.close()

    profiled = args.instances - args.warm_up
    stats = pstats.Stats(profile)
    calls = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
    print(f"{calls / profiled:.0f} function calls per instance ({profiled} instances profiled)")
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("ncalls").print_stats(args.top)
    if args.cumulative:
        stats.sort_stats("cumulative").print_stats(args.cumulative)


if __name__ == "__main__":
    main()
