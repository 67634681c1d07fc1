"""The Grafana dashboard (deploy/grafana/) against the README's metric tables.

Every query selects only metrics the README documents, so a renamed metric breaks
this test instead of an operator's panel; the dashboard shows what the issue asks
for (queues, TTFT p50/p99, failovers, errors by code, circuits, connection reuse,
rate budget); and Grafana's provisioning files load it. That its queries return
series on a real Prometheus is tests/test_prometheus_live.py.
"""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from tests._deploy import (
    DASHBOARD,
    DEPLOY,
    as_sent,
    dashboard,
    dashboard_queries,
    is_documented,
    metric_names,
    panels,
    readme_metrics,
)

QUERIES = dashboard_queries(dashboard())
PROVISIONING = DEPLOY / "grafana" / "provisioning"


def test_the_readme_tables_are_read() -> None:
    table = readme_metrics()
    assert table["llmrelay_ttft_seconds"] == "histogram"
    assert table["llmrelay_queue_depth"] == "gauge"
    assert table["llmrelay_gateway_requests_total"] == "counter"
    assert len(table) >= 35, sorted(table)
    assert is_documented("llmrelay_ttft_seconds_bucket", table)
    assert not is_documented("llmrelay_queue_depth_bucket", table)


def test_metric_names_of_an_expression() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, pool) (rate(llmrelay_ttft_seconds_bucket"
        '{pool=~"$pool", model!="x{y}"}[$__rate_interval]))) / on (pool) group_left '
        "llmrelay_slots offset 5m > bool 1e3 or up"
    )
    assert metric_names(expr) == {"llmrelay_ttft_seconds_bucket", "llmrelay_slots", "up"}


@pytest.mark.parametrize("query", QUERIES, ids=[q.where for q in QUERIES])
def test_every_query_uses_only_metrics_of_the_readme(query: tuple[str, str]) -> None:
    where, expr = query
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    table = readme_metrics()
    missing = sorted(n for n in names if not is_documented(n, table))
    assert not missing, f"{where}: {missing} are not in the README's metric tables"


def test_the_dashboard_shows_what_operators_asked_for() -> None:
    used = {name for q in QUERIES for name in metric_names(q.expr)}
    wanted = {
        "llmrelay_queue_depth",  # queue depth per route
        "llmrelay_queue_oldest_job_age_seconds",  # oldest age per route
        "llmrelay_ttft_seconds_bucket",  # TTFT quantiles
        "llmrelay_failovers_total",
        "llmrelay_errors_total",  # by code
        "llmrelay_circuit_state",  # per model
        "llmrelay_upstream_connections_opened_total",  # connection reuse...
        "llmrelay_upstream_requests_total",  # ... and requests/min against rpm
        "llmrelay_tokens_total",  # tokens/min against tpm
        "llmrelay_rate_limit_waits_total",
    }
    assert wanted <= used, sorted(wanted - used)
    exprs = [q.expr for q in QUERIES]
    ttft = [e for e in exprs if "llmrelay_ttft_seconds_bucket" in e]
    assert any("histogram_quantile(0.5," in e for e in ttft), "TTFT p50"
    assert any("histogram_quantile(0.99," in e for e in ttft), "TTFT p99"
    assert any("by (code)" in e for e in exprs if "llmrelay_errors_total" in e)
    assert any("model" in e for e in exprs if "llmrelay_circuit_state" in e)
    assert any(
        'kind="route"' in e and "by (queue)" in e
        for e in exprs
        if "llmrelay_queue_oldest_job_age_seconds" in e
    )


def test_panels_are_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] == "llmrelay" and dash["title"]
    every = list(panels(dash))
    ids = Counter(p["id"] for p in every)
    assert all(n == 1 for n in ids.values()), ids
    for panel in every:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert names == {"datasource", "route", "pool"}
    for query in QUERIES:  # every variable a query uses is one Grafana knows
        as_sent(query.expr)


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"  # the compose service (test_observe.py)
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "llmrelay.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    # The folder that docker-compose.yml mounts deploy/grafana/dashboards on.
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARD.parent == DEPLOY / "grafana" / "dashboards"


def test_a_spend_panel_shows_cost_per_route() -> None:
    """Spend per route from ``llmrelay_cost_usd_total`` (cost accounting, issue 15 part 2)."""
    assert readme_metrics()["llmrelay_cost_usd_total"] == "counter"
    (spend,) = [p for p in panels(dashboard()) if p["title"].startswith("Spend per route")]
    (target,) = spend["targets"]
    assert "sum by (route) (rate(llmrelay_cost_usd_total" in target["expr"]
    assert spend["fieldConfig"]["defaults"]["unit"] == "currencyUSD"
