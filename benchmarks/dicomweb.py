"""DICOMweb figures: QIDO-RS latency, WADO-RS metadata and frame latency, STOW-RS throughput.

What is measured (over HTTP on loopback, the app on ``server.app.HttpServer``, cheroot, in this
process, as ``hilum serve`` runs it):

* QIDO-RS ``/studies`` on a synthetic index (``benchmarks/synthetic_index.py``; ``--studies``,
  default 100 000 studies / 1 000 000 instances): p50 and p95 for a PatientName prefix wild card,
  an exact PatientID, a one-month StudyDate range, ModalitiesInStudy=CT and an exact
  AccessionNumber, each with the default study return keys.
* STOW-RS: a 1 000-instance CT series (64x64, explicit VR little endian) stored in requests of 50
  instances; instances/s.
* WADO-RS series metadata of that 1 000-instance series (served from the index): p50 and p95.
* WADO-RS frame retrieval from the S3 backend (SeaweedFS started here unless ``--s3-endpoint``):
  a 256-frame JPEG whole-slide image, random single frames; p50 and p95.
* The cost of authentication (``[auth] enabled``): a WADO-RS frame (files backend) and a QIDO-RS
  PatientID query, each with ``Authorization: Bearer`` (an API token, verified once, then from
  the process's cache) against the same request to the same archive without authentication,
  in interleaved rounds (A B A B); p50 of each, the range of the rounds' p50s, CPU per request
  (client and server share this process); and the cached token check alone.

Hilum only: Orthanc cannot be loaded with 1 M instances in a benchmark's time, so
``benchmarks/versus_orthanc.py`` compares every transaction here with Orthanc's DICOMweb plugin on
a smaller index holding the same instances in both. Figures go to stdout, progress to
stderr.

    .venv/bin/python benchmarks/dicomweb.py [--studies N] [--database-url URL] [--repeat N]
        [--only qido,stow,frames,auth]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import requests
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.synthetic_index import build_synthetic_index  # noqa: E402
from config import load_settings  # noqa: E402
from server.app import HttpServer, create_app  # noqa: E402
from storage.archive import open_archive  # noqa: E402
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY, SeaweedFS, free_port  # noqa: E402
from tests.factories import ct_instance  # noqa: E402
from tests.server.dicomweb.test_wsi_frames import jpeg_tile, whole_slide_image  # noqa: E402

STOW_BATCH = 50
BOUNDARY = "hilum-benchmark"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return statistics.median(ordered) * 1000, p95 * 1000


def timed_get(session: requests.Session, url: str, **kwargs: object) -> tuple[float, bytes]:
    start = time.perf_counter()
    response = session.get(url, timeout=120, **kwargs)  # type: ignore[arg-type]
    body = response.content
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, body


def serve(settings, archive) -> tuple[HttpServer, str]:  # type: ignore[no-untyped-def]
    server = HttpServer(create_app(settings, archive), "127.0.0.1", free_port())
    server.start()
    return server, f"http://127.0.0.1:{server.port}/dicomweb"


def part10(ds) -> bytes:  # type: ignore[no-untyped-def]
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def stow_body(parts: list[bytes]) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


def qido(args: argparse.Namespace, work: Path) -> None:
    storage = {"database_url": args.database_url} if args.database_url else {}
    settings = load_settings(None, server={"data_dir": work / "qido"}, storage=storage)
    archive = open_archive(settings, migrate=True)
    log(f"building the synthetic index: {args.studies} studies")
    facts = build_synthetic_index(archive, studies=args.studies, progress=log)
    server, base = serve(settings, archive)
    queries = {
        f"PatientName={facts.patient_name_prefix}": {"PatientName": facts.patient_name_prefix},
        f"PatientID={facts.patient_id}": {"PatientID": facts.patient_id},
        f"StudyDate={facts.month_range}": {"StudyDate": facts.month_range},
        "ModalitiesInStudy=CT (limit=100)": {"ModalitiesInStudy": "CT", "limit": "100"},
        f"AccessionNumber={facts.accession_number}": {"AccessionNumber": facts.accession_number},
    }
    print(f"\nQIDO-RS /studies, {facts.studies} studies / {facts.instances} instances, "
          f"{archive.index.dialect}, {args.repeat} runs each")  # fmt: skip
    print("| query | matches | p50 ms | p95 ms |\n|---|---|---|---|")
    with requests.Session() as session:
        for name, params in queries.items():
            samples, matches = [], 0
            for _ in range(args.repeat):
                elapsed, body = timed_get(session, f"{base}/studies", params=params)
                samples.append(elapsed)
                matches = body.count(b'"0020000D"')
            p50, p95 = percentiles(samples)
            print(f"| {name} | {matches} | {p50:.1f} | {p95:.1f} |", flush=True)
    server.stop()
    archive.close()


def stow_and_metadata(args: argparse.Namespace, work: Path) -> None:
    settings = load_settings(None, server={"data_dir": work / "stow"})
    archive = open_archive(settings, migrate=True)
    server, base = serve(settings, archive)
    study, series = generate_uid(), generate_uid()
    log("encoding 1000 CT instances")
    parts = [part10(ct_instance(study, series, seed=i, size=64)) for i in range(1000)]
    with requests.Session() as session:
        start = time.perf_counter()
        for first in range(0, len(parts), STOW_BATCH):
            response = session.post(
                f"{base}/studies",
                data=stow_body(parts[first : first + STOW_BATCH]),
                headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; '
                    f"boundary={BOUNDARY}"
                },
                timeout=600,
            )
            response.raise_for_status()
        elapsed = time.perf_counter() - start
        print(f"\nSTOW-RS, SQLite + files: 1000 instances (64x64 CT, {STOW_BATCH} per request) "
              f"in {elapsed:.1f} s = {1000 / elapsed:.0f} instances/s")  # fmt: skip
        samples = []
        for _ in range(args.repeat):
            elapsed, body = timed_get(session, f"{base}/studies/{study}/series/{series}/metadata")
            samples.append(elapsed)
        p50, p95 = percentiles(samples)
        print(f"WADO-RS series metadata, 1000 instances ({len(body) / 1e6:.1f} MB of DICOM JSON): "
              f"p50 {p50:.0f} ms, p95 {p95:.0f} ms")  # fmt: skip
    server.stop()
    archive.close()


def wsi_frames(args: argparse.Namespace, work: Path) -> None:
    seaweedfs = None
    endpoint = args.s3_endpoint
    if not endpoint:
        (work / "seaweedfs").mkdir()
        seaweedfs = SeaweedFS(work / "seaweedfs")
        endpoint = seaweedfs.start().endpoint
    try:
        settings = load_settings(
            None,
            server={"data_dir": work / "wsi"},
            storage={
                "blob_url": f"s3://hilum-bench?endpoint={endpoint}",
                "s3_access_key": S3_ACCESS_KEY,
                "s3_secret_key": S3_SECRET_KEY,
            },
        )
        archive = open_archive(settings, migrate=True)
        server, base = serve(settings, archive)
        slide = whole_slide_image([jpeg_tile(i % 12) for i in range(256)])
        with requests.Session() as session:
            response = session.post(
                f"{base}/studies",
                data=stow_body([part10(slide)]),
                headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                         f"boundary={BOUNDARY}"},
                timeout=600,
            )  # fmt: skip
            response.raise_for_status()
            url = (
                f"{base}/studies/{slide.StudyInstanceUID}/series/{slide.SeriesInstanceUID}"
                f"/instances/{slide.SOPInstanceUID}/frames/"
            )
            rng = random.Random(0)
            samples = []
            accept = {"Accept": 'multipart/related; type="image/jpeg"'}
            for _ in range(max(args.repeat, 50)):
                elapsed, _ = timed_get(session, url + str(rng.randint(1, 256)), headers=accept)
                samples.append(elapsed)
        p50, p95 = percentiles(samples)
        print(f"\nWADO-RS frame, 256-frame JPEG WSI on S3 (SeaweedFS), {len(samples)} random "
              f"frames: p50 {p50:.1f} ms, p95 {p95:.1f} ms")  # fmt: skip
        server.stop()
        archive.close()
    finally:
        if seaweedfs is not None:
            seaweedfs.stop()


def authentication(args: argparse.Namespace, work: Path) -> None:
    from server.authentication import Authenticator
    from storage.accounts import Accounts

    settings = load_settings(None, server={"data_dir": work / "auth"})
    archive = open_archive(settings, migrate=True)
    log("building a small synthetic index and storing a 256-frame slide")
    facts = build_synthetic_index(archive, studies=2000, progress=log)
    accounts = Accounts(archive.index)
    accounts.add_account("bench", "radiologist")
    token = accounts.create_token("bench")[1]
    secured = settings.model_copy(
        update={"auth": settings.auth.model_copy(update={"enabled": True})}
    )
    plain_app, auth_app = create_app(settings, archive), create_app(secured, archive)
    plain_server = HttpServer(plain_app, "127.0.0.1", free_port())
    auth_server = HttpServer(auth_app, "127.0.0.1", free_port())
    plain_server.start()
    auth_server.start()
    plain = f"http://127.0.0.1:{plain_server.port}/dicomweb"
    secure = f"http://127.0.0.1:{auth_server.port}/dicomweb"
    slide = whole_slide_image([jpeg_tile(i % 12) for i in range(256)])
    with requests.Session() as session:
        session.post(
            f"{plain}/studies", data=stow_body([part10(slide)]),
            headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                     f"boundary={BOUNDARY}"}, timeout=600,
        ).raise_for_status()  # fmt: skip
    frames = (
        f"/studies/{slide.StudyInstanceUID}/series/{slide.SeriesInstanceUID}"
        f"/instances/{slide.SOPInstanceUID}/frames/"
    )
    accept = {"Accept": 'multipart/related; type="image/jpeg"'}
    bearer = {"Authorization": f"Bearer {token}"}
    requests_per_round, rounds = 100, max(10, args.repeat)
    print(f"\nAuthentication cost, SQLite + files, {rounds} interleaved rounds of "
          f"{requests_per_round} requests, one keep-alive connection each")  # fmt: skip
    print(
        "| request | without auth p50 ms | bearer token p50 ms | added ms (median of the "
        "rounds' differences) | round p50 ranges (without / with) | CPU per request without / "
        "with ms | fastest round p50 without / with ms |\n|---|---|---|---|---|---|---|"
    )
    cases = {
        "WADO-RS frame (JPEG, files)": (frames, accept, True),
        f"QIDO-RS /studies?PatientID= ({facts.studies} studies)": (
            f"/studies?PatientID={facts.patient_id}", {}, False),
    }  # fmt: skip
    for name, (path, headers, is_frame) in cases.items():
        samples: dict[str, list[float]] = {"A": [], "B": []}
        round_p50s: dict[str, list[float]] = {"A": [], "B": []}
        cpu: dict[str, float] = {"A": 0.0, "B": 0.0}
        rng = random.Random(0)
        with requests.Session() as a, requests.Session() as b:
            for session, base, extra in ((a, plain, {}), (b, secure, bearer)):
                for _ in range(20):  # warm: connections, caches, the token's verification
                    timed_get(session, base + (path + "1" if is_frame else path),
                              headers={**headers, **extra})  # fmt: skip
            for _ in range(rounds):
                for label, session, base, extra in (("A", a, plain, {}), ("B", b, secure, bearer)):
                    this_round = []
                    started_cpu = time.process_time()
                    for _ in range(requests_per_round):
                        url = base + (path + str(rng.randint(1, 256)) if is_frame else path)
                        elapsed, _ = timed_get(session, url, headers={**headers, **extra})
                        this_round.append(elapsed)
                    cpu[label] += time.process_time() - started_cpu
                    samples[label] += this_round
                    round_p50s[label].append(statistics.median(this_round) * 1000)
        total = rounds * requests_per_round
        p50 = {k: statistics.median(v) * 1000 for k, v in samples.items()}
        ranges = " / ".join(
            f"{min(round_p50s[k]):.3f}-{max(round_p50s[k]):.3f}" for k in ("A", "B")
        )
        # Each B round follows its A round: their difference cancels the machine's drift.
        added = statistics.median(
            b - a for a, b in zip(round_p50s["A"], round_p50s["B"], strict=True)
        )
        print(f"| {name} | {p50['A']:.3f} | {p50['B']:.3f} | {added:+.3f} | "
              f"{ranges} | {cpu['A'] / total * 1000:.3f} / {cpu['B'] / total * 1000:.3f} | "
              f"{min(round_p50s['A']):.3f} / {min(round_p50s['B']):.3f} |",
              flush=True)  # fmt: skip
    # The access check alone, in process: every before_request of the app (request context,
    # metrics clock, access check) and the session's opening, with a bearer token against none,
    # in interleaved rounds; the fastest round of each is the least disturbed by other load.
    count, in_process = 2000, {"without auth": [], "bearer token": []}
    for _ in range(30):
        for label, app, extra in (
            ("without auth", plain_app, {}), ("bearer token", auth_app, bearer),
        ):  # fmt: skip
            start = time.perf_counter()
            for _ in range(count):
                with app.test_request_context("/dicomweb/studies", headers=extra):
                    app.preprocess_request()
            in_process[label].append((time.perf_counter() - start) / count * 1e6)
    paired = statistics.median(
        b - a for a, b in zip(in_process["without auth"], in_process["bearer token"], strict=True)
    )
    print("request context + before_request hooks, in process, 30 interleaved rounds of "
          f"{count}: fastest round without auth {min(in_process['without auth']):.1f} µs, with a "
          f"bearer token {min(in_process['bearer token']):.1f} µs; median of the rounds' "
          f"differences {paired:+.1f} µs")  # fmt: skip
    authenticator = Authenticator(secured.auth, accounts)
    authenticator.bearer(token)
    count = 100_000
    start = time.perf_counter()
    for _ in range(count):
        authenticator.bearer(token)
    per_call = (time.perf_counter() - start) / count * 1e6
    print(f"cached token check alone (Authenticator.bearer, {count} calls): {per_call:.2f} µs each")
    plain_server.stop()
    auth_server.stop()
    archive.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--database-url", default="", help="empty: SQLite in a temporary dir")
    parser.add_argument("--s3-endpoint", default="", help="empty: start SeaweedFS here")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--only", default="qido,stow,frames,auth", help="sections to run")
    args = parser.parse_args()
    sections = {"qido": qido, "stow": stow_and_metadata, "frames": wsi_frames,
                "auth": authentication}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hilum-bench-") as tmp:
        work = Path(tmp)
        for name in args.only.split(","):
            sections[name.strip()](args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
