"""docker-compose.yml, the Dockerfile and .env.example, checked without a Docker engine (none
runs on these machines): Debian's `docker-compose config` validates and renders the file, and
the tests read what it rendered."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import load_settings
from config.settings import PLACEHOLDER_SECRETS, ConfigError, is_placeholder_secret

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ONE_SHOTS = {"minio-init", "migrate"}
HILUM_SERVICES = {"migrate", "dimse", "web", "worker", "worker-cpu", "events"}


def _env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def _compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (make system-deps installs it)")
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    return subprocess.run(
        [tool, "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )  # fmt: skip


def _rendered(tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    result = _compose_config(tmp_path, env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    # PyYAML resolves the file's anchors and merge keys, as compose does.
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_renders_with_real_secrets(tmp_path: Path) -> None:
    env = {name: ("Xs8k2mQ7" if value == "change-me" else value) for name, value in
           _env_example().items()}  # fmt: skip
    rendered = _rendered(tmp_path, env)
    assert set(rendered["services"]) == {
        "db", "minio", "minio-init", "migrate", "dimse", "web", "worker", "worker-cpu", "events",
    }  # fmt: skip
    web = rendered["services"]["web"]["environment"]
    assert web["HILUM_STORAGE__DATABASE_URL"] == "postgresql+psycopg://hilum:Xs8k2mQ7@db:5432/hilum"
    assert web["HILUM_STORAGE__S3_SECRET_KEY"] == "Xs8k2mQ7"


def test_no_secret_has_a_default(tmp_path: Path) -> None:
    text = COMPOSE.read_text()
    secrets = re.findall(r"\$\{(\w*(?:PASSWORD|SECRET|ACCESS_KEY|ROOT_USER)\w*)([^}]*)\}", text)
    assert secrets
    for name, modifier in secrets:
        assert modifier.startswith(":?"), f"${{{name}}} must be required, not {modifier!r}"
    # Without the secrets, compose refuses to render the file at all.
    without = {k: v for k, v in _env_example().items() if k != "HILUM_DB_PASSWORD"}
    result = _compose_config(tmp_path, without)
    assert result.returncode != 0
    assert "set HILUM_DB_PASSWORD in .env" in result.stderr


def test_hilum_refuses_the_example_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = _env_example()
    for name in ("HILUM_DB_PASSWORD", "MINIO_ROOT_PASSWORD", "HILUM_S3_SECRET_KEY"):
        assert is_placeholder_secret(example[name]), name
    # What `docker compose up` with an unedited copy would hand to Hilum's processes:
    environment = _rendered(tmp_path, example)["services"]["web"]["environment"]
    monkeypatch.delenv("HILUM_CONFIG", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    with pytest.raises(ConfigError, match="placeholder"):
        load_settings()


def test_every_service_restarts_rotates_logs_and_reports_health(services: dict[str, Any]) -> None:
    depended_on = {
        (dependency, condition["condition"])
        for service in services.values()
        for dependency, condition in service.get("depends_on", {}).items()
    }
    for name, service in services.items():
        logging = service["logging"]
        assert logging["driver"] == "json-file", name
        assert {"max-size", "max-file"} <= set(logging["options"]), name
        if name in ONE_SHOTS:
            assert service["restart"] == "no", name
            assert service["healthcheck"] == {"disable": True}, name
            assert (name, "service_completed_successfully") in depended_on, name
        else:
            assert service["restart"] == "unless-stopped", name
            check = service["healthcheck"]
            assert check["test"][0] == "CMD" and {"interval", "retries"} <= set(check), name
    for dependency, condition in depended_on:
        wanted = "service_completed_successfully" if dependency in ONE_SHOTS else "service_healthy"
        assert condition == wanted, dependency


def test_hilum_services_run_the_hilum_image_in_order(services: dict[str, Any]) -> None:
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    for name in HILUM_SERVICES - {"migrate"}:
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }, name
        assert services[name]["environment"]["HILUM_SERVER__HOST"] == "0.0.0.0"
    assert services["dimse"]["command"] == ["dimse"]
    assert services["dimse"]["healthcheck"]["test"][:3] == ["CMD", "hilum", "echo"]
    assert services["dimse"]["ports"] == ["${HILUM_DIMSE_PORT:-11112}:11112"]
    assert services["web"]["command"] == ["web"]
    assert "/readyz" in " ".join(services["web"]["healthcheck"]["test"])
    assert services["web"]["ports"] == ["${HILUM_HTTP_PORT:-8042}:8042"]
    for private in ("db", "minio"):
        assert "ports" not in services[private], f"{private} must not be published"


def test_worker_reserves_a_gpu_and_the_cpu_profile_runs_one_without(
    services: dict[str, Any],
) -> None:
    gpu, cpu = services["worker"], services["worker-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert gpu["command"] == cpu["command"] == ["worker"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]  # a CUDA build of torch
    assert "deploy" not in cpu and "args" not in cpu["build"]  # the default: CPU torch
    # The other Hilum images carry no torch at all.
    for name in ("migrate", "dimse", "web", "events"):
        assert services[name]["build"]["args"] == {"TORCH_INDEX_URL": ""}, name
    assert cpu["environment"]["HILUM_INFERENCE__DEVICE"] == "cpu"
    # Every other service runs without a profile: `docker compose up` starts it.
    workers = {"worker", "worker-cpu"}
    assert all("profiles" not in s for n, s in services.items() if n not in workers)


def test_image_is_built_from_every_package_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim", dockerfile, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=\S+/cpu$", dockerfile, re.M)
    assert 'pip install "/src[ai]"' in dockerfile  # torch as the `ai` extra, where it is built
    # The viewer is in the image, in the version web/ohif.py pins (and checks the SHA-512 of).
    from web.ohif import OHIF_VERSION

    assert f"ARG OHIF_VERSION={OHIF_VERSION}\n" in dockerfile
    assert re.search(r"^FROM node:\S+ AS ohif$", dockerfile, re.M)
    assert "hilum viewer install --dir /opt/hilum/ohif --tarball" in dockerfile
    assert "ENV HILUM_WEB__OHIF_DIR=/opt/hilum/ohif" in dockerfile
    assert 'ENTRYPOINT ["hilum"]' in dockerfile
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "COPY . /src" in dockerfile
    # The context is the tree less .dockerignore: nothing pip installs may be left out of it.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert ".env" in ignored and ".git" in ignored
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package in pyproject["tool"]["setuptools"]["packages"]:
        assert package.split(".")[0] not in ignored, package
    assert pyproject["project"]["readme"] not in ignored
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_bucket_is_not_made_with_a_placeholder_minio_password(tmp_path: Path) -> None:
    """minio-init's script, as compose renders it, run by /bin/sh: an unedited .env stops it
    before its first `mc` call (so nothing that needs the bucket starts); so does every secret
    Hilum itself refuses; a real secret gets past the check (to `mc`, absent here)."""
    example = _env_example()
    service = _rendered(tmp_path, example)["services"]["minio-init"]
    environment = {name: str(value) for name, value in service["environment"].items()}
    # The container gets the .env's secrets (here the placeholders), which the script reads.
    for name in ("MINIO_ROOT_PASSWORD", "HILUM_S3_SECRET_KEY"):
        assert environment[name] == example[name]
    # `config` keeps compose's escape; the container's shell is handed `$`.
    script = service["command"][0].replace("$$", "$")

    def run(**secrets: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", **environment, **secrets}
        return subprocess.run(
            ["/bin/sh", "-c", script], capture_output=True, text=True, timeout=30, env=env
        )

    refused = run()
    assert refused.returncode == 1
    assert "replace the placeholder MINIO_ROOT_PASSWORD" in refused.stderr
    for placeholder in sorted(PLACEHOLDER_SECRETS):
        assert is_placeholder_secret(placeholder)
        for name in ("MINIO_ROOT_PASSWORD", "HILUM_S3_SECRET_KEY"):
            other = "HILUM_S3_SECRET_KEY" if name == "MINIO_ROOT_PASSWORD" else name
            checked = run(**{name: placeholder, other: "Xs8k2mQ7Xs8k2mQ7"})
            assert checked.returncode == 1, (name, placeholder)
    passed = run(MINIO_ROOT_PASSWORD="Xs8k2mQ7Xs8k2mQ7", HILUM_S3_SECRET_KEY="Pq9w3Lr5Pq9w3Lr5")
    assert passed.returncode == 127 and "mc" in passed.stderr, passed.stderr
