"""What the tests of deploy/ share: the README's metric tables, the metric names of a
PromQL expression, the Grafana dashboard's queries, and the Prometheus tools.

The tools come from Debian's ``prometheus`` package (2.42: ``prometheus`` and
``promtool``); a test that needs one is skipped, with the way to install it, when
it is not on the PATH.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "llmrelay.json"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"

_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def prometheus_tool(name: str) -> str:
    """The path of ``promtool`` or ``prometheus``; skips the test when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: apt-get install prometheus")
    return path


# --- the README's metric tables -------------------------------------------------------


def readme_metrics() -> dict[str, str]:
    """metric -> type, from every table of the README's "Observability" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Observability\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(llmrelay_\w+)` \| (\w+) \|", section, re.M)
    return dict(rows)


def is_documented(name: str, table: dict[str, str]) -> bool:
    """A metric of the table, or a series of one of its histograms (``_bucket``...)."""
    if name in table:
        return True
    return any(
        name.endswith(suffix) and table.get(name.removesuffix(suffix)) == "histogram"
        for suffix in _HISTOGRAM_SERIES
    )


# --- PromQL ---------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# An identifier that is not a function call, a number's tail or a Grafana variable.
_IDENT = re.compile(r"(?<![\w$.])[a-zA-Z_:][a-zA-Z0-9_:]*(?!\s*\()(?![\w:])")
_KEYWORDS = {"bool", "and", "or", "unless", "offset", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (labels, functions, strings,
    ranges and grouping lists left out)."""
    bare = _STRING.sub('""', expr)
    for pattern in (_MATCHERS, _RANGE, _LABEL_LIST):
        bare = pattern.sub(" ", bare)
    return {m for m in _IDENT.findall(bare) if m.lower() not in _KEYWORDS}


# --- the dashboard --------------------------------------------------------------------


class Query(NamedTuple):
    where: str  # the panel's title, or "variable <name>"
    expr: str


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*\w+\)$")


def dashboard_queries(dash: dict[str, Any]) -> list[Query]:
    """The PromQL of every panel target, and the series selector of every query variable
    (``label_values(selector, label)``)."""
    out = [
        Query(panel["title"], target["expr"])
        for panel in panels(dash)
        for target in panel.get("targets", [])
    ]
    for var in dash.get("templating", {}).get("list", []):
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query.strip())
        assert match, f"variable {var['name']}: {query!r} is not label_values(selector, label)"
        out.append(Query(f"variable {var['name']}", match.group(1)))
    return out


# What Grafana puts in a query before sending it: the variables at their "All" value.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "route": ".*", "pool": ".*"}


def as_sent(expr: str, values: dict[str, str] = GRAFANA_VARIABLES) -> str:
    """``expr`` with Grafana's ``$var`` / ``${var}`` replaced as Grafana would."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"unknown Grafana variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)
