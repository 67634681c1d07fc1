"""docker-compose.yml's `observe` profile: Prometheus scraping every worker, the gateway
and the monitor, and Grafana loading the dashboard.

Docker does not run here (tests/test_compose.py checks the rest of the file the
same way): every scrape target names a compose service and a port that service
listens on, every worker service is scraped, the files Prometheus and Grafana
read are mounted where their configs say, and ``promtool check config`` accepts
the scrape config (skipped, with the reason, without promtool).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests._deploy import DEPLOY, REPO, SCRAPE_CONFIG, prometheus_tool
from tests.test_compose import (
    _command,
    _listening_ports,
    _llmrelay_services,
    _mounts,
    _services,
    _subcommand,
)

PROFILE = "observe"
PROMETHEUS_CONFIG_IN_CONTAINER = "/etc/prometheus/prometheus.yml"


def _observe() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _services().items() if PROFILE in s.get("profiles", [])}


def _scrape_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(SCRAPE_CONFIG.read_text())
    return data


def _targets(job: dict[str, Any]) -> list[tuple[str, int]]:
    """(host, port) of every static target and DNS name of a scrape job."""
    out = [
        (host, int(port))
        for static in job.get("static_configs", [])
        for host, port in (t.rsplit(":", 1) for t in static["targets"])
    ]
    for dns in job.get("dns_sd_configs", []):
        assert dns["type"] == "A", job["job_name"]
        out += [(name, int(dns["port"])) for name in dns["names"]]
    return out


def _mounted(svc: dict[str, Any]) -> dict[str, Path]:
    """container path -> the repository path mounted there."""
    return {target: REPO / source for _, source, target in _mounts(svc)}


def test_the_profile_runs_prometheus_grafana_and_a_gateway() -> None:
    observe = _observe()
    assert {"prometheus", "grafana", "gateway"} <= set(observe), sorted(observe)
    images = {n: str(s.get("image", "")) for n, s in observe.items()}
    assert images["prometheus"].startswith("prom/prometheus:v2.")
    assert images["grafana"].startswith("grafana/grafana:")
    assert _subcommand(_command(observe["gateway"])) == ["gateway"]
    for name in ("prometheus", "grafana", "gateway"):
        assert any(p.startswith("127.0.0.1:") for p in observe[name]["ports"]), name


def test_every_scrape_target_is_a_service_on_a_port_it_listens_on() -> None:
    services = _services()
    for job in _scrape_config()["scrape_configs"]:
        for host, port in _targets(job):
            assert host in services, f"{job['job_name']}: {host} is no compose service"
            ports = _listening_ports(services[host])
            assert str(port) in ports, f"{job['job_name']}: {host}:{port}, but it uses {ports}"


def test_every_worker_the_gateway_and_the_monitor_are_scraped() -> None:
    scraped = {host for job in _scrape_config()["scrape_configs"] for host, _ in _targets(job)}
    wanted = {
        name
        for name, svc in _llmrelay_services().items()
        if _subcommand(_command(svc)) in (["worker"], ["gateway"], ["monitor"])
    }
    assert wanted, "no worker, gateway or monitor service"
    assert scraped == wanted, f"scraped {sorted(scraped)}, running {sorted(wanted)}"
    jobs = {job["job_name"]: job for job in _scrape_config()["scrape_configs"]}
    # Workers scale (`--scale worker-mock-a=3`): Docker's DNS answers every replica.
    assert "dns_sd_configs" in jobs["llmrelay-worker"]


def test_prometheus_reads_the_scrape_config_and_the_rules_it_names() -> None:
    prometheus = _observe()["prometheus"]
    assert f"--config.file={PROMETHEUS_CONFIG_IN_CONTAINER}" in _command(prometheus)
    mounted = _mounted(prometheus)
    assert mounted[PROMETHEUS_CONFIG_IN_CONTAINER] == SCRAPE_CONFIG
    config_dir = Path(PROMETHEUS_CONFIG_IN_CONTAINER).parent
    for rule_file in _scrape_config()["rule_files"]:
        inside = str(config_dir / rule_file)
        assert mounted[inside] == SCRAPE_CONFIG.parent / rule_file, rule_file


def test_grafana_loads_the_provisioning_and_the_dashboard() -> None:
    mounted = _mounted(_observe()["grafana"])
    assert mounted["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    # The dashboard provider's path (tests/test_dashboards.py).
    assert mounted["/var/lib/grafana/dashboards"] == DEPLOY / "grafana" / "dashboards"
    assert (DEPLOY / "grafana" / "dashboards" / "llmrelay.json").is_file()


def test_promtool_checks_the_scrape_config() -> None:
    result = subprocess.run(
        [prometheus_tool("promtool"), "check", "config", SCRAPE_CONFIG.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=SCRAPE_CONFIG.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
