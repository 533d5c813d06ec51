"""A bare pynetdicom C-STORE SCP: the Python ceiling for ``benchmarks/ingest.py``.

It accepts CT Image Storage in the common uncompressed transfer syntaxes and writes each
received data set, as encoded on the wire with its file meta information, to ``<out>/<n>.dcm``.
No parsing, indexing or fsync: whatever Hilum does on top of this costs time.

    .venv/bin/python benchmarks/bare_scp.py --port 11113 --out /tmp/received
"""

from __future__ import annotations

import argparse
import itertools
import signal
import threading
from pathlib import Path

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]

# next() on itertools.count is atomic under the GIL, so handler threads get distinct numbers.
_numbers = itertools.count(1)


def handle_store(event: Event, out_dir: Path) -> int:
    path = out_dir / f"{next(_numbers)}.dcm"
    path.write_bytes(event.encoded_dataset())
    return 0x0000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for received files")
    parser.add_argument("--ae-title", default="BARESCP")
    parser.add_argument(
        "--max-pdu", type=int, default=16382, help="Maximum Length Received (0: no limit)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    ae = AE(ae_title=args.ae_title)
    ae.maximum_associations = 32
    ae.maximum_pdu_size = args.max_pdu
    ae.add_supported_context(CTImageStorage, TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", args.port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, handle_store, [args.out])],
    )
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    print(f"bare SCP {args.ae_title} listening on 127.0.0.1:{args.port}", flush=True)
    stopped.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
