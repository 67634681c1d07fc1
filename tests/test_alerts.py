"""The Prometheus alert rules (deploy/prometheus/rules.yml), checked by Prometheus' own
tool: ``promtool check rules`` and the rule unit tests of
deploy/prometheus/rules_test.yml (``promtool test rules``), which feed synthetic
series and assert which alerts fire when. promtool comes from Debian's
``prometheus`` package; without it those two tests are skipped, with the reason.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests._deploy import (
    RULES,
    RULES_TEST,
    is_documented,
    metric_names,
    prometheus_tool,
    readme_metrics,
)

# The alerts issue 15 asks for, by what they watch.
ASKED_FOR = {
    "LlmrelayQueueAgeOverSLO",  # queue age over SLO
    "LlmrelayDLQGrowing",  # DLQ growing
    "LlmrelayCircuitOpen",  # circuits open
    "LlmrelayNoLiveWorkers",  # no live workers for a pool
    "LlmrelayUpstreamErrorRatio",  # error ratio
}


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _unit_tests() -> list[dict[str, Any]]:
    tests: list[dict[str, Any]] = yaml.safe_load(RULES_TEST.read_text())["tests"]
    return tests


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prometheus_tool("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=RULES.parent,
    )


def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout, result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", RULES_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_the_alerts_asked_for_exist() -> None:
    names = [rule["alert"] for rule in _rules()]
    assert len(names) == len(set(names)), names
    assert set(names) >= ASKED_FOR, sorted(ASKED_FOR - set(names))


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    for rule in _rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name


def test_rules_use_only_metrics_of_the_readme() -> None:
    table = readme_metrics()
    for rule in _rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        missing = sorted(n for n in names if not is_documented(n, table))
        assert not missing, f"{rule['alert']}: {missing} are not in the README's tables"


def test_the_unit_tests_fire_every_alert_and_check_a_quiet_case() -> None:
    """Each alert is seen firing on some synthetic series, and each is asserted not to
    fire at some point (before its ``for``, or on a healthy series)."""
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in _unit_tests():
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    every = {rule["alert"] for rule in _rules()}
    assert fired == every, sorted(every - fired)
    assert quiet == every, sorted(every - quiet)


@pytest.mark.parametrize("alert", ["LlmrelayDLQGrowing", "LlmrelayQueueAgeOverSLO"])
def test_dlq_and_queue_age_fire_for_the_right_queue_only(alert: str) -> None:
    """The unit tests feed a healthy series beside the bad one: only the bad one fires."""
    for test in _unit_tests():
        cases = [c for c in test.get("alert_rule_test", []) if c["alertname"] == alert]
        firing = [a for c in cases for a in c.get("exp_alerts", [])]
        if firing:
            series = {s["series"] for s in test["input_series"]}
            assert len(series) >= 2, f"{alert}: only one input series"
            return
    pytest.fail(f"no unit test fires {alert}")
