"""Options every `hilum` command takes, wherever they are written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

HILUM = [sys.executable, "-m", "server.cli"]


@pytest.mark.parametrize("before", [True, False], ids=["hilum --config F db upgrade",
                                                       "hilum db upgrade --config F"])  # fmt: skip
def test_config_is_taken_before_or_after_the_command(tmp_path: Path, before: bool) -> None:
    config = tmp_path / "hilum.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "from-file"}"\n')
    args = ["--config", str(config), "db", "upgrade"] if before else [
        "db", "upgrade", "--config", str(config)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("HILUM_")}
    result = subprocess.run([*HILUM, *args], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "from-file" / "index.sqlite") in result.stdout


def test_a_busy_port_names_the_port_and_the_service(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("HILUM_")},
            "HILUM_SERVER__DATA_DIR": str(tmp_path / "data"),
            "HILUM_HTTP__PORT": str(port),
            "HILUM_DIMSE__PORT": str(free_port()),
            "HILUM_INFERENCE__SERVE_WORKER": "false",
        }
        result = subprocess.run([*HILUM, "serve"], env=env, capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 3
    assert f"HTTP port {port} on 127.0.0.1 is already in use" in result.stderr


def test_a_busy_http_port_is_named_by_hilum_web(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("HILUM_")},
            "HILUM_SERVER__DATA_DIR": str(tmp_path / "data"),
            "HILUM_HTTP__PORT": str(port),
        }
        assert subprocess.run([*HILUM, "db", "upgrade"], env=env, timeout=120).returncode == 0
        result = subprocess.run([*HILUM, "web"], env=env, capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 3
    assert f"HTTP port {port} on 127.0.0.1 is already in use" in result.stderr


def test_a_busy_dimse_port_is_named(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("HILUM_")},
            "HILUM_SERVER__DATA_DIR": str(tmp_path / "data"),
            "HILUM_DIMSE__PORT": str(port),
        }
        assert subprocess.run([*HILUM, "db", "upgrade"], env=env, timeout=120).returncode == 0
        result = subprocess.run([*HILUM, "dimse"], env=env, capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 3
    assert f"DIMSE port {port} on 127.0.0.1 is already in use" in result.stderr


def test_without_torch_the_ai_commands_say_what_to_install(tmp_path: Path) -> None:
    # An installation without the `ai` extra (the DIMSE and web images): torch cannot be
    # imported (a None entry in sys.modules is Python's documented way to make an import fail).
    script = (
        "import sys; sys.modules['torch'] = None; from server.cli import main; "
        "sys.exit(main(['models', 'list']))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HILUM_")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "needs torch" in result.stderr and "pip install 'hilum[ai]'" in result.stderr
