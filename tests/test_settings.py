from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashsale.settings import Settings, SettingsError, settings_table, unknown_variables

pytestmark = pytest.mark.unit


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.http_port == 8080
    assert s.workers == 2
    assert s.redis_url is None
    assert s.kafka_enable_idempotence is False
    assert (s.kafka_replication_factor, s.kafka_min_insync_replicas) == (1, 1)
    assert s.kafka_assignor == "sticky"


def test_values_parsed() -> None:
    s = Settings.from_env(
        {
            "FLASHSALE_REDIS_URL": "redis://127.0.0.1:6379/0",
            "FLASHSALE_DATABASE_URL": "postgresql://u@h/db",
            "FLASHSALE_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
            "FLASHSALE_WORKERS": "4",
            "FLASHSALE_ACCESS_LOG": "off",
            "FLASHSALE_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
        }
    )
    assert s.workers == 4
    assert s.access_log is False
    assert len(s.trusted_proxies) == 2
    assert Settings.from_env(s.to_env()) == s


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"FLASHSALE_HTTP_PORT": "abc"}, "FLASHSALE_HTTP_PORT"),
        ({"FLASHSALE_HTTP_PORT": "70000"}, "out of range"),
        ({"FLASHSALE_WORKERS": "0"}, "FLASHSALE_WORKERS"),
        ({"FLASHSALE_REDIS_URL": "http://x"}, "FLASHSALE_REDIS_URL"),
        ({"FLASHSALE_KAFKA_BOOTSTRAP": "nohostport"}, "FLASHSALE_KAFKA_BOOTSTRAP"),
        ({"FLASHSALE_ACCESS_LOG": "maybe"}, "boolean"),
        ({"FLASHSALE_SECRET_KEY": "short"}, "FLASHSALE_SECRET_KEY"),
        ({"FLASHSALE_TRUSTED_PROXIES": "not-an-ip"}, "FLASHSALE_TRUSTED_PROXIES"),
        (
            {"FLASHSALE_KAFKA_REPLICATION_FACTOR": "1", "FLASHSALE_KAFKA_MIN_INSYNC_REPLICAS": "2"},
            "FLASHSALE_KAFKA_MIN_INSYNC_REPLICAS=2 is above",
        ),
        ({"FLASHSALE_KAFKA_ASSIGNOR": "cooperative-sticky"}, "FLASHSALE_KAFKA_ASSIGNOR"),
    ],
)
def test_malformed(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        Settings.from_env(env)


def test_short_secret_names_the_length_it_checks() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"FLASHSALE_SECRET_KEY": "k" * 31})
    assert str(caught.value) == "FLASHSALE_SECRET_KEY must be at least 32 characters"
    assert Settings.from_env({"FLASHSALE_SECRET_KEY": "k" * 32}).secret_key == "k" * 32


@pytest.mark.parametrize(
    "url", ["rediss://cache.example:6380/0", "unix:///run/valkey.sock", "http://x", "redis:/x"]
)
def test_redis_url_other_than_redis_scheme_is_refused_in_one_line(url: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"FLASHSALE_REDIS_URL": url})
    assert str(caught.value) == "FLASHSALE_REDIS_URL: the join path supports redis:// only"


def test_each_default_is_the_dataclass_default() -> None:
    """from_env with nothing set gives exactly the dataclass defaults (written once)."""
    assert Settings.from_env({}) == Settings()


def test_missing_required_is_named() -> None:
    with pytest.raises(SettingsError, match="FLASHSALE_REDIS_URL is required"):
        Settings.from_env({}).require("redis_url")


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "FLASHSALE_REDIS_URL is required"),
        ({"FLASHSALE_HTTP_PORT": "x"}, "FLASHSALE_HTTP_PORT"),
    ],
)
def test_cli_prints_one_line(env: dict[str, str], fragment: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stack", "serve"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.unit
def test_a_misspelt_variable_names_the_closest_setting() -> None:
    assert unknown_variables(
        {"FLASHSALE_REDS_URL": "redis://x", "FLASHSALE_WORKERS": "2", "FLASHSALE_ZZZ": "1"}
    ) == [
        "FLASHSALE_REDS_URL is not a setting and is ignored; did you mean FLASHSALE_REDIS_URL?",
        "FLASHSALE_ZZZ is not a setting and is ignored; the settings are in docs/settings.md",
    ]
    every_setting = Settings.from_env({}).to_env()
    assert unknown_variables({**every_setting, "PATH": "/bin"}) == []


@pytest.mark.unit
def test_the_cli_warns_in_one_line_about_a_misspelt_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(FLASHSALE_DATA_DIR=str(tmp_path / "data"), FLASHSALE_REDS_URL="redis://x")
    done = subprocess.run(
        [sys.executable, "-m", "stack", "clean"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "flashsale: warning: FLASHSALE_REDS_URL is not a setting and is ignored; "
        "did you mean FLASHSALE_REDIS_URL?"
    ]


@pytest.mark.unit
def test_a_setting_may_come_from_a_file(tmp_path: Path) -> None:
    """How compose hands a secret over (``/run/secrets/...``): not in the environment, not
    on a command line."""
    secret = tmp_path / "secret_key"
    secret.write_text("s" * 40 + "\n")
    settings = Settings.from_env({"FLASHSALE_SECRET_KEY_FILE": str(secret)})
    assert settings.secret_key == "s" * 40  # the line break a file ends with is not part of it
    assert "FLASHSALE_SECRET_KEY_FILE" not in settings.to_env()  # children get the value
    assert unknown_variables({"FLASHSALE_SECRET_KEY_FILE": str(secret)}) == []
    assert unknown_variables({"FLASHSALE_SECRT_KEY_FILE": "x"}) == [
        "FLASHSALE_SECRT_KEY_FILE is not a setting and is ignored; "
        "did you mean FLASHSALE_SECRET_KEY_FILE?"
    ]
    with pytest.raises(SettingsError, match="FLASHSALE_SECRET_KEY and FLASHSALE_SECRET_KEY_FILE"):
        Settings.from_env({"FLASHSALE_SECRET_KEY_FILE": str(secret), "FLASHSALE_SECRET_KEY": "x"})
    with pytest.raises(SettingsError, match=r"FLASHSALE_SECRET_KEY_FILE=/nowhere: cannot read"):
        Settings.from_env({"FLASHSALE_SECRET_KEY_FILE": "/nowhere"})


def test_docs_settings_md_lists_every_setting_as_declared() -> None:
    """The table of docs/settings.md is the declarations' own (default, meaning), so a setting
    added, renamed or given another default cannot leave the docs behind."""
    docs = (Path(__file__).parents[1] / "docs" / "settings.md").read_text(encoding="utf-8")
    assert settings_table() in docs, (
        "docs/settings.md is behind flashsale/settings.py: replace its table with the output of "
        "`python -m flashsale.settings`"
    )
