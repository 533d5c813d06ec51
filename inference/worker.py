"""The AI worker: marks stable studies and queues their jobs, claims a job, runs its model on the
series (``inference.analysis.analyse_series``), stores the SEG and SR through ``storage.ingest``
into the same study, and marks the job done. The lease is renewed while the model runs and
checked again right before each output is stored, so a run whose job was re-queued meanwhile (new
input, a newer generation) stores nothing, and deletes what it stored if it lost the job between
storing and marking it done. A worker killed mid-job loses nothing: the job is claimed again once
its lease expires, and the new run (same generation) stores the same UIDs, so it replaces rather
than duplicates what the killed run may have stored.

``hilum worker`` runs one per GPU; ``hilum serve`` runs one in a thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from config import Settings
from config.logging import log_context
from inference.errors import AnalysisError, DecoderUnavailable, ModelError
from inference.measurement_report import job_finding, read_findings
from inference.stability import queue_stable_studies
from server.context import worker_context
from storage.archive import Archive
from storage.audit import deidentified_copy_entry
from storage.deidentify import Deidentifier
from storage.errors import InvalidInstance, NotFound, StorageUnavailable
from storage.ingest import Origin, ingest_file
from storage.jobs import Clock, Job, JobFinding, JobQueue, JobState, utc_now
from storage.research_copies import copy_study, is_copy_job

if TYPE_CHECKING:
    from inference.registry import Model

log = logging.getLogger(__name__)

# analyse_series(archive, model, study_uid, series_uid, *, job_key, device) -> datasets, every
# UID derived from job_key (the worker passes the job's output_key: key and generation)
Analyse = Callable[..., list[Dataset]]
# Failures that another attempt cannot cure: the job fails at once, with the reason.
# A missing decoder plug-in too: the job fails with what to install, then re-run it.
_PERMANENT = (AnalysisError, DecoderUnavailable, ModelError, InvalidInstance)


def _analyse_series(*args: Any, **kwargs: Any) -> list[Dataset]:
    from inference.analysis import analyse_series

    return analyse_series(*args, **kwargs)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class _Lease(threading.Thread):
    """Renews a running job's lease every third of ``lease_s`` until stopped."""

    def __init__(self, queue: JobQueue, job: Job, worker: str) -> None:
        super().__init__(name=f"lease-job-{job.id}", daemon=True)
        self.queue, self.job, self.worker = queue, job, worker
        self.lost = threading.Event()
        self._stopped = threading.Event()

    def run(self) -> None:
        with log_context(job_id=self.job.id):
            self._renew()

    def _renew(self) -> None:
        while not self._stopped.wait(self.queue.settings.lease_s / 3):
            try:
                if not self.queue.heartbeat(self.job, self.worker):
                    log.warning("job %d: lost its lease (re-queued or claimed again)", self.job.id)
                    self.lost.set()
                    return
            except StorageUnavailable as error:
                log.warning("job %d: lease not renewed: %s", self.job.id, error)
            except Exception:  # keep renewing: a dead lease thread would lose the job
                log.exception("job %d: lease not renewed", self.job.id)

    def stop(self) -> None:
        self._stopped.set()
        self.join()


