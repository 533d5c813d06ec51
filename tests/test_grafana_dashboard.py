"""The Grafana dashboard (docs/grafana/hilum.json) asks only for metrics Hilum exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics
from storage.archive import Archive
from storage.ingest import IngestOutcome, IngestResult

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "hilum.json"


@pytest.mark.parametrize("backend", ["sqlite-files"], indirect=True)
def test_every_panel_queries_a_metric_hilum_exports(archive: Archive) -> None:
    metrics = Metrics()
    metrics.ingest_observer("dimse")([IngestResult(IngestOutcome.STORED, "1.2", "1.2.3", "0", 10)])
    metrics.observe_request("dicomweb.qido", 200, 0.01)
    metrics.observe_job("m", "done", queued_s=1.0, running_s=0.5)
    text = metrics.exposition(archive)[0].decode()  # hilum_jobs read from the index
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}

    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bhilum_\w+", target["expr"])
    }
    assert len(dashboard["panels"]) >= 8
    assert queried and queried <= exported, queried - exported
