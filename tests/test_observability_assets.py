"""The Grafana dashboard, the Prometheus scrape config and alert rules, and docs/metrics.md.

With Debian's ``promtool`` (``apt-get install prometheus``) every query, rule and the config are
checked by Prometheus itself, and the alert rules' unit tests run; without it those tests skip and
the structural checks here still hold: balanced queries that name only exported metrics and labels.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hybridserve.server.observability.families import FAMILIES, RAY_PREFIX, Family

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "hybridserve.json"
PROMETHEUS = ROOT / "deploy" / "prometheus"
DOCS = ROOT / "docs" / "metrics.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is absent (apt-get install prometheus)")

METRIC_NAME = re.compile(r"\b(?:\$\{prefix\}|\(ray_\)\?|ray_)?(hybridserve_[a-z_]+)")
GROUPING = re.compile(r"\b(?:by|on)\s*\(([^)]*)\)")
# Labels every series has besides its family's: histogram buckets, and what Ray's export adds.
COMMON_LABELS = {"le", "application", "deployment", "replica", "job", "instance"}


def sample_names(family: Family) -> set[str]:
    if family.kind == "histogram":
        return {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return {family.exported}


SAMPLES = {name: family for family in FAMILIES for name in sample_names(family)}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) of every panel target."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]


def concrete(query: str, prefix: str) -> str:
    """A dashboard query with Grafana's variables filled in, as Prometheus would receive it."""
    return (query.replace("${prefix}", prefix).replace("$__rate_interval", "5m")
            .replace('model=~"$model"', 'model=~".*"'))


def check_structure(query: str) -> list[str]:
    """What is wrong with a PromQL query, as far as a structural look can tell."""
    problems = []
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    for opening, closing in ("()", "{}", "[]"):
        depth = 0
        for char in outside_strings:
            depth += (char == opening) - (char == closing)
            if depth < 0:
                break
        if depth != 0:
            problems.append(f"unbalanced {opening}{closing}")
    if outside_strings.count('"') % 2:
        problems.append("unclosed string")
    names = METRIC_NAME.findall(query)
    if not names:
        problems.append("names no hybridserve metric")
    unknown = [name for name in names if name not in SAMPLES]
    if unknown:
        problems.append(f"names metrics that server/observability/families.py does not export: {unknown}")
    labels = {label for name in names if name in SAMPLES for label in SAMPLES[name].labels} | COMMON_LABELS
    for grouping in GROUPING.findall(query):
        strangers = {label.strip() for label in grouping.split(",") if label.strip()} - labels
        if strangers:
            problems.append(f"groups by labels its metrics do not have: {sorted(strangers)}")
    return problems


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ dashboard


def test_dashboard_shows_what_operators_asked_for():
    board = dashboard()
    titles = " | ".join(panel["title"].lower() for panel in board["panels"])
    for wanted in ("request rate", "error rate", "p50 / p95 / p99", "queue wait vs compute",
                   "batch size distribution", "replicas", "gpu memory"):
        assert wanted in titles, f"no panel about {wanted!r}"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert set(variables) == {"datasource", "prefix", "model"} and variables["prefix"]["query"] == RAY_PREFIX
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        place = panel["gridPos"]
        assert place["x"] + place["w"] <= 24 and place["h"] > 0, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]


@pytest.mark.parametrize("title, query", dashboard_queries())
def test_dashboard_queries_name_exported_metrics_and_labels(title, query):
    assert not check_structure(query), f"{title}: {check_structure(query)}"


@needs_promtool
def test_dashboard_queries_parse_in_prometheus(tmp_path):
    """Every query, with the variables filled in for both exports, as recording rules promtool checks."""
    rules = [{"record": f"hybridserve:dashboard_query_{index}", "expr": concrete(query, prefix)}
             for prefix in (RAY_PREFIX, "") for index, (_, query) in enumerate(dashboard_queries())]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool("check", "rules", "queries.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# ------------------------------------------------------------------ Prometheus


def test_alerts_cover_errors_latency_and_readiness():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == {"HybridserveHighErrorRate", "HybridserveLatencyP99OverObjective", "HybridserveModelNotReady"}
    for name, rule in rules.items():
        assert not check_structure(rule["expr"]), f"{name}: {check_structure(rule['expr'])}"
        assert rule["for"] and rule["labels"]["severity"] in ("warning", "critical")
        assert "{{ $labels.model }}" in rule["annotations"]["summary"]
        assert "(ray_)?" in rule["expr"], f"{name} must match both exports"
        assert name in DOCS.read_text(), f"docs/metrics.md does not explain {name}"


@needs_promtool
def test_alert_rules_pass_promtool_and_fire_in_their_unit_tests():
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_scrape_config_targets_ray_nodes_kuberay_and_in_process():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["hybridserve-kuberay"]["dns_sd_configs"][0]["port"] == 8080  # KubeRay's metrics port
    discovery = jobs["hybridserve-ray-nodes"]["file_sd_configs"][0]["files"]
    assert discovery == ["/tmp/ray/prom_metrics_service_discovery.json"]  # written by Ray's head node
    assert jobs["hybridserve-in-process"]["metrics_path"] == "/metrics"


@needs_promtool
def test_scrape_config_passes_promtool():
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


# ------------------------------------------------------------------ docs


def test_docs_list_every_metric_with_its_labels():
    rows = {line.split("|")[1].strip().strip("`"): line for line in DOCS.read_text().splitlines()
            if line.startswith("| `")}
    for family in FAMILIES:
        assert family.exported in rows, f"docs/metrics.md has no row for {family.exported}"
        for label in family.labels:
            assert f"`{label}`" in rows[family.exported], f"{family.exported}: label {label} undocumented"