class Worker:
    def __init__(
        self,
        settings: Settings,
        archive: Archive,
        models: Sequence[Model],
        *,
        analyse: Analyse | None = None,
        name: str | None = None,
        clock: Clock = utc_now,
        on_job_ended: Callable[[Job, float], None] | None = None,
    ) -> None:
        """``clock``: the time studies become stable and leases and backoffs run by (UTC); a
        test's own clock makes them expire without waiting."""
        self.settings = settings
        self.archive = archive
        self.models = list(models)
        self.clock = clock
        self.queue = JobQueue(archive, settings.inference, clock=clock)
        self.analyse = analyse or _analyse_series
        self.name = name or worker_name()
        # Told each attempt's outcome (the job as it ended) and its running seconds: metrics.
        self.on_job_ended = on_job_ended
        # The worker's own results replace those of an earlier attempt of the same generation
        # (same UIDs) whatever the archive's duplicate policy for what modalities send.
        self._results_archive = dataclasses.replace(archive, on_duplicate="overwrite")
        self._tmp_dir = settings.server.data_dir / "tmp"

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; a job in progress is finished first."""
        with log_context(worker=self.name):
            self._work(stop)

    def _work(self, stop: threading.Event) -> None:
        log.info(
            "worker %s: models %s", self.name, ", ".join(m.name for m in self.models) or "none"
        )
        while not stop.is_set():
            try:
                worked = self.step() is not None
            except StorageUnavailable as error:
                log.warning("worker %s: %s; retrying", self.name, error)
                worked = False
            except Exception:  # a bug must not stop AI for good: log it, back off, go on
                log.exception("worker %s: unexpected error; retrying", self.name)
                worked = False
            if not worked:
                stop.wait(self.settings.inference.poll_interval_s)
        log.info("worker %s: stopped", self.name)

    def step(self) -> Job | None:
        """Queue the jobs of newly stable studies, then run one job; the job as it ended, or
        None when none was waiting. Every partition's: the job's inputs are read from, and its
        results stored into, the partition of its study."""
        queue_stable_studies(self.archive, self.settings, self.models, now=self.clock())
        # The models' jobs and the research copies' ([[research.copies]]), of every partition.
        names = [model.name for model in self.models]
        names += [rule.job_name for rule in self.settings.research.copies]
        job = self.queue.claim(self.name, names, any_partition=True)
        if job is None:
            return None
        started = time.monotonic()
        with log_context(job_id=job.id):
            ended = (
                self.copy(self._queue(job), job)
                if is_copy_job(job.model_name)
                else self.process(job)
            )
        if self.on_job_ended is not None:
            self.on_job_ended(ended, time.monotonic() - started)
        return ended

    def process(self, job: Job) -> Job:
        log.info(
            "job %d: %s on series %s (attempt %d)",
            job.id,
            job.model_name,
            job.series_instance_uid,
            job.attempts,
        )
        lease = _Lease(self._queue(job), job, self.name)
        lease.start()
        stored: list[str] = []  # SOP Instance UIDs, as each output is stored
        findings: list[JobFinding] = []  # of each SR stored
        reports: list[str] = []  # SOP Instance UIDs of the SRs among ``stored``
        try:
            held = self._run(job, lease, stored, findings, reports)
        except _PERMANENT as error:
            return self._failed(job, _reason(error), stored, retry=False)
        except Exception as error:  # the model or the store; retried with backoff
            log.exception("job %d: attempt %d failed", job.id, job.attempts)
            return self._failed(job, _reason(error), stored, retry=True)
        finally:
            lease.stop()
        model = self._model(job)
        if not held or not self._queue(job).complete(
            job,
            self.name,
            model_version=model.version,
            outputs=stored,
            findings=findings if reports else None,
        ):
            self._lost(job, stored)
            return job
        log.info("job %d: done, stored %s", job.id, ", ".join(stored) or "nothing")
        return self._queue(job).get(job.id)

    def _queue(self, job: Job) -> JobQueue:
        """The queue of the job's partition (its findings and outputs are that partition's)."""
        if job.partition == self.queue.archive.partition:
            return self.queue
        return self.queue.in_partition(job.partition)

    def copy(self, queue: JobQueue, job: Job) -> Job:
        """A research copy job: the study, de-identified, into the rule's partition."""
        rule = self.settings.research.copy_rule(job.model_name)
        lease = _Lease(queue, job, self.name)
        lease.start()
        try:
            if rule is None:
                raise ModelError(f"no [[research.copies]] rule makes jobs {job.model_name!r}")
            project = self.settings.research.project(rule.project)
            assert project is not None  # checked with the settings
            deidentifier = Deidentifier(
                project.name,
                project.secret,
                frozenset(self.settings.research.held_back_modalities),
            )
            outcome = copy_study(
                self.archive.scoped(rule.from_partition),
                self._results_archive.scoped(rule.to),
                deidentifier,
                job.study_instance_uid,
                tmp_dir=self._tmp_dir,
                origin=Origin(calling_ae_title=self.settings.dimse.ae_title),
            )
            # Recorded in the source partition's trail (the link back stays clinical); a
            # failure to record fails the attempt, retried as any storage failure.
            self.archive.record(
                worker_context(job.id, rule.from_partition),
                deidentified_copy_entry(
                    job.study_instance_uid, outcome.copied, rule.to, rule.project
                ),
            )
        except (ModelError, NotFound) as error:
            return self._copy_failed(queue, job, str(error), retry=False)
        except Exception as error:  # the blob store, the index: retried with backoff
            log.exception("job %d: research copy attempt %d failed", job.id, job.attempts)
            return self._copy_failed(queue, job, _reason(error), retry=True)
        finally:
            lease.stop()
        if not queue.complete(job, self.name, model_version="1", outputs=[]):
            log.warning("job %d: research copy lost to a re-queue; not marked done", job.id)
            return job
        log.info(
            "job %d: research copy of study %s: %d instances copied, %d held back",
            job.id,
            job.study_instance_uid,
            outcome.copied,
            len(outcome.held_back),
        )
        for sop_instance_uid, why in outcome.held_back:  # for review; UIDs only, no names
            log.warning("job %d: instance %s held back: %s", job.id, sop_instance_uid, why)
        return queue.get(job.id)

    def _copy_failed(self, queue: JobQueue, job: Job, reason: str, *, retry: bool) -> Job:
        ended = queue.fail(job, self.name, reason, retry=retry)
        if ended is None:
            return job
        log.log(
            logging.ERROR if ended.state == JobState.FAILED else logging.WARNING,
            "job %d: research copy failed%s: %s",
            job.id,
            "" if ended.state == JobState.FAILED else ", retried later",
            reason,
        )
        return ended

    def _lost(self, job: Job, stored: list[str]) -> None:
        """Another run holds the job now; what this one stored goes unless still needed."""
        deleted = self._queue(job).discard_stale_outputs(job, stored) if stored else []
        log.warning(
            "job %d: lost to a re-queue or another worker; not marked done%s",
            job.id,
            f", deleted its stale results {', '.join(deleted)}" if deleted else "",
        )

    def _model(self, job: Job) -> Model:
        for model in self.models:
            if model.name == job.model_name:
                return model
        raise ModelError(
            f"model {job.model_name!r} is not installed on worker {self.name} "
            f"(models_dirs: {', '.join(map(str, self.settings.inference.models_dirs))})"
        )

    def _run(
        self,
        job: Job,
        lease: _Lease,
        stored: list[str],
        findings: list[JobFinding],
        reports: list[str],
    ) -> bool:
        """Analyse and store, appending to ``stored`` (and each SR's UID to ``reports``, its
        findings to ``findings``); False when the job was lost first."""
        model = self._model(job)
        datasets = self.analyse(
            self.archive.scoped(job.partition),
            model,
            job.study_instance_uid,
            job.series_instance_uid,
            job_key=job.output_key,
            device=self.settings.inference.device or None,
        )
        for dataset in datasets:
            # Still this worker's job, and this generation of it? (Renews the lease too.)
            if lease.lost.is_set() or not self._queue(job).heartbeat(job, self.name):
                return False
            stored.append(self._store(job, dataset))
            if dataset.get("ValueType") == "CONTAINER":  # an SR document (PS3.3 C.17.3)
                if not reports:  # the measurement report; a second SR holds only outlines
                    findings += [job_finding(stored[-1], f) for f in read_findings(dataset)]
                reports.append(stored[-1])
        return True

    def _store(self, job: Job, dataset: Dataset) -> str:
        """Store one result through the ingest path, as any other instance, into the partition
        of the job's study."""
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(suffix=".dcm", dir=self._tmp_dir)
        os.close(handle)
        path = Path(name)
        try:
            dataset.save_as(path, enforce_file_format=True)
            origin = Origin(calling_ae_title=self.settings.dimse.ae_title)
            return ingest_file(
                self._results_archive.scoped(job.partition),
                path,
                origin,
                requestor=worker_context(job.id, job.partition),
            ).sop_instance_uid
        finally:
            path.unlink(missing_ok=True)

    def _failed(self, job: Job, reason: str, stored: list[str], *, retry: bool) -> Job:
        ended = self._queue(job).fail(job, self.name, reason, retry=retry)
        if ended is None:
            log.warning("job %d: failed after losing its lease: %s", job.id, reason)
            self._lost(job, stored)
            return job
        # Part of the outputs stored before the failure: a retry stores them again.
        self._queue(job).delete_outputs(job.study_instance_uid, stored)
        if ended.state == JobState.FAILED:
            log.error("job %d: failed: %s", job.id, reason)
        else:
            log.warning(
                "job %d: attempt %d failed, retried later: %s", job.id, job.attempts, reason
            )
        return ended


def _reason(error: BaseException) -> str:
    if isinstance(error, AnalysisError):
        return f"the input cannot be analysed: {error}"
    if isinstance(error, (ModelError, DecoderUnavailable)):
        return str(error)
    return f"{type(error).__name__}: {error}"
