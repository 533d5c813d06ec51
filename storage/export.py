"""Exports to a folder: studies as DICOM Part 10 files, or a training set.

``export_studies`` writes each instance of the named studies, as stored (the bytes received)
or de-identified (``storage.deidentify``, recorded in ``storage.pseudonyms``), to
``<folder>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (the new UIDs when
de-identified). ``export_training_set`` writes a partition's image series, the AI worker's SEG
and SR of them and a ``manifest.json`` with each series' labels (layout in
docs/deidentification.md):

    <folder>/manifest.json
    <folder>/images/<study>/<series>/<instance>.dcm     the images a model read
    <folder>/labels/<study>/<series>/<instance>.dcm     the AI's SEG and SR of them

Files are written under a temporary name and renamed, so a folder never holds half a file.
Instances de-identification holds back (text in the pixels) are listed, not written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread

from storage.deidentify import Deidentified, Deidentifier, HeldBack, deidentify
from storage.dicom_file import is_valid_uid
from storage.errors import InvalidQuery
from storage.jobs import JobQueue, JobState
from storage.pseudonyms import record_deidentified_study
from storage.query import Query, QueryLevel, StoredInstance, entity_query, locate_instances, search
from storage.reviews import reviews_for_study

if TYPE_CHECKING:
    from config.settings import InferenceSettings
    from storage.archive import Archive

MANIFEST_FORMAT = "hilum-training-set/1"
_DEFER = "1 MB"  # larger elements (pixel data) stay in the file until written out


@dataclass
class ExportSummary:
    studies: int = 0
    instances: int = 0
    held_back: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, why)
    missing: list[str] = field(default_factory=list)  # Study Instance UIDs not in the archive

    def lines(self) -> list[str]:
        lines = [f"{self.instances} instances of {self.studies} studies written"]
        lines += [f"held back {uid}: {why}" for uid, why in self.held_back]
        lines += [f"no such study {uid}" for uid in self.missing]
        return lines


class _Writer:
    """Writes one stored instance into ``root``, as stored or de-identified."""

    def __init__(self, archive: Archive, root: Path, deidentifier: Deidentifier | None) -> None:
        self.archive = archive
        self.root = root
        self.deidentifier = deidentifier
        self.recorded: set[str] = set()

    def uid(self, uid: str) -> str:
        return self.deidentifier.new_uid(uid) if self.deidentifier else uid

    def write(self, instance: StoredInstance, folder: str = "") -> Path:
        """The file written, relative to ``root``; raises :class:`HeldBack`."""
        relative = (
            Path(folder)
            / self.uid(instance.study_instance_uid)
            / self.uid(instance.series_instance_uid)
            / f"{self.uid(instance.sop_instance_uid)}.dcm"
        )
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.deidentifier is None:
            write_as_stored(self.archive, instance.blob_key, target, instance.tier)
            return relative
        done = write_deidentified(
            self.archive, instance.blob_key, self.deidentifier, target, instance.tier
        )
        if done.original_study_instance_uid not in self.recorded:
            record_deidentified_study(self.archive, self.deidentifier.project, done)
            self.recorded.add(done.original_study_instance_uid)
        return relative


def write_as_stored(archive: Archive, blob_key: str, target: Path, tier: str = "") -> None:
    """The stored file's bytes (in storage tier ``tier``, as the index says) to ``target``
    (through a temporary file in its folder)."""
    handle, name = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out, archive.blobs.open(blob_key, tier=tier) as blob:
            shutil.copyfileobj(blob, out, 1 << 20)
        Path(name).replace(target)
    finally:
        Path(name).unlink(missing_ok=True)


def write_deidentified(
    archive: Archive, blob_key: str, deidentifier: Deidentifier, target: Path, tier: str = ""
) -> Deidentified:
    """The stored file, de-identified, to ``target``; raises :class:`HeldBack` (nothing
    written). The pixel data stay in the spooled copy until written out (never in memory)."""
    spooled = target.with_name(f".tmp-{target.name}.source")
    try:
        write_as_stored(archive, blob_key, spooled, tier)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd values of a stored header are not ours to fix
            ds = dcmread(spooled, defer_size=_DEFER)
            done = deidentify(ds, deidentifier)
            handle, name = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=target.parent)
            os.close(handle)
            try:
                ds.save_as(name, enforce_file_format=True)
                Path(name).replace(target)
            finally:
                Path(name).unlink(missing_ok=True)
        return done
    finally:
        spooled.unlink(missing_ok=True)


def _check_uids(uids: Iterable[str]) -> list[str]:
    uids = list(uids)
    for uid in uids:
        if not is_valid_uid(uid):
            raise InvalidQuery(f"{uid[:80]!r} is not a Study Instance UID")
    return uids


def export_studies(
    archive: Archive,
    study_uids: Iterable[str],
    target: Path,
    *,
    deidentifier: Deidentifier | None = None,
    progress: Callable[[int], object] | None = None,
) -> ExportSummary:
    """Writes every instance of ``study_uids`` under ``target`` (see the module)."""
    writer = _Writer(archive, target, deidentifier)
    summary = ExportSummary()
    for study_uid in _check_uids(study_uids):
        instances = list(locate_instances(archive, entity_query(study_uid)))
        if not instances:
            summary.missing.append(study_uid)
            continue
        summary.studies += 1
        for instance in instances:
            try:
                writer.write(instance)
                summary.instances += 1
            except HeldBack as held:
                summary.held_back.append((instance.sop_instance_uid, str(held)))
            if progress is not None:
                progress(1)
    return summary


def export_training_set(
    archive: Archive,
    inference: InferenceSettings,
    target: Path,
    *,
    deidentifier: Deidentifier | None = None,
    progress: Callable[[int], object] | None = None,
) -> ExportSummary:
    """Writes the partition's image series, the SEG and SR of their done AI jobs, and
    ``manifest.json``: per image series its images and labels (each done job's model, SEG,
    SR and findings, with the reviewers' latest decision on each finding)."""
    writer = _Writer(archive, target, deidentifier)
    queue = JobQueue(archive, inference)
    summary = ExportSummary()
    manifest_series: list[dict[str, Any]] = []
    studies = [
        row["StudyInstanceUID"]
        for row in search(archive, Query(level=QueryLevel.STUDY, matching={}))
    ]
    for study_uid in studies:
        summary.studies += 1
        jobs = [job for job in queue.for_study(study_uid) if job.state == JobState.DONE]
        outputs = {uid for job in jobs for uid in job.outputs}
        decisions = {r.tracking_uid: r for r in reviews_for_study(archive, study_uid)}
        reviews = {r.review_sop_instance_uid for r in decisions.values()}
        findings = defaultdict(list)
        for job, finding in queue.findings_of_study(study_uid):
            findings[job.id].append(finding)
        modality = {
            row["SeriesInstanceUID"]: row.get("Modality")
            for row in search(
                archive,
                Query(
                    level=QueryLevel.SERIES,
                    matching={"StudyInstanceUID": study_uid},
                    return_keys=["Modality"],
                ),
            )
        }
        images: dict[str, list[str]] = defaultdict(list)
        written: dict[str, str] = {}  # SOP Instance UID -> path of an output written
        held: dict[str, list[str]] = defaultdict(list)
        for instance in locate_instances(archive, entity_query(study_uid)):
            if instance.sop_instance_uid in reviews:
                continue  # the decision is in the manifest; the SR names the reviewer
            output = instance.sop_instance_uid in outputs
            try:
                path = writer.write(instance, "labels" if output else "images")
            except HeldBack as why:
                summary.held_back.append((instance.sop_instance_uid, str(why)))
                held[instance.series_instance_uid].append(str(why))
                continue
            finally:
                if progress is not None:
                    progress(1)
            summary.instances += 1
            if output:
                written[instance.sop_instance_uid] = path.as_posix()
            else:
                images[instance.series_instance_uid].append(path.as_posix())
        for series_uid, paths in images.items():
            labels = [
                _labels(job, findings[job.id], written, decisions, writer.uid)
                for job in jobs
                if job.series_instance_uid == series_uid
            ]
            manifest_series.append(
                {
                    "StudyInstanceUID": writer.uid(study_uid),
                    "SeriesInstanceUID": writer.uid(series_uid),
                    "Modality": modality.get(series_uid),
                    "images": paths,
                    "labels": labels,
                    "held_back": held.get(series_uid, []),
                }
            )
    manifest = {
        "format": MANIFEST_FORMAT,
        "partition": archive.partition,
        "deidentified": deidentifier.project if deidentifier else None,
        "series": manifest_series,
    }
    _write_json(target / "manifest.json", manifest)
    return summary


def _labels(
    job: Any,
    findings: list[Any],
    written: dict[str, str],
    decisions: dict[str, Any],
    uid: Callable[[str], str],
) -> dict[str, Any]:
    files = [written[output] for output in job.outputs if output in written]
    segmentations = {f.segmentation_sop_instance_uid for f in findings}
    reports = {f.report_sop_instance_uid for f in findings}
    return {
        "job": job.id,
        "model": {"name": job.model_name, "version": job.model_version},
        "segmentation": next((written[s] for s in segmentations if s in written), None),
        "report": next((written[r] for r in reports if r in written), None),
        "files": files,
        "findings": [
            {
                "finding": f.finding,
                "finding_code": f.finding_code,
                "site": f.site,
                "present": f.present,
                "size": f.size,
                "size_unit": f.size_unit,
                "segment_number": f.segment_number,
                "tracking_uid": uid(f.tracking_uid),
                "decision": _decision(decisions.get(f.tracking_uid)),
            }
            for f in findings
        ],
    }


def _decision(review: Any) -> dict[str, str] | None:
    """The latest decision on a finding (the reviewer's name and comment stay behind)."""
    if review is None:
        return None
    return {"decision": str(review.decision), "decided_at": review.decided_at.isoformat()}


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    temporary.replace(path)
