"""Settings loading: precedence of sources and errors that name the bad key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from control_plane.config import Settings as CPSettings
from control_plane.config import load_settings as load_cp
from ext_proc.config import Settings as EPSettings
from ext_proc.config import load_settings as load_ep
from spendgate.settings import ConfigError

ADMIN = "admin-token-0123456789"
READ = "read-token-0123456789"
DP = "data-plane-token-0123456789"
CP_REQUIRED = {"SPENDGATE_ADMIN_TOKEN": ADMIN}
EP_REQUIRED = {"SPENDGATE_DATA_PLANE_TOKEN": DP}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spendgate.yaml"
    path.write_text(text)
    return str(path)


def changed(settings: Any, defaults: Any) -> dict[str, Any]:
    """The fields of ``settings`` that differ from ``defaults``."""
    return {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if getattr(settings, f.name) != getattr(defaults, f.name)
    }


EP_DEFAULTS = EPSettings(data_plane_token=DP)
CP_DEFAULTS = CPSettings(admin_token=ADMIN)


# ---- precedence ----

PRECEDENCE_FILE = """
listen: 0.0.0.0:1000
flush_interval_ms: 200
log_level: debug
data_plane_token: top-level-token-0123456789
ext_proc:
  listen: 0.0.0.0:2000
  flush_interval_ms: 300
"""


@pytest.mark.parametrize(
    ("env", "overrides", "expected"),
    [
        pytest.param(
            {},
            {},
            {
                "listen": "0.0.0.0:2000",
                "flush_interval_ms": 300,
                "log_level": "debug",
                "data_plane_token": "top-level-token-0123456789",
            },
            id="section-beats-top-level",
        ),
        pytest.param(
            {"SPENDGATE_LISTEN": "0.0.0.0:3000", "SPENDGATE_LOG_LEVEL": "error"},
            {},
            {
                "listen": "0.0.0.0:3000",
                "flush_interval_ms": 300,
                "log_level": "error",
                "data_plane_token": "top-level-token-0123456789",
            },
            id="env-beats-file",
        ),
        pytest.param(
            {"SPENDGATE_LISTEN": "0.0.0.0:3000", "SPENDGATE_EXT_PROC_LISTEN": "0.0.0.0:4000"},
            {},
            {
                "listen": "0.0.0.0:4000",
                "flush_interval_ms": 300,
                "log_level": "debug",
                "data_plane_token": "top-level-token-0123456789",
            },
            id="section-env-beats-plain-env",
        ),
        pytest.param(
            {"SPENDGATE_EXT_PROC_LISTEN": "0.0.0.0:4000", "SPENDGATE_FLUSH_INTERVAL_MS": "50"},
            {"listen": "0.0.0.0:5000", "flush_interval_ms": None},
            {
                "listen": "0.0.0.0:5000",
                "flush_interval_ms": 50,
                "log_level": "debug",
                "data_plane_token": "top-level-token-0123456789",
            },
            id="overrides-beat-env-none-ignored",
        ),
        pytest.param(
            {"SPENDGATE_CONTROL_PLANE_LISTEN": "0.0.0.0:9999"},
            {},
            {
                "listen": "0.0.0.0:2000",
                "flush_interval_ms": 300,
                "log_level": "debug",
                "data_plane_token": "top-level-token-0123456789",
            },
            id="other-section-env-ignored",
        ),
    ],
)
def test_ext_proc_precedence(
    tmp_path: Path, env: dict[str, str], overrides: dict[str, Any], expected: dict[str, Any]
) -> None:
    s = load_ep(env=env, file=write(tmp_path, PRECEDENCE_FILE), **overrides)
    assert changed(s, EP_DEFAULTS) == expected


def test_defaults_only() -> None:
    assert load_ep(env=EP_REQUIRED) == EP_DEFAULTS
    assert load_cp(env=CP_REQUIRED) == CP_DEFAULTS
    assert EP_DEFAULTS.listen == "127.0.0.1:50052"
    assert EP_DEFAULTS.flush_interval_ms == 100
    assert EP_DEFAULTS.unmetered_requests == "count"
    assert CP_DEFAULTS.listen == "127.0.0.1:50051"
    assert CP_DEFAULTS.week_start_index == 0


def test_one_file_configures_both_planes(tmp_path: Path) -> None:
    # ext_proc has a `control_plane` setting (an address) and the file a
    # `control_plane:` section: the section must not become the address.
    path = write(
        tmp_path,
        f"""
