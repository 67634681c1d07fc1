"""The Kubernetes files of deploy/k8s agree with the code they deploy.

No cluster runs here, so this checks what would break `kubectl apply -k` or the
pods it starts: every file parses; every container runs a real `llmrelay` command
with real options (`llmrelay ... --help`); the ConfigMap's llmrelay.yaml passes the
real config parser with exactly the environment each container gets, every
``${VAR}`` in it is provided, and secret ones from a Secret; one worker Deployment
and one KEDA ScaledObject per pool, whose triggers name the stream and consumers
``ensure_topology`` creates for that pool (on the session's nats-server); Services
reach their pods; the NATS chart's values are a 3-node JetStream cluster with
nats.conf's users and permissions, accepted by a real ``nats-server -t``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml
from nats.aio.client import Client as NATS

from broker import ensure_topology, parse_config
from broker._config import Config
from broker._subjects import JOBS_STREAM, pool_consumer, pool_subject, route_consumer, route_subject
from tests._deploy import DEPLOY, REPO
from tests.test_compose import _help, _option, _subcommand

K8S = DEPLOY / "k8s"
CONFIG_FILE = K8S / "llmrelay.yaml"
NATS_VALUES = K8S / "nats-values.yaml"
SECRETS = K8S / "secrets.example.yaml"
NOT_RESOURCES = {"kustomization.yaml", CONFIG_FILE.name, NATS_VALUES.name, SECRETS.name}
# Config fields that hold secrets (broker/_config.py's Secret fields).
SECRET_FIELDS = re.compile(r"(api_key|password|token|aws_\w+|api_keys\[\d+\]|headers\.\w+)$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kustomization() -> dict[str, Any]:
    return _docs(K8S / "kustomization.yaml")[0]


def _resources() -> list[dict[str, Any]]:
    return [doc for name in _kustomization()["resources"] for doc in _docs(K8S / name)]


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _resources() if d["kind"] == kind}


def _containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(deployment, pod spec, container) of every llmrelay container."""
    return [
        (name, dep["spec"]["template"]["spec"], c)
        for name, dep in _of_kind("Deployment").items()
        for c in dep["spec"]["template"]["spec"]["containers"]
        if c["image"].split(":")[0] == "llmrelay"
    ]


CONTAINERS = _containers()
CONFIGURED = [c for c in CONTAINERS if "--config" in c[2]["args"]]


def _secret_keys() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d["stringData"]) for d in _docs(SECRETS)}


def _env_sources(container: dict[str, Any]) -> dict[str, str]:
    """Every variable the container gets -> "secret" or "value"."""
    out: dict[str, str] = {}
    secrets = _secret_keys()
    for source in container.get("envFrom", []):
        name = source["secretRef"]["name"]
        assert name in secrets, f"Secret {name} is not in {SECRETS.name}"
        out |= dict.fromkeys(secrets[name], "secret")
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        assert ref is None or ref["key"] in secrets[ref["name"]], var
        out[var["name"]] = "secret" if ref else "value"
    return out


def _config_vars() -> dict[str, list[str]]:
    """``${VAR}`` without a default -> the config paths that use it."""
    found: dict[str, list[str]] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, str):
            for name, default in _VAR.findall(value):
                assert not default, f"{path}: ${{{name}{default}}} would hide a missing Secret"
                found.setdefault(name, []).append(path)

    walk(yaml.safe_load(CONFIG_FILE.read_text()), "")
    return found


def _config() -> Config:
    env = dict.fromkeys(_config_vars(), "x")
    return parse_config(CONFIG_FILE.read_text(), source=str(CONFIG_FILE), env=env)


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_every_file_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, path.name
    if path.name in NOT_RESOURCES - {SECRETS.name}:
        return
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path.name


def test_the_kustomization_lists_every_manifest_and_generates_the_config() -> None:
    kust = _kustomization()
    files = {p.name for p in K8S.glob("*.yaml")} - NOT_RESOURCES
    assert set(kust["resources"]) == files
    (generator,) = kust["configMapGenerator"]
    assert generator["files"] == [CONFIG_FILE.name]
    assert [i["name"] for i in kust["images"]] == ["llmrelay"]
    assert kust["namespace"] == "llmrelay"


