"""Prometheus metrics (prometheus_client): what each Hilum process counts, and ``/metrics``.

One :class:`Metrics` per process, built at start-up and passed down (no metric is created at
import time). ``hilum serve`` serves it at ``/metrics`` of its HTTP server; ``hilum dimse`` and
``hilum worker`` on ``[metrics] port`` (:class:`MetricsServer`); ``hilum web`` at ``/metrics`` of
each gunicorn worker, which answers for all of them through prometheus_client's multiprocess mode
(each process writes its values to files in ``$PROMETHEUS_MULTIPROC_DIR``; a scrape adds them
up). The library chooses that mode when it is imported, from the environment: ``hilum web``
sets the variable before anything imports it (``server/cli.py``).

No label carries patient data: transports, outcomes, services, model names, states.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from storage.errors import StorageError
from storage.ingest import IngestResult
from storage.monitoring import count_jobs_by_state

if TYPE_CHECKING:
    from datetime import datetime

    from prometheus_client.core import Metric

    from storage.archive import Archive

log = logging.getLogger(__name__)

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# Seconds. DICOMweb requests: a QIDO-RS search in milliseconds, a whole-study WADO-RS or a
# large STOW-RS in minutes. AI jobs: seconds to an hour (a whole-slide image on the CPU).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# Flask blueprint → the PS3.18 service it serves (rendered resources are WADO-RS, PS3.18 10.4).
HTTP_SERVICES = {
    "dicomweb.qido": "qido-rs",
    "dicomweb.wado": "wado-rs",
    "dicomweb.rendered": "wado-rs",
    "dicomweb.stow": "stow-rs",
    "dicomweb.delete": "delete",
    "wado_uri": "wado-uri",
}

QUERY_SERVICES = frozenset({"C-FIND", "qido-rs"})


class EndedJob(Protocol):
    """What the metrics read of a job as an attempt left it (the worker's ``Job``); read-only,
    so that a ``Job`` whose state is a ``JobState`` (a ``str``) is one."""

    @property
    def model_name(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def queued_at(self) -> datetime: ...

    @property
    def finished_at(self) -> datetime | None: ...


def multiprocess_mode() -> bool:
    return MULTIPROC_VARIABLE in os.environ


class Metrics:
    """The metrics of one process, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Read at each scrape, beside the registry (the worker's GPU memory).
        self.collectors: list[Collector] = []
        self.instances_received = Counter(
            "hilum_instances_received",
            "Instances received, by transport (dimse, stow-rs) and outcome "
            "(stored, duplicate, replaced, kept-existing, or refused)",
            ["transport", "outcome"],
            registry=self.registry,
        )
        self.bytes_received = Counter(
            "hilum_bytes_received",
            "Bytes of the instances received and not refused, by transport",
            ["transport"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "hilum_http_requests",
            "DICOMweb requests answered, by service and HTTP status",
            ["service", "status"],
            registry=self.registry,
        )
        self.http_request_seconds = Histogram(
            "hilum_http_request_seconds",
            "Time to the response's headers of DICOMweb requests, by service",
            ["service"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        # Both query services in one histogram (the figure to alert on), beside the
        # per-transport request histograms above and below.
        self.query_seconds = Histogram(
            "hilum_query_seconds",
            "Queries: C-FIND from the request to the final response, QIDO-RS to the response's "
            "headers, by service",
            ["service"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        # DIMSE (server/dimse, through DimseObserver): associations and requests.
        self.associations_active = Gauge(
            "hilum_associations_active",
            "DIMSE associations open now",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.associations = Counter(
            "hilum_dimse_associations",
            "DIMSE associations ended, by how (released, aborted, lost, rejected)",
            ["ending"],
            registry=self.registry,
        )
        self.dimse_requests = Counter(
            "hilum_dimse_requests",
            "DIMSE requests answered, by service (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET) and "
            "final status (hexadecimal)",
            ["service", "status"],
            registry=self.registry,
        )
        self.dimse_request_seconds = Histogram(
            "hilum_dimse_request_seconds",
            "DIMSE requests: from the request received to the final response sent, by service",
            ["service"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.retrieve_instances = Counter(
            "hilum_retrieve_instances",
            "C-STORE sub-operations of C-MOVE and C-GET, by service and outcome",
            ["service", "outcome"],
            registry=self.registry,
        )
        self.jobs_finished = Counter(
            "hilum_jobs_finished",
            "AI jobs that ended an attempt, by model and the state it left them in",
            ["model", "state"],
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "hilum_job_seconds",
            "AI jobs done: from queued (the study became stable) to results stored, by model",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "hilum_inference_seconds",
            "AI jobs done: from claimed to results stored, by model",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )

    def ingest_observer(
        self, transport: str
    ) -> Callable[[Sequence[IngestResult | StorageError]], None]:
        """An ``Archive.on_ingest`` that counts what ``transport`` received."""

        def observe(outcomes: Sequence[IngestResult | StorageError]) -> None:
            for outcome in outcomes:
                if isinstance(outcome, IngestResult):
                    self.instances_received.labels(transport, outcome.outcome.value).inc()
                    self.bytes_received.labels(transport).inc(outcome.size)
                else:
                    self.instances_received.labels(transport, "refused").inc()

        return observe

    # -- server.dimse.ae.DimseObserver --------------------------------------------------------

    def association_opened(self) -> None:
        self.associations_active.inc()

    def association_closed(self, ending: str) -> None:
        self.associations_active.dec()
        self.associations.labels(ending).inc()

    def association_rejected(self) -> None:
        self.associations.labels("rejected").inc()

    def dimse_request(self, service: str, status: int, seconds: float) -> None:
        self.dimse_requests.labels(service, f"0x{status:04X}").inc()
        self.dimse_request_seconds.labels(service).observe(seconds)
        if service in QUERY_SERVICES:
            self.query_seconds.labels(service).observe(seconds)

    def sub_operations(self, service: str, outcome: str, count: int) -> None:
        self.retrieve_instances.labels(service, outcome).inc(count)

    def observe_request(self, blueprint: str | None, status: int, seconds: float) -> None:
        service = HTTP_SERVICES.get(blueprint or "")
        if service is None:
            return  # /healthz, /metrics, the JSON API: not DICOMweb
        self.http_requests.labels(service, str(status)).inc()
        self.http_request_seconds.labels(service).observe(seconds)
        if service in QUERY_SERVICES:
            self.query_seconds.labels(service).observe(seconds)

    def observe_job(
        self, model: str, state: str, *, queued_s: float | None, running_s: float | None
    ) -> None:
        """A job's attempt ended in ``state``; the durations only for a job done."""
        self.jobs_finished.labels(model, state).inc()
        if queued_s is not None:
            self.job_seconds.labels(model).observe(queued_s)
        if running_s is not None:
            self.inference_seconds.labels(model).observe(running_s)

    def job_observer(self) -> Callable[[EndedJob, float], None]:
        """A ``Worker.on_job_ended``: counts each attempt by the state it left its job in, and
        times the jobs done."""

        def observe(job: EndedJob, running_s: float) -> None:
            done = str(job.state) == "done"
            queued_s = None
            if done and job.finished_at is not None:
                queued_s = (job.finished_at - job.queued_at).total_seconds()
            self.observe_job(
                job.model_name,
                str(job.state),
                queued_s=queued_s,
                running_s=running_s if done else None,
            )

        return observe

    def exposition(self, archive: Archive | None = None, accept: str = "") -> tuple[bytes, str]:
        """Every metric of this process (of every gunicorn worker in multiprocess mode), plus
        ``hilum_jobs{state}`` read from the index when ``archive``; in the format the scraper's
        ``accept`` header asks for (Prometheus text, or OpenMetrics), and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.scrape_registry(archive)), content_type

    def scrape_registry(self, archive: Archive | None = None) -> CollectorRegistry:
        """What a scrape collects: this process's metrics (every gunicorn worker's in
        multiprocess mode, from their files), and ``hilum_jobs`` when ``archive``."""
        registry = CollectorRegistry()
        if multiprocess_mode():
            multiprocess.MultiProcessCollector(registry)
        else:
            registry.register(_Combined(self.registry))
        if archive is not None:
            registry.register(JobStates(archive))
        for collector in self.collectors:
            registry.register(collector)
        return registry


class _Combined(Collector):
    """This process's own registry, collected as one collector of another registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


class JobStates(Collector):
    """``hilum_jobs{state}``: the AI queue as the index holds it, read at each scrape (one
    grouped count), so that every process reports the same truth."""

    def __init__(self, archive: Archive) -> None:
        self._archive = archive

    def collect(self) -> Iterator[Metric]:
        try:
            counts = count_jobs_by_state(self._archive)
        except StorageError as error:
            # /metrics still answers: the other metrics say what this process did, and
            # /readyz says what is down.
            log.debug("hilum_jobs not collected: %s", error)
            return
        gauge = GaugeMetricFamily("hilum_jobs", "AI jobs by state (queued: the queue depth)",
                                  labels=["state"])  # fmt: skip
        for state, count in counts.items():
            gauge.add_metric([state], count)
        yield gauge


@dataclass(frozen=True)
class GpuMemoryReading:
    """One CUDA device's memory, in bytes."""

    device: str  # "cuda:0"
    allocated: int  # held by this process's tensors
    reserved: int  # held by this process's PyTorch caching allocator (allocated and cached)
    used: int  # in use on the device, by every process
    total: int


def read_cuda_memory(device: str) -> list[GpuMemoryReading]:
    """The memory of the CUDA device the worker runs its models on (``[inference] device``,
    or the default device); none when the device is not a GPU, or torch sees no GPU."""
    try:
        import torch
    except ImportError:  # an installation without the AI extra
        return []
    target = torch.device(device)
    if target.type != "cuda" or not torch.cuda.is_available():
        return []
    index = target.index if target.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return [
        GpuMemoryReading(
            device=f"cuda:{index}",
            allocated=torch.cuda.memory_allocated(index),
            reserved=torch.cuda.memory_reserved(index),
            used=total - free,
            total=total,
        )
    ]


class GpuMemory(Collector):
    """``hilum_gpu_memory_{allocated,reserved,used,total}_bytes{device}``, read at each scrape
    from ``read`` (:func:`read_cuda_memory` of the worker's device); absent when it reads none
    (no GPU)."""

    FAMILIES = (
        ("allocated", "GPU memory held by this process's tensors"),
        ("reserved", "GPU memory held by this process's PyTorch caching allocator"),
        ("used", "GPU memory in use on the device, by every process"),
        ("total", "GPU memory of the device"),
    )

    def __init__(self, read: Callable[[], Sequence[GpuMemoryReading]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        try:
            readings = self._read()
        except RuntimeError as error:  # a CUDA error: the other metrics still answer
            log.warning("GPU memory not collected: %s", error)
            return
        if not readings:
            return
        for field, description in self.FAMILIES:
            gauge = GaugeMetricFamily(
                f"hilum_gpu_memory_{field}_bytes", description, labels=["device"]
            )
            for reading in readings:
                gauge.add_metric([reading.device], getattr(reading, field))
            yield gauge


class MetricsServer:
    """``/metrics`` on its own port, for the processes without an HTTP server (``hilum dimse``,
    ``hilum worker``): prometheus_client's own server, in a daemon thread."""

    def __init__(
        self, metrics: Metrics, host: str, port: int, archive: Archive | None = None
    ) -> None:
        registry = metrics.scrape_registry(archive)
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def mark_worker_dead(pid: int) -> None:
    """gunicorn's ``child_exit`` hook: a dead worker's live gauges stop counting."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)
