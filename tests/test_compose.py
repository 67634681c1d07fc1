"""docker-compose.yml and the Dockerfile agree with the repository.

Docker does not run here, so this checks what would break `docker compose up`
without it: every llmrelay command and option exists (`llmrelay ... --help`),
every mounted file exists, every named volume is declared, every worker pool is
in the config it mounts, every URL in a service's environment names a service
and the port it listens on, and every service builds from this Dockerfile.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from broker._config import Config, parse_config

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
LLMRELAY = Path(sys.executable).parent / "llmrelay"
CONFIG_IN_CONTAINER_ENV = "LLMRELAY_CONFIG"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _llmrelay_services() -> dict[str, dict[str, Any]]:
    """Services built from the Dockerfile, whose entrypoint is `llmrelay`."""
    return {name: svc for name, svc in _services().items() if "build" in svc}


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return [str(part) for part in (cmd.split() if isinstance(cmd, str) else cmd)]


def _subcommand(cmd: list[str]) -> list[str]:
    """`worker --pool a` -> ["worker"]; `dlq replay --route x` -> ["dlq", "replay"]."""
    path: list[str] = []
    for part in cmd:
        if part.startswith("-"):
            break
        path.append(part)
    return path


def _option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def _env(svc: dict[str, Any]) -> dict[str, str]:
    """The service's environment as compose sets it with nothing exported on the host
    (``${VAR:-default}`` is its default)."""
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): _COMPOSE_DEFAULT.sub(r"\1", str(v)) for k, v in env.items()}


_COMPOSE_DEFAULT = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}")


def _mounts(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, source, target) of every volume entry, short or long syntax."""
    out = []
    for vol in svc.get("volumes", []):
        if isinstance(vol, dict):
            out.append((vol["type"], str(vol.get("source", "")), vol["target"]))
            continue
        source, target = vol.split(":")[:2]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append((kind, source, target))
    return out


@functools.cache
def _help(*path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [str(LLMRELAY), *path, "--help"],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO,
    )  # fmt: skip


def _config_seen_by(svc: dict[str, Any]) -> Config:
    """The llmrelay config a service reads: the host file mounted at its --config
    path, with the service's environment (as the container would interpolate it)."""
    cmd = _command(svc)
    in_container = _option(cmd, "--config") or _env(svc).get(CONFIG_IN_CONTAINER_ENV)
    assert in_container, f"{cmd}: no --config and no {CONFIG_IN_CONTAINER_ENV}"
    host = {target: source for _, source, target in _mounts(svc)}.get(in_container)
    assert host, f"{in_container} is not mounted"
    return parse_config((REPO / host).read_text(), source=host, env=_env(svc))


LLMRELAY_SERVICES = sorted(_llmrelay_services())


@pytest.mark.parametrize("name", LLMRELAY_SERVICES)
def test_llmrelay_commands_and_options_exist(name: str) -> None:
    cmd = _command(_services()[name])
    path = _subcommand(cmd)
    assert path, f"{name}: no llmrelay subcommand in {cmd}"
    result = _help(*path)
    usage = f"llmrelay {' '.join(path)}"
    assert result.returncode == 0, f"{usage}: {result.stderr or result.stdout}"
    assert f"Usage: {usage} " in result.stdout, result.stdout  # its own help, not the app's
    for option in (part for part in cmd if part.startswith("--")):
        assert re.search(rf"{re.escape(option)}\b", result.stdout), f"{name}: no {option}"


def test_bind_mounted_files_exist_and_named_volumes_are_declared() -> None:
    declared = set(_compose().get("volumes") or {})
    for name, svc in _services().items():
        for kind, source, _ in _mounts(svc):
            if kind == "bind":
                assert (REPO / source).exists(), f"{name}: {source} is not in the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_one_scalable_worker_service_per_pool_of_its_config() -> None:
    served: set[str] = set()
    for name, svc in _llmrelay_services().items():
        cmd = _command(svc)
        if _subcommand(cmd) != ["worker"]:
            continue
        pool = _option(cmd, "--pool")
        config = _config_seen_by(svc)
        assert pool in config.pools, f"{name}: pool {pool!r} not in {sorted(config.pools)}"
        assert "container_name" not in svc, f"{name}: container_name prevents --scale"
        assert "ports" not in svc, f"{name}: a fixed host port prevents --scale"
        served.add(pool)
    every_pool = {p for svc in _llmrelay_services().values() for p in _config_seen_by(svc).pools}
    assert served == every_pool