@pytest.mark.parametrize("item", CONTAINERS, ids=[c[0] for c in CONTAINERS])
def test_container_commands_are_real_llmrelay_commands(item: Any) -> None:
    name, _, container = item
    assert "command" not in container, f"{name}: the image's entrypoint is llmrelay"
    args = [str(a) for a in container["args"]]
    path = _subcommand(args)
    result = _help(*path)
    usage = f"llmrelay {' '.join(path)}"
    assert result.returncode == 0, f"{usage}: {result.stderr or result.stdout}"
    assert f"Usage: {usage} " in result.stdout, result.stdout
    for option in (a for a in args if a.startswith("--")):
        assert re.search(rf"{re.escape(option)}\b", result.stdout), f"{name}: no {option}"
    ports = {str(p["containerPort"]) for p in container.get("ports", [])}
    for option in ("--port", "--metrics-port"):
        if (port := _option(args, option)) is not None:
            assert port in ports, f"{name}: {option} {port} is not a containerPort"


def test_the_config_is_the_examples_with_three_replicas() -> None:
    config = _config()
    example = parse_config((REPO / "llmrelay.example.yaml").read_text(), env={})
    assert set(config.pools) == set(example.pools)
    assert config.routes == example.routes
    values = _docs(NATS_VALUES)[0]
    assert config.streams.replicas == values["config"]["cluster"]["replicas"] == 3


@pytest.mark.parametrize("item", CONFIGURED, ids=[c[0] for c in CONFIGURED])
def test_every_config_variable_reaches_the_container(item: Any) -> None:
    name, pod, container = item
    env = _env_sources(container)
    for var, paths in _config_vars().items():
        assert var in env, f"{name}: ${{{var}}} ({paths}) is not set"
        if any(SECRET_FIELDS.search(p) for p in paths):
            assert env[var] == "secret", f"{name}: ${{{var}}} ({paths}) is not from a Secret"
    # The real parser, with exactly what the container gets (unknown keys are errors).
    parse_config(CONFIG_FILE.read_text(), env=dict.fromkeys(env, "x"))
    config_path = Path(str(_option([str(a) for a in container["args"]], "--config")))
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(config_path.parent)])
    assert volume["configMap"]["name"] == _kustomization()["configMapGenerator"][0]["name"]
    assert config_path.name == CONFIG_FILE.name


def test_one_worker_deployment_and_one_scaled_object_per_pool() -> None:
    workers = {
        _option(list(c["args"]), "--pool"): dep
        for dep, _, c in CONTAINERS
        if _subcommand(list(c["args"])) == ["worker"]
    }
    assert set(workers) == set(_config().pools)
    targets = {so["spec"]["scaleTargetRef"]["name"] for so in _of_kind("ScaledObject").values()}
    assert targets == set(workers.values())


async def test_keda_triggers_read_the_consumers_ensure_topology_creates(nc: NATS) -> None:
    config = _config()
    single = msgspec.structs.replace(
        config, streams=msgspec.structs.replace(config.streams, replicas=1)
    )  # one nats-server here; names do not depend on replicas
    await ensure_topology(nc, single)
    created = {c.name: c.config for c in await nc.jetstream().consumers_info(JOBS_STREAM)}
    deployments = _of_kind("Deployment")
    for so in _of_kind("ScaledObject").values():
        worker = deployments[so["spec"]["scaleTargetRef"]["name"]]
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        pool = str(_option([str(a) for a in container["args"]], "--pool"))
        served = {route for route, _, _ in config.routes_of_pool(pool)}
        wanted = {route_consumer(r): route_subject(r) for r in served}
        wanted[pool_consumer(pool)] = pool_subject(pool)
        triggers = so["spec"]["triggers"]
        assert {t["metadata"]["consumer"] for t in triggers} == set(wanted), pool
        for trigger in triggers:
            meta = trigger["metadata"]
            assert trigger["type"] == "nats-jetstream"
            assert meta["stream"] == JOBS_STREAM and meta["account"] == "$G"
            consumer = created[meta["consumer"]]
            subjects = consumer.filter_subjects or [str(consumer.filter_subject)]
            assert wanted[meta["consumer"]] in subjects, (meta["consumer"], subjects)
            assert meta["lagThreshold"] == str(config.pools[pool].concurrency)
            _assert_monitoring_endpoint(meta["natsServerMonitoringEndpoint"])


def _assert_monitoring_endpoint(endpoint: str) -> None:
    """The NATS chart's headless Service (release `nats`), on its monitoring port."""
    host, port = endpoint.rsplit(":", 1)
    namespace = _kustomization()["namespace"]
    assert host == f"nats-headless.{namespace}.svc.cluster.local", endpoint
    monitor = _docs(NATS_VALUES)[0]["config"]["monitor"]
    assert monitor["enabled"] is True and int(port) == monitor["port"]


