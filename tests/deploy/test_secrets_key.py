"""Every control plane of the deploy files has the secrets key, the same one
per deployment, and every process that migrates has it too (migration 0005
encrypts what an earlier release stored in clear)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from control_plane.keyring import Keyring, parse_keys
from tests.deploy.files import module_of
from tests.deploy.test_compose import SERVICES, env_of
from tests.deploy.test_kubernetes import one, workloads

KEY_FILE_ENV = "SPENDGATE_CONTROL_PLANE_SECRETS_KEY_FILE"


def mounted_key_file(workload: dict[str, Any], container: dict[str, Any]) -> str:
    """The text of the Secret key the container's key file path points to."""
    (path,) = [e["value"] for e in container["env"] if e["name"] == KEY_FILE_ENV]
    path = PurePosixPath(path)
    (mount,) = [
        m for m in container["volumeMounts"] if path.parent == PurePosixPath(m["mountPath"])
    ]
    assert mount.get("readOnly") is True
    (volume,) = [
        v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    mode = volume["secret"]["defaultMode"]
    assert mode & 0o007 == 0, "the key file must not be readable by everyone"
    pod = workload["spec"]["template"]["spec"]["securityContext"]
    assert mode & 0o040 and pod["fsGroup"] == pod["runAsUser"], "the process must read it"
    secret = one("Secret", volume["secret"]["secretName"])
    return str(secret["stringData"][path.name])


def test_kubernetes_control_planes_and_the_migrate_job_read_one_key_file() -> None:
    found = [
        (w["kind"], mounted_key_file(w, c))
        for w, c in workloads()
        if module_of(c["command"]) in ("control_plane", "control_plane.migrate")
    ]
    assert sorted(kind for kind, _ in found) == ["Deployment", "Job"]
    (text,) = {t for _, t in found}
    Keyring(tuple(parse_keys(text.splitlines(), "example Secret")))


def test_compose_control_planes_share_one_valid_key() -> None:
    keys = {
        env_of(svc).get("SPENDGATE_CONTROL_PLANE_SECRETS_KEY")
        for svc in SERVICES.values()
        if "build" in svc and module_of(svc["command"]) == "control_plane"
    }
    (key,) = keys
    assert key is not None
    parse_keys(key.split(","), "docker-compose.yml", file=False)