def test_urls_in_the_environment_reach_a_service_on_its_port() -> None:
    services = _services()
    for name, svc in services.items():
        for key, value in _env(svc).items():
            if "://" in value:
                _assert_reach(services, f"{name}: {key}", value)


def _assert_reach(services: dict[str, dict[str, Any]], what: str, urls: str) -> None:
    """Every URL of a comma-separated list names a service and a port it listens on."""
    for value in urls.split(","):
        url = urlsplit(value)
        assert url.hostname in services, f"{what}={value} names no service"
        ports = _listening_ports(services[url.hostname])
        assert str(url.port) in ports, f"{what}={value}, but {url.hostname} uses {ports}"


def _listening_ports(svc: dict[str, Any]) -> set[str]:
    cmd = _command(svc)
    image = str(svc.get("image", ""))
    if image.startswith("nats:"):
        return {_option(cmd, "-p") or "4222"}
    return {p for p in (_option(cmd, "--port"), _option(cmd, "--metrics-port")) if p}


def test_every_llmrelay_service_builds_this_dockerfile() -> None:
    assert _llmrelay_services(), "no service builds the llmrelay image"
    for name, svc in _llmrelay_services().items():
        build = svc["build"]
        context = REPO / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert (context / dockerfile).resolve() == REPO / "Dockerfile", name


def test_dockerfile_installs_the_project_and_runs_llmrelay() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert 'ENTRYPOINT ["llmrelay"]' in text
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"


# --- the cluster profile ---------------------------------------------------------------

CLUSTER_CONF = "/etc/nats/nats-cluster.conf"


def _cluster_nodes() -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in _services().items()
        if "cluster" in svc.get("profiles", []) and str(svc.get("image", "")).startswith("nats:")
    }


def test_cluster_profile_runs_three_nodes_routed_to_each_other() -> None:
    nodes = _cluster_nodes()
    assert sorted(nodes) == ["nats-1", "nats-2", "nats-3"]
    names, stores, route_ports = set(), set(), set()
    for name, svc in nodes.items():
        cmd = _command(svc)
        assert _option(cmd, "-c") == CLUSTER_CONF, name
        assert _option(cmd, "-sd") == "/data", name
        names.add(_option(cmd, "--name"))
        listen = urlsplit(_option(cmd, "--cluster") or "")
        route_ports.add(listen.port)
        routes = {urlsplit(u) for u in (_option(cmd, "--routes") or "").split(",")}
        assert {(r.hostname, r.port) for r in routes} == {(n, listen.port) for n in nodes}, name
        mounts = {target: source for _, source, target in _mounts(svc)}
        # nats-cluster.conf includes nats.conf from its own directory.
        assert mounts[CLUSTER_CONF] == "./nats-cluster.conf", name
        assert mounts["/etc/nats/nats.conf"] == "./nats.conf", name
        stores.add(mounts["/data"])
        assert "healthz" in " ".join(svc["healthcheck"]["test"]), name
    assert len(names) == len(stores) == 3, "each node needs its own name and store"
    assert len(route_ports) == 1


def test_no_two_services_publish_the_same_host_port() -> None:
    published = [p.rsplit(":", 1)[0] for svc in _services().values() for p in svc.get("ports", [])]
    assert len(published) == len(set(published)), published


def test_the_cluster_url_names_every_node() -> None:
    urls = str(_compose()["x-cluster-nats-url"])
    _assert_reach(_services(), "x-cluster-nats-url", urls)
    assert {urlsplit(u).hostname for u in urls.split(",")} == set(_cluster_nodes())
    comments = [line for line in COMPOSE_FILE.read_text().splitlines() if line.startswith("#")]
    assert any(urls in line for line in comments), "the header shows how to use it"


def test_workers_wait_for_the_cluster_when_its_profile_runs() -> None:
    for name, svc in _llmrelay_services().items():
        if _subcommand(_command(svc)) not in (["worker"], ["monitor"]):
            continue
        deps = svc["depends_on"]
        for node in _cluster_nodes():
            assert deps[node] == {"condition": "service_healthy", "required": False}, name


def test_the_cluster_template_is_a_valid_nats_config() -> None:
    conf = REPO / "nats-cluster.conf"
    assert 'include "nats.conf"' in conf.read_text()
    server = Path(sys.executable).parent / "nats-server"
    result = subprocess.run(
        [str(server), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr or result.stdout