log_json: false
control_plane:
  listen: 0.0.0.0:7001
  admin_token: {ADMIN}
  data_plane_token: {DP}
  week_start: Sunday
ext_proc:
  listen: 0.0.0.0:7002
  control_plane: cp.internal:7001
  data_plane_token: {DP}
""",
    )
    cp = load_cp(env={}, file=path)
    ep = load_ep(env={}, file=path)
    assert changed(cp, CP_DEFAULTS) == {
        "listen": "0.0.0.0:7001",
        "data_plane_token": DP,
        "week_start": "Sunday",
        "log_json": False,
    }
    assert cp.week_start_index == 6
    assert changed(ep, EP_DEFAULTS) == {
        "listen": "0.0.0.0:7002",
        "control_plane": "cp.internal:7001",
        "log_json": False,
    }


def test_control_plane_section_does_not_leak_into_ext_proc_address(tmp_path: Path) -> None:
    path = write(tmp_path, f"control_plane:\n  admin_token: {ADMIN}\n")
    assert load_ep(env=EP_REQUIRED, file=path).control_plane == "127.0.0.1:50051"


def test_empty_values_and_sections_mean_unset(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 0.0.0.0:1\nlog_level:\next_proc:\n")
    assert changed(load_ep(env=EP_REQUIRED, file=path), EP_DEFAULTS) == {"listen": "0.0.0.0:1"}
    path = write(tmp_path, "listen: 0.0.0.0:1\next_proc:\n  listen:\n")
    assert changed(load_ep(env=EP_REQUIRED, file=path), EP_DEFAULTS) == {"listen": "0.0.0.0:1"}


def test_empty_token_in_file_is_missing_not_none(tmp_path: Path) -> None:
    path = write(tmp_path, "ext_proc:\n  data_plane_token:\n")
    with pytest.raises(ConfigError, match=r"^data_plane_token is required"):
        load_ep(env={}, file=path)


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert load_ep(env=EP_REQUIRED, file=write(tmp_path, "")) == EP_DEFAULTS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("true", True, id="true"),
        pytest.param("YES", True, id="yes-upper"),
        pytest.param(" on ", True, id="on-padded"),
        pytest.param("1", True, id="one"),
        pytest.param("false", False, id="false"),
        pytest.param("No", False, id="no"),
        pytest.param("off", False, id="off"),
        pytest.param("0", False, id="zero"),
    ],
)
def test_bool_from_env(value: str, expected: bool) -> None:
    s = load_ep(env={**EP_REQUIRED, "SPENDGATE_EXT_PROC_CONTROL_PLANE_TLS": value})
    assert s.control_plane_tls is expected


def test_yaml_types_are_taken_as_they_are(tmp_path: Path) -> None:
    path = write(tmp_path, "ext_proc:\n  control_plane_tls: true\n  flush_interval_ms: 250\n")
    s = load_ep(env=EP_REQUIRED, file=path)
    assert (s.control_plane_tls, s.flush_interval_ms) == (True, 250)


def test_int_from_env_and_integral_float(tmp_path: Path) -> None:
    assert (
        load_ep(env={**EP_REQUIRED, "SPENDGATE_FLUSH_INTERVAL_MS": " 75 "}).flush_interval_ms == 75
    )
    path = write(tmp_path, "flush_interval_ms: 80.0\n")
    assert load_ep(env=EP_REQUIRED, file=path).flush_interval_ms == 80


# ---- errors name the key ----


@pytest.mark.parametrize(
    ("yaml_text", "env", "overrides", "message"),
    [
        pytest.param(
            "ext_proc:\n  listen: x\n  flush_interval: 5\n",
            EP_REQUIRED,
            {},
            "unknown setting(s) in ext_proc: flush_interval",
            id="unknown-key-in-section",
        ),
        pytest.param(
            "",
            EP_REQUIRED,
            {"listn": "x"},
            "unknown setting(s): listn",
            id="unknown-override",
        ),
        pytest.param(
            "ext_proc:\n  control_plane_tls: maybe\n",
            EP_REQUIRED,
            {},
            "control_plane_tls must be true or false, not 'maybe'",
            id="bool-not-bool-file",
        ),
        pytest.param(
            "",
            {**EP_REQUIRED, "SPENDGATE_LOG_JSON": "2"},
            {},
            "log_json must be true or false, not '2'",
            id="bool-not-bool-env",
        ),
        pytest.param(
            "",
            {**EP_REQUIRED, "SPENDGATE_FLUSH_INTERVAL_MS": "fast"},
            {},
            "flush_interval_ms must be an integer, not 'fast'",
            id="int-not-int-env",
        ),
        pytest.param(
            "flush_interval_ms: 1.5\n",
            EP_REQUIRED,
            {},
            "flush_interval_ms must be an integer, not 1.5",
            id="int-not-int-float",
        ),
        pytest.param(
            "flush_interval_ms: true\n",
            EP_REQUIRED,
            {},
            "flush_interval_ms must be an integer, not True",
            id="int-not-int-bool",
        ),
        pytest.param(
            "ext_proc:\n  listen: [a, b]\n",
            EP_REQUIRED,
            {},
            "listen must be a string, not ['a', 'b']",
            id="str-not-str",
        ),
        pytest.param(
            "",
            {**EP_REQUIRED, "SPENDGATE_FLUSH_INTERVAL_MS": "5"},
            {},
            "flush_interval_ms must be between 10 and 60000",
            id="int-out-of-range",
        ),
        pytest.param(
            "",
            {},
            {},
            "data_plane_token is required (SPENDGATE_DATA_PLANE_TOKEN)",
            id="missing-data-plane-token",
        ),
        pytest.param(
            "",
            {**EP_REQUIRED, "SPENDGATE_USER_HEADER": "X-User"},
            {},
            "user_header must be lower-case (Envoy lower-cases headers)",
            id="upper-case-header",
        ),
        pytest.param(
            "",
            {**EP_REQUIRED, "SPENDGATE_EXT_PROC_MISSING_IDENTITY": "allow"},
            {},
            "missing_identity must be reject or anonymous",
            id="bad-missing-identity",
        ),
        pytest.param(
            "",
            EP_REQUIRED,
            {"trusted_header_sources": "10.0.0.0/8, localhost"},
            "trusted_header_sources: 'localhost' is neither a CIDR (10.0.0.0/8, 127.0.0.1/32) "
            "nor a peer principal (spiffe://trust-domain/path)",
            id="trusted-source-not-cidr",
        ),
        pytest.param(
            "",
            EP_REQUIRED,
            {"tags_claims": "team,=org"},
            "tags_claims: '=org' must be 'claim' or 'tag_key=claim'",
            id="tag-claim-without-key",
        ),
        pytest.param(
            "",
            {**EP_REQUIRED, "SPENDGATE_SERVICE_HEADER": "X-Service"},
            {},
            "service_header must be lower-case (Envoy lower-cases headers)",
            id="upper-case-service-header",
        ),
        pytest.param(
            "",
            {**EP_REQUIRED, "SPENDGATE_LOG_LEVEL": "loud"},
            {},
            "log_level must be debug, info, warning or error",
            id="bad-log-level",
        ),
        pytest.param(
            "",
            {**EP_REQUIRED, "SPENDGATE_ARBITER_TIMEOUT_MS": "1000"},
            {},
            "arbiter_timeout_ms must be between 10 and 900 (below Envoy's message_timeout)",
            id="arbiter-timeout-past-envoys",
        ),
        pytest.param(
            "",
            EP_REQUIRED,
            {"arbiter_headroom_requests": -1},
            "arbiter_headroom_requests must be >= 0",
            id="negative-headroom",
        ),
        pytest.param(
            "",
            {**EP_REQUIRED, "SPENDGATE_EXT_PROC_RESERVATION_PERCENTILE": "101"},
            {},
            "reservation_percentile must be between 50 and 100",
            id="percentile-above-100",
        ),
        pytest.param(
            "",
            EP_REQUIRED,
            {"reservation_output_tokens": -1},
            "reservation_output_tokens must be >= 0",
            id="negative-reservation-output-tokens",
        ),
        pytest.param(
            "",
            {**EP_REQUIRED, "SPENDGATE_EXT_PROC_HELD_RETRY_AFTER_S": "0"},
            {},
            "held_retry_after_s must be between 1 and 60 (seconds)",
            id="held-retry-after-zero",
        ),
        pytest.param(
            "ext_proc:\n  held_retry_after_s: 1e30\n",
            EP_REQUIRED,
            {},
            "held_retry_after_s",
            id="held-retry-after-huge",
        ),
        pytest.param(
            "",
            EP_REQUIRED,
            {"held_retry_after_s": 61},
            "held_retry_after_s must be between 1 and 60 (seconds)",
            id="held-retry-after-past-a-minute",
        ),
        pytest.param(
            "",
            {**EP_REQUIRED, "SPENDGATE_EXT_PROC_STARTUP_WAIT_MS": "950"},
            {},
            "startup_wait_ms must be between 0 and 900 (below Envoy's message_timeout)",
            id="startup-wait-past-envoys",
        ),
        pytest.param(
            "ext_proc:\n  unmetered_requests: ignore\n",
            EP_REQUIRED,
            {},
            "unmetered_requests must be count or reject, not 'ignore'",
            id="bad-unmetered-requests",
        ),
        pytest.param(
            "ext_proc: 5\n",
            EP_REQUIRED,
            {},
            "ext_proc must be a mapping",
            id="section-not-mapping",
        ),
        pytest.param(
            "- a\n- b\n",
            EP_REQUIRED,
            {},
            "must be a mapping of settings",
            id="file-not-mapping",
        ),
        pytest.param(
            "ext_proc: [\n",
            EP_REQUIRED,
            {},
            "config file",
            id="file-not-yaml",
        ),
    ],
)
def test_ext_proc_errors(
    tmp_path: Path, yaml_text: str, env: dict[str, str], overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_ep(env=env, file=write(tmp_path, yaml_text), **overrides)
    assert message in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml"):
        load_ep(env=EP_REQUIRED, file=str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({}, "admin_token is required (SPENDGATE_ADMIN_TOKEN)", id="missing-admin"),
        pytest.param(
            {"SPENDGATE_ADMIN_TOKEN": "short"},
            "admin_token, read_token, data_plane_token: at least 16 characters",
            id="short-admin",
        ),
        pytest.param(
            {"SPENDGATE_ADMIN_TOKEN": ADMIN, "SPENDGATE_READ_TOKEN": "r" * 15},
            "admin_token, read_token, data_plane_token: at least 16 characters",
            id="short-read",
        ),
        pytest.param(
            {"SPENDGATE_ADMIN_TOKEN": ADMIN, "SPENDGATE_DATA_PLANE_TOKEN": "d" * 15},
            "admin_token, read_token, data_plane_token: at least 16 characters",
            id="short-data-plane",
        ),
        pytest.param(
            {"SPENDGATE_ADMIN_TOKEN": ADMIN, "SPENDGATE_READ_TOKEN": ADMIN},
            "admin_token, read_token and data_plane_token must differ",
            id="admin-equals-read",
        ),
        pytest.param(
            {
                "SPENDGATE_ADMIN_TOKEN": ADMIN,
                "SPENDGATE_READ_TOKEN": READ,
                "SPENDGATE_DATA_PLANE_TOKEN": READ,
            },
            "admin_token, read_token and data_plane_token must differ",
            id="read-equals-data-plane",
        ),
        pytest.param(
            {**CP_REQUIRED, "SPENDGATE_WEEK_START": "funday"},
            "week_start must be one of monday, tuesday, wednesday, thursday, friday, "
            "saturday, sunday",
            id="bad-week-start",
        ),
        pytest.param(
            {**CP_REQUIRED, "SPENDGATE_HOLD_TTL_S": "5"},
            "hold_ttl_s must be between 15 and 3600 (data planes refresh holds every 5 s)",
            id="hold-ttl-below-refresh",
        ),
        *(
            pytest.param(
                {**CP_REQUIRED, "SPENDGATE_SPEND_RETENTION_DAYS": days},
                "spend_retention_days must be between 1 and 36500",
                id=f"spend-retention-{days}",
            )
            for days in ("0", "-1", "36501")
        ),
        pytest.param(
            {**CP_REQUIRED, "SPENDGATE_REPORT_RETENTION_DAYS": "0"},
            "report_retention_days must be between 1 and 36500",
            id="report-retention-zero",
        ),
        pytest.param(
            {**CP_REQUIRED, "SPENDGATE_REPORT_RETENTION_DAYS": "100000"},
            "report_retention_days must be between 1 and 36500",
            id="report-retention-huge",
        ),
        pytest.param(
            {**CP_REQUIRED, "SPENDGATE_FORECAST_HORIZON_S": "-1"},
            "forecast_horizon_s must be between 60 and 604800 (7 days)",
            id="forecast-horizon-negative",
        ),
        pytest.param(
            {**CP_REQUIRED, "SPENDGATE_FORECAST_HORIZON_S": "1e30"},
            "forecast_horizon_s must be between 60 and 604800 (7 days)",
            id="forecast-horizon-huge",
        ),
        pytest.param(
            {**CP_REQUIRED, "SPENDGATE_FORECAST_HORIZON_S": "nan"},
            "forecast_horizon_s must be between 60 and 604800 (7 days)",
            id="forecast-horizon-nan",
        ),
        pytest.param(
            {**CP_REQUIRED, "SPENDGATE_TLS_CERT_FILE": "/cert.pem"},
            "tls_cert_file and tls_key_file must be set together",
            id="cert-without-key",
        ),
        pytest.param(
            {**CP_REQUIRED, "SPENDGATE_CONTROL_PLANE_LOG_JSON": "nah"},
            "log_json must be true or false, not 'nah'",
            id="bool-not-bool",
        ),
    ],
)
def test_control_plane_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_cp(env=env)
    assert str(info.value) == message


def test_control_plane_valid_tokens_and_week_start() -> None:
    s = load_cp(
        env={
            "SPENDGATE_ADMIN_TOKEN": ADMIN,
            "SPENDGATE_CONTROL_PLANE_READ_TOKEN": READ,
            "SPENDGATE_DATA_PLANE_TOKEN": DP,
            "SPENDGATE_WEEK_START": "SUNDAY",
        }
    )
    assert changed(s, CP_DEFAULTS) == {
        "read_token": READ,
        "data_plane_token": DP,
        "week_start": "SUNDAY",
    }
    assert s.week_start_index == 6


def test_data_plane_token_env_is_shared_by_both_planes() -> None:
    env = {"SPENDGATE_ADMIN_TOKEN": ADMIN, "SPENDGATE_DATA_PLANE_TOKEN": DP}
    assert load_cp(env=env).data_plane_token == load_ep(env=env).data_plane_token == DP
