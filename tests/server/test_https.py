"""HTTPS (``[http] tls_certificate`` and ``tls_private_key``) on both HTTP servers: ``hilum
serve`` (cheroot) and ``hilum web`` (gunicorn), started as processes, with a certificate from a
test CA made by openssl; a real TLS request verified against that CA, HSTS on the response, and
the RetrieveURL an https URL. An unusable key stops the start with a clear message."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from config import Settings, load_settings
from config.settings import ConfigError
from server.app import https_files
from storage.archive import open_archive
from tests.conftest import make_settings
from tests.hilum_process import stop_hilum
from tests.server.dicomweb.conftest import ct_series
from tests.server.test_cli import HILUM, hilum_env


@dataclass(frozen=True)
class Pki:
    ca: Path
    certificate: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("https-pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "2", "-subj", "/CN=hospital-ca", cwd=folder)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "hilum.key", "-out",
             "hilum.csr", "-subj", "/CN=127.0.0.1", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "hilum.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "hilum.crt", "-days", "2", "-extfile", "san.ext",
             cwd=folder)  # fmt: skip
    return Pki(folder / "ca.crt", folder / "hilum.crt", folder / "hilum.key")


def _https_settings(tmp_path: Path, pki: Pki) -> Settings:
    settings = make_settings(tmp_path, inference={"serve_worker": False})
    open_archive(settings, migrate=True).close()  # `hilum web` expects `hilum db upgrade`
    return settings


def _running(command: str, settings: Settings, pki: Pki, key: Path) -> Iterator[str]:
    env = hilum_env(
        settings,
        HILUM_HTTP__TLS_CERTIFICATE=str(pki.certificate),
        HILUM_HTTP__TLS_PRIVATE_KEY=str(key),
        HILUM_HTTP__WORKERS="1",
        HILUM_HTTP__THREADS="2",
        HILUM_INFERENCE__SERVE_WORKER="false",
    )
    process = subprocess.Popen(
        [*HILUM, command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        if "Hilum is listening" not in banner:
            process.kill()
            _, stderr = process.communicate()
            yield stderr
            return
        assert f"https://127.0.0.1:{settings.http.port}" in banner
        yield f"https://127.0.0.1:{settings.http.port}"
    finally:
        stop_hilum(process)


@pytest.mark.parametrize("command", ["serve", "web"])
def test_https_with_hsts_on_both_http_servers(tmp_path: Path, pki: Pki, command: str) -> None:
    settings = _https_settings(tmp_path, pki)
    for url in _running(command, settings, pki, pki.key):
        assert url.startswith("https://"), url
        (ds,) = ct_series(1)
        study = ds.StudyInstanceUID
        found = requests.get(f"{url}/dicomweb/studies", verify=str(pki.ca), timeout=30)
        assert found.status_code == 200
        assert found.headers["Strict-Transport-Security"] == "max-age=31536000"
        page = requests.get(f"{url}/", verify=str(pki.ca), timeout=30)
        assert page.status_code == 200
        assert "Content-Security-Policy" in page.headers
        assert page.headers["Strict-Transport-Security"] == "max-age=31536000"
        # Plain HTTP on the HTTPS port gets no answer a client could take for one.
        with pytest.raises(requests.RequestException):
            requests.get(f"http://127.0.0.1:{settings.http.port}/dicomweb/studies", timeout=5)
        # A client that does not trust the CA refuses the connection.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{url}/dicomweb/studies", timeout=30)
        # STOW-RS over TLS; the RetrieveURL says https.
        session = requests.Session()
        session.verify = str(pki.ca)
        session.trust_env = False  # else REQUESTS_CA_BUNDLE wins over verify (requests #3829)
        client = DICOMwebClient(f"{url}/dicomweb", session=session)
        client.store_instances([ds])
        (listed,) = client.search_for_studies(search_filters={"StudyInstanceUID": study})
        assert listed["00081190"]["Value"][0].startswith("https://")


def test_an_unusable_key_stops_the_start_with_a_clear_message(tmp_path: Path, pki: Pki) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_text("not a key\n")
    settings = make_settings(
        tmp_path, http={"tls_certificate": pki.certificate, "tls_private_key": wrong}
    )
    with pytest.raises(ConfigError, match="cannot be used for HTTPS"):
        https_files(settings)
    assert https_files(make_settings(tmp_path)) is None  # plain HTTP
    with pytest.raises(ConfigError, match="tls_certificate and tls_private_key"):
        load_settings(None, http={"tls_certificate": pki.certificate})
