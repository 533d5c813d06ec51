"""The DIMSE server's metrics (server.metrics.Metrics as its DimseObserver), read the way
Prometheus reads them: associations open and ended, requests by service and final status, the
sub-operations of C-GET."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from server.dimse.ae import DimseServer
from server.metrics import Metrics
from storage.archive import open_archive
from tests.conftest import make_settings
from tests.factories import DCMTK_STORESCU, ct_instance, write_part10
from tests.server.dimse.qr_seed import study_identifier
from tests.server.test_monitoring import sample


@pytest.mark.parametrize("backend", ["sqlite-files"])
def test_associations_requests_and_sub_operations_are_counted(backend: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    archive = open_archive(settings, migrate=True)
    metrics = Metrics()
    server = DimseServer(settings, archive, metrics)
    server.start()
    try:
        study = generate_uid()
        files = [
            write_part10(ct_instance(study, generate_uid(), seed=n), tmp_path / f"{n}.dcm")
            for n in range(3)
        ]
        sent = subprocess.run(
            [DCMTK_STORESCU, "-aec", "HILUM", "127.0.0.1", str(server.port), *map(str, files)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        ae = AE(ae_title="GETSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(Verification)
        role = build_role(CTImageStorage, scp_role=True)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(
            "127.0.0.1", server.port, ae_title="HILUM", ext_neg=[role],
            evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
        )  # fmt: skip
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        found = [
            int(status.Status)
            for status, _ in assoc.send_c_find(
                study_identifier(study), StudyRootQueryRetrieveInformationModelFind
            )
        ]
        assert found == [0xFF00, 0x0000]
        statuses = [
            int(status.Status)
            for status, _ in assoc.send_c_get(
                study_identifier(study), StudyRootQueryRetrieveInformationModelGet
            )
        ]
        assoc.release()
    finally:
        server.stop()
        archive.close()
    text = metrics.exposition()[0].decode()
    assert statuses[-1] == 0x0000
    assert sample(text, "hilum_dimse_requests_total", service="C-STORE", status="0x0000") == 3
    assert sample(text, "hilum_dimse_requests_total", service="C-ECHO", status="0x0000") == 1
    assert sample(text, "hilum_dimse_requests_total", service="C-GET", status="0x0000") == 1
    assert sample(text, "hilum_retrieve_instances_total", service="C-GET", outcome="completed") == 3
    assert sample(text, "hilum_dimse_associations_total", ending="released") == 2
    assert sample(text, "hilum_associations_active") == 0
    assert sample(text, "hilum_dimse_request_seconds_count", service="C-STORE") == 3
    # Queries only, in the histogram of both query services.
    assert sample(text, "hilum_query_seconds_count", service="C-FIND") == 1
    assert 'hilum_query_seconds_count{service="C-GET"}' not in text
