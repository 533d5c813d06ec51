"""A synthetic index for the query benchmarks: 100 000 studies / 1 000 000 instances by default.

Rows go straight into the index tables with bulk inserts (the fast path is for benchmarks only:
no blobs are written and the ingest path is bypassed). The data are deterministic for a seed:

* patients: two studies each; names ``SURNAME^GIVEN`` from 200 surnames x 50 given names;
* studies: dates spread evenly over 2016-01-01 .. 2025-12-31, accession ``ACC%08d``;
* series: three per study, modality drawn from CT/MR/CR/US/SR (CT most common);
* instances: ``instances_per_study`` per study, spread over its series.

``SyntheticIndexFacts`` names values the benchmarks query with (a surname prefix, a patient ID,
a month, an accession number) and the number of studies each should match, so a benchmark can
check that it timed the query it meant to.

    .venv/bin/python benchmarks/synthetic_index.py --database-url URL [--studies N]
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, insert, select

from storage.archive import Archive
from storage.index.models import Instance, Patient, Series, Study

SURNAMES = [f"{a}{b}" for a in ("SMITH", "JONES", "BROWN", "MILLER", "DAVIS") for b in range(40)]
GIVEN = [f"GIVEN{n}" for n in range(50)]
MODALITIES = ["CT", "CT", "CT", "MR", "MR", "CR", "US", "SR"]
FIRST_DAY = datetime.date(2016, 1, 1)
DAYS = (datetime.date(2025, 12, 31) - FIRST_DAY).days + 1
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BATCH = 5000


@dataclass(frozen=True)
class SyntheticIndexFacts:
    studies: int
    instances: int
    patient_name_prefix: str  # e.g. "SMITH1*": matches the studies of one surname
    patient_id: str  # exact: the two studies of one patient
    month_range: str  # StudyDate range of one month, e.g. "20210301-20210331"
    accession_number: str  # exact: one study
    study_instance_uid: str  # one study with its instances


def _uid(kind: int, n: int) -> str:
    return f"1.2.826.0.1.3680043.10.1337.{kind}.{n}"


def build_synthetic_index(
    archive: Archive,
    *,
    studies: int = 100_000,
    instances_per_study: int = 10,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> SyntheticIndexFacts:
    """Fill an empty, migrated index with ``studies`` synthetic studies."""
    rng = random.Random(seed)
    partition = archive.partition
    now = datetime.datetime.now(datetime.UTC)
    with archive.index.read() as session:
        if session.execute(select(func.count()).select_from(Study)).scalar_one():
            raise SystemExit("the synthetic index needs an empty database")
    patient_pk = study_pk = series_pk = instance_pk = 0
    started = time.monotonic()
    for first in range(0, studies, BATCH):
        rows: dict[type, list[dict]] = {Patient: [], Study: [], Series: [], Instance: []}
        for s in range(first, min(first + BATCH, studies)):
            if s % 2 == 0:
                patient_pk += 1
                name = f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}"
                rows[Patient].append(
                    {
                        "id": patient_pk,
                        "partition": partition,
                        "patient_id": f"PID{patient_pk:07d}",
                        "patient_name": name,
                        "patient_name_upper": name,
                        "patient_birth_date": f"19{rng.randint(30, 99)}0101",
                        "patient_sex": rng.choice("MF"),
                    }
                )
            study_pk += 1
            modalities = [rng.choice(MODALITIES) for _ in range(3)]
            date = FIRST_DAY + datetime.timedelta(days=s * DAYS // studies)
            rows[Study].append(
                {
                    "id": study_pk,
                    "partition": partition,
                    "patient_pk": patient_pk,
                    "study_instance_uid": _uid(1, study_pk),
                    "study_date": date.strftime("%Y%m%d"),
                    "study_time": f"{rng.randint(0, 23):02d}{rng.randint(0, 59):02d}00",
                    "accession_number": f"ACC{study_pk:08d}",
                    "study_id": str(study_pk),
                    "study_description": f"{modalities[0]} synthetic study",
                    "referring_physician_name": "REFERRER^A",
                    "modalities_in_study": "\\".join(sorted(set(modalities))),
                    "created_at": now,
                    "last_instance_at": now,
                }
            )
            for number, modality in enumerate(modalities, start=1):
                series_pk += 1
                rows[Series].append(
                    {
                        "id": series_pk,
                        "partition": partition,
                        "study_pk": study_pk,
                        "series_instance_uid": _uid(2, series_pk),
                        "modality": modality,
                        "series_number": number,
                        "series_description": f"{modality} series {number}",
                        "body_part_examined": "CHEST",
                        "series_date": date.strftime("%Y%m%d"),
                        "series_time": "",
                    }
                )
                share = instances_per_study // 3 + (number <= instances_per_study % 3)
                for n in range(share):
                    instance_pk += 1
                    sop_uid = _uid(3, instance_pk)
                    rows[Instance].append(
                        {
                            "id": instance_pk,
                            "partition": partition,
                            "series_pk": series_pk,
                            "sop_instance_uid": sop_uid,
                            "sop_class_uid": CT_IMAGE,
                            "instance_number": n + 1,
                            "number_of_frames": 1,
                            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                            "blob_key": f"synthetic/{instance_pk}",
                            "size": 0,
                            "sha256": "0" * 64,
                            "calling_ae_title": "SYNTHETIC",
                            "received_at": now,
                            "metadata_json": {"00080018": {"vr": "UI", "Value": [sop_uid]}},
                            "frame_ranges": None,
                        }
                    )
        with archive.index.write() as session:
            for model in (Patient, Study, Series, Instance):
                if rows[model]:
                    session.execute(insert(model), rows[model])
        if progress:
            done = min(first + BATCH, studies)
            progress(f"{done}/{studies} studies, {time.monotonic() - started:.0f} s")
    with archive.index.engine.connect() as connection:
        if archive.index.dialect == "postgresql":
            # Explicit ids were inserted: move the sequences past them for later ingests.
            for table in ("patient", "study", "series", "instance"):
                connection.exec_driver_sql(
                    f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))"
                )
        connection.exec_driver_sql("ANALYZE")
        connection.commit()
    return _facts(archive, studies, instance_pk)


def existing_index_facts(archive: Archive) -> SyntheticIndexFacts | None:
    """The facts of a synthetic index built earlier in this database; None when it is empty."""
    with archive.index.read() as session:
        studies = session.execute(select(func.count()).select_from(Study)).scalar_one()
        instances = session.execute(select(func.count()).select_from(Instance)).scalar_one()
    return _facts(archive, studies, instances) if studies else None


def _facts(archive: Archive, studies: int, instances: int) -> SyntheticIndexFacts:
    middle = max(1, studies // 2)
    with archive.index.read() as session:
        name, patient_id = session.execute(
            select(Patient.patient_name, Patient.patient_id).where(Patient.id == middle // 2 + 1)
        ).one()
        date = session.execute(select(Study.study_date).where(Study.id == middle)).scalar_one()
    month = date[:6]
    return SyntheticIndexFacts(
        studies=studies,
        instances=instances,
        patient_name_prefix=name.split("^")[0] + "*",
        patient_id=patient_id,
        month_range=f"{month}01-{month}31",
        accession_number=f"ACC{middle:08d}",
        study_instance_uid=_uid(1, middle),
    )


def main() -> int:
    from config import load_settings
    from storage.archive import open_archive

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--instances-per-study", type=int, default=10)
    args = parser.parse_args()
    settings = load_settings(None, storage={"database_url": args.database_url})
    archive = open_archive(settings, migrate=True)
    facts = build_synthetic_index(
        archive,
        studies=args.studies,
        instances_per_study=args.instances_per_study,
        progress=lambda line: print(line, file=sys.stderr),
    )
    print(facts)
    archive.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