def _pods() -> list[dict[str, Any]]:
    return [d["spec"]["template"] for d in _of_kind("Deployment").values()]


def _container_ports(pod: dict[str, Any]) -> set[str]:
    """Every port of the pod's containers, by number and by name."""
    return {str(v) for c in pod["spec"]["containers"] for p in c["ports"] for v in p.values()}


def test_services_reach_their_pods_and_pods_are_scraped_where_they_listen() -> None:
    for name, svc in _of_kind("Service").items():
        selector = svc["spec"]["selector"].items()
        (pod,) = [p for p in _pods() if selector <= p["metadata"]["labels"].items()]
        for port in svc["spec"]["ports"]:
            assert str(port["targetPort"]) in _container_ports(pod), (name, port)
    for pod in _pods():
        scrape = pod["metadata"].get("annotations", {}).get("prometheus.io/port")
        assert scrape is None or scrape in _container_ports(pod), pod["metadata"]


def test_the_configs_urls_name_services_on_their_ports() -> None:
    ports = {
        name: {str(p["port"]) for p in svc["spec"]["ports"]}
        for name, svc in _of_kind("Service").items()
    }
    for pool, settings in _config().pools.items():
        url = urlsplit(settings.base_url)
        assert str(url.port) in ports.get(str(url.hostname), set()), f"{pool}: {url.netloc}"
    assert urlsplit(_config().nats.url).netloc == "nats:4222"  # the chart's release `nats`


def _nats_conf_permissions() -> dict[str, Any]:
    """The WORKER and CLIENT permissions of nats.conf, as the chart's YAML spells them."""
    text = re.sub(r"#[^\n]*", "", (REPO / "nats.conf").read_text())

    def listed(block: str, key: str) -> list[str]:
        match = re.search(rf"{key}:\s*\[(.*?)\]", block, re.S)
        assert match, key
        return re.findall(r'"([^"]+)"', match.group(1))

    worker = text.split("WORKER = {", 1)[1].split("}", 1)[0]
    client = text.split("CLIENT = {", 1)[1].split("users:", 1)[0]
    return {
        "worker": dict(re.findall(r'(publish|subscribe):\s*"([^"]+)"', worker)),
        "client": {
            "publish": {"allow": listed(client, "allow"), "deny": listed(client, "deny")},
            "subscribe": listed(client, r"subscribe"),
        },
    }


def test_nats_values_are_a_jetstream_cluster_with_nats_confs_users() -> None:
    values = _docs(NATS_VALUES)[0]
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["jetstream"]["enabled"] is True
    users = {u["user"]: u for u in values["config"]["merge"]["authorization"]["users"]}
    config = _config()
    assert set(users) == {config.nats.user, config.gateway.nats_user}
    assert {u: users[u]["permissions"] for u in users} == _nats_conf_permissions()
    # Each side of a password is the same key of the same Secret.
    raw = yaml.safe_load(CONFIG_FILE.read_text())
    sides = {
        config.nats.user: raw["nats"]["password"],
        config.gateway.nats_user: raw["gateway"]["nats_password"],
    }
    env = values["container"]["env"]
    for user, in_config in sides.items():
        server_var = re.fullmatch(r"<< \$(\w+) >>", users[user]["password"])
        assert server_var, users[user]["password"]
        ref = env[server_var.group(1)]["valueFrom"]["secretKeyRef"]
        assert in_config == f"${{{ref['key']}}}", user
        assert ref["key"] in _secret_keys()[ref["name"]]


def test_nats_values_merge_is_a_config_nats_server_accepts(tmp_path: Path) -> None:
    merge = _docs(NATS_VALUES)[0]["config"]["merge"]
    # The chart writes the merge as NATS config, `<< x >>` unquoted (x: a unit, a $VAR).
    text = re.sub(r'"<< (.+?) >>"', r"\1", json.dumps(merge, indent=2))[1:-1]
    conf = tmp_path / "nats.conf"
    conf.write_text(text)
    env = {**os.environ, "LLMRELAY_NATS_PASSWORD": "w", "LLMRELAY_CLIENT_PASSWORD": "c"}
    server = Path(sys.executable).parent / "nats-server"
    result = subprocess.run(
        [str(server), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30, env=env
    )
    assert result.returncode == 0, result.stderr or result.stdout
