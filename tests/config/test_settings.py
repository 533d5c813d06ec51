"""Settings precedence: defaults <- TOML file <- HILUM_* environment."""

from pathlib import Path

import pytest

from config import load_settings
from config.settings import ConfigError


def test_defaults_are_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HILUM_CONFIG", raising=False)
    settings = load_settings()
    assert (settings.server.host, settings.dimse.ae_title, settings.dimse.port) == (
        "127.0.0.1", "HILUM", 11112,
    )  # fmt: skip
    assert settings.database_url.startswith("sqlite:///") and settings.blob_url.startswith("file:")
    assert settings.storage.on_duplicate == "overwrite"


def test_toml_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hilum.toml"
    config.write_text(
        '[dimse]\nport = 4000\nae_title = "FROMFILE"\n[storage]\non_duplicate = "keep"\n'
    )
    monkeypatch.setenv("HILUM_DIMSE__PORT", "4242")
    monkeypatch.setenv("HILUM_STORAGE__S3_SECRET_KEY", "secret")
    settings = load_settings(config)
    assert settings.dimse.port == 4242  # environment wins over the file
    assert settings.dimse.ae_title == "FROMFILE"  # the file wins over the default
    assert settings.storage.on_duplicate == "keep"
    assert settings.storage.s3_secret_key == "secret"


def test_hilum_config_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "hilum.toml"
    config.write_text("[http]\nport = 9000\n")
    monkeypatch.setenv("HILUM_CONFIG", str(config))
    assert load_settings().http.port == 9000


@pytest.mark.parametrize(
    "toml",
    [
        "[dimse]\nprot = 1\n",  # misspelt key
        "[dimse]\nae_title = 'WAY-TOO-LONG-AE-TITLE'\n",  # PS3.5: 16 characters at most
        "[dimse]\nae_title = 'BAD\\\\AE'\n",  # backslash
        "[storage]\non_duplicate = 'merge'\n",
        "[dimse]\nmax_pdu_length = 0\n",  # no "unlimited": pynetdicom holds a whole PDU
        "[dimse]\nmax_pdu_length = 1073741824\n",
        "[nonsense]\nx = 1\n",
        "[[dimse.ae_permissions]]\nae_title = 'CT'\nnetworks = ['10.0.0.0/33']\n",
        "[[dimse.ae_permissions]]\nae_title = 'CT'\npartition = 'Hosp A'\n",
        "[[dimse.ae_permissions]]\nae_title = 'CT'\n[[dimse.ae_permissions]]\nae_title = 'CT'\n",
        "[[dimse.ae_permissions]]\nae_title = 'CT'\nstorage = true\n",  # misspelt
    ],
)
def test_invalid_configuration_is_an_error(tmp_path: Path, toml: str) -> None:
    config = tmp_path / "hilum.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError):
        load_settings(config)


def test_missing_configuration_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_database_password_is_masked_for_display() -> None:
    settings = load_settings(None, storage={"database_url": "postgresql+psycopg://u:pw@h/db"})
    assert "pw" not in settings.database_url_for_display


@pytest.mark.parametrize(
    "variable, value",
    [
        ("HILUM_STORAGE__S3_SECRET_KEY", "change-me"),
        ("HILUM_STORAGE__S3_SECRET_KEY", "CHANGE_ME_TOO"),
        ("HILUM_STORAGE__S3_SECRET_KEY", "minioadmin"),
        ("HILUM_STORAGE__DATABASE_URL", "postgresql+psycopg://hilum:change-me@db/hilum"),
    ],
)
def test_a_placeholder_secret_is_refused_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.delenv("HILUM_CONFIG", raising=False)
    monkeypatch.setenv(variable, value)
    assert load_settings(server={"host": "127.0.0.1"})  # loopback: a developer's machine
    monkeypatch.setenv("HILUM_SERVER__HOST", "0.0.0.0")
    with pytest.raises(ConfigError, match="placeholder"):
        load_settings()


def test_a_real_secret_is_accepted_beyond_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HILUM_CONFIG", raising=False)
    monkeypatch.setenv("HILUM_SERVER__HOST", "0.0.0.0")
    monkeypatch.setenv("HILUM_STORAGE__S3_SECRET_KEY", "q8V3-nT2x-change")
    monkeypatch.setenv("HILUM_STORAGE__DATABASE_URL", "postgresql+psycopg://hilum:Zr81kq@db/hilum")
    settings = load_settings()
    assert settings.storage.s3_secret_key == "q8V3-nT2x-change"


def test_a_configuration_error_names_each_key_and_where_its_value_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HILUM_CONFIG", raising=False)
    config = tmp_path / "hilum.toml"
    config.write_text('[dimse]\nprot = 1\nport = "eleven"\n')
    monkeypatch.setenv("HILUM_HTTP__PORT", "s3cr3t-looking-value")
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    message = str(error.value)
    assert f"dimse.prot: unknown key (misspelt?) (from {config})" in message
    assert "dimse.port: Input should be a valid integer" in message
    assert "http.port: Input should be a valid integer" in message
    assert "(from the environment variable HILUM_HTTP__PORT)" in message
    # Neither pydantic's internals nor the value itself (it may be a secret).
    assert "_Settings" not in message and "pydantic.dev" not in message
    assert "s3cr3t-looking-value" not in message


def test_a_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "hilum.toml"
    config.write_text("[dimse\n")
    with pytest.raises(ConfigError, match=f"cannot read {config}: Expected ']'"):
        load_settings(config)


def test_ae_permission_seeds_include_the_short_form(tmp_path: Path) -> None:
    config = tmp_path / "hilum.toml"
    config.write_text(
        "[dimse]\nallowed_calling_ae_titles = ['MR', 'CT']\n"
        "[[dimse.ae_permissions]]\nae_title = 'CT'\nquery = false\nnetworks = ['10.1.2.7']\n"
    )
    seeds = load_settings(config).dimse.ae_permission_seeds
    assert [(s.ae_title, s.partition, s.store, s.query, s.networks) for s in seeds] == [
        ("CT", "default", True, False, ["10.1.2.7/32"]),  # the full form wins
        ("MR", "default", True, True, []),
    ]
