"""``[research]``: projects' secrets are read once, checked, and never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import load_settings
from config.settings import ConfigError

SECRET = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def test_a_secret_from_a_file_or_the_environment_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "lung.key"
    key.write_text(SECRET + "\n")
    monkeypatch.setenv("HEART_SECRET", SECRET[::-1])
    settings = load_settings(
        None,
        research={
            "projects": [
                {"name": "lung", "secret_file": key},
                {"name": "heart", "secret_env": "HEART_SECRET"},
            ],
            "copies": [{"from": "default", "to": "research", "project": "lung"}],
        },
    )
    assert settings.research.project("lung").secret == SECRET.encode()
    assert settings.research.project("heart").secret == SECRET[::-1].encode()
    for shown in (repr(settings), settings.model_dump_json(), str(settings.model_dump())):
        assert SECRET not in shown and SECRET[::-1] not in shown
    (rule,) = settings.research.copies
    assert rule.job_name == "research-copy:lung:research" and rule.when == "all"
    assert settings.research.copy_rule(rule.job_name) is rule


@pytest.mark.parametrize(
    ("project", "message"),
    [
        ({"name": "p"}, "exactly one of secret_file and secret_env"),
        ({"name": "p", "secret_file": "/nonexistent/key"}, "cannot read secret_file"),
        ({"name": "p", "secret_env": "HILUM_TEST_UNSET_SECRET"}, "is not set"),
        ({"name": "p", "secret_env": "SHORT_SECRET"}, "at least 16 characters"),
        ({"name": "p", "secret_env": "PLACEHOLDER_SECRET"}, "no placeholder"),
    ],
)
def test_a_project_without_a_usable_secret_is_a_configuration_error(
    project: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHORT_SECRET", "abc")
    monkeypatch.setenv("PLACEHOLDER_SECRET", "change-me-change-me-please")
    with pytest.raises(ConfigError, match=message) as error:
        load_settings(None, research={"projects": [project]})
    assert "change-me-change-me-please" not in str(error.value)


def test_copy_rules_name_a_project_and_another_partition(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text(SECRET)
    projects = [{"name": "lung", "secret_file": key}]
    with pytest.raises(ConfigError, match="not one of the"):
        load_settings(
            None, research={"projects": projects, "copies": [{"to": "r", "project": "x"}]}
        )
    with pytest.raises(ConfigError, match="another partition"):
        load_settings(
            None, research={"projects": projects, "copies": [{"to": "default", "project": "lung"}]}
        )
    with pytest.raises(ConfigError, match="when"):
        load_settings(
            None,
            research={
                "projects": projects,
                "copies": [{"to": "r", "project": "lung", "when": "x"}],
            },
        )
