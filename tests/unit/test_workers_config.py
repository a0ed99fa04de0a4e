"""``workers``: its bounds, and the settings each worker of a group derives."""

from __future__ import annotations

import re

import pytest

from ext_proc.__main__ import main
from ext_proc.config import MAX_WORKERS, Settings, load_settings
from spendgate import logs
from spendgate.settings import ConfigError

DP = "data-plane-token-0123456789"


def group(**values: object) -> Settings:
    return Settings(data_plane_token=DP, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"SPENDGATE_EXT_PROC_WORKERS": "0"}, "workers must be between 1 and 64, not 0"),
        ({"SPENDGATE_EXT_PROC_WORKERS": "-3"}, "workers must be between 1 and 64, not -3"),
        ({"SPENDGATE_EXT_PROC_WORKERS": "65"}, "workers must be between 1 and 64, not 65"),
        ({"SPENDGATE_EXT_PROC_WORKERS": "1e30"}, "workers must be an integer"),
        ({"SPENDGATE_EXT_PROC_WORKERS": "two"}, "workers must be an integer"),
        (
            {"SPENDGATE_EXT_PROC_WORKERS": "4", "SPENDGATE_EXT_PROC_METRICS_LISTEN": ":65533"},
            "metrics_listen port 65533 + workers 4 is above 65535",
        ),
    ],
)
def test_bad_values_name_the_setting(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(env={"SPENDGATE_DATA_PLANE_TOKEN": DP, **values})


def test_bounds_and_sources() -> None:
    env = {"SPENDGATE_DATA_PLANE_TOKEN": DP, "SPENDGATE_EXT_PROC_WORKERS": "3"}
    assert load_settings(env={"SPENDGATE_DATA_PLANE_TOKEN": DP}).workers == 1
    assert load_settings(env=env).workers == 3
    assert load_settings(env=env, workers=MAX_WORKERS).workers == MAX_WORKERS
    # Metrics off, or on ephemeral ports: no port arithmetic to overflow.
    assert group(workers=64, metrics_listen=":0").workers == 64
    assert group(workers=64, metrics_listen="").workers == 64


def test_each_worker_is_a_data_plane_of_its_own() -> None:
    s = group(
        workers=3,
        listen="127.0.0.1:0",
        data_plane_id="gw-a",
        journal_dir="/var/lib/spendgate/ext_proc-{port}",
        metrics_listen="10.0.0.5:9465",
    )
    w2 = s.for_worker(2, "127.0.0.1:41000", "gw-a")
    assert (w2.listen, w2.data_plane_id, w2.identity) == ("127.0.0.1:41000", "gw-a-w2", "gw-a-w2")
    assert w2.journal_dir == "/var/lib/spendgate/ext_proc-{port}/w2"
    assert w2.journal_path(41000) == "/var/lib/spendgate/ext_proc-41000/w2"
    assert w2.metrics_listen == "10.0.0.5:9467"
    assert w2.workers == 3  # it binds with SO_REUSEPORT
    # Everything else is the group's.
    assert w2.flush_interval_ms == s.flush_interval_ms and w2.data_plane_token == DP


def test_worker_settings_keep_off_what_is_off() -> None:
    s = group(workers=2, journal_dir="", metrics_listen="")
    w1 = s.for_worker(1, "[::1]:5000", "h-1")
    assert (w1.journal_dir, w1.metrics_listen, w1.data_plane_id) == ("", "", "h-1-w1")
    ephemeral = group(workers=2, metrics_listen="[::1]:0").for_worker(2, "[::1]:5000", "h")
    assert ephemeral.metrics_listen == "[::1]:0"


@pytest.mark.parametrize("k", [0, -1, 3, 10**30])
def test_worker_number_out_of_the_group_is_refused(k: int) -> None:
    with pytest.raises(ConfigError, match=f"worker must be between 1 and 2, not {k}"):
        group(workers=2).for_worker(k, "127.0.0.1:5000", "g")


def test_bad_flags_exit_2_naming_the_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPENDGATE_DATA_PLANE_TOKEN", DP)
    # Logging stays as the test session set it up (not bound to capsys's stream).
    monkeypatch.setattr(logs, "configure", lambda **_: None)
    assert main(["--workers", "0"]) == 2
    assert "bad configuration: workers must be between 1 and 64, not 0" in capsys.readouterr().err
    # A worker number its parent never gives: refused before anything binds.
    assert main(["--workers", "2", "--worker", "3", "--listen", "127.0.0.1:0"]) == 2
    assert "worker must be between 1 and 2, not 3" in capsys.readouterr().err
