"""Every metric the autoscalers, the Grafana dashboard and docs/operations.md refer to is one that
shared/metrics.py exports, used the way its type allows (rate() on counters and histogram parts,
histogram_quantile on buckets), with labels it has."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from shared.metrics import AUTOSCALING_METRICS
from tests.k8s.manifests import K8S, REPO
from tests.k8s.promql import (TARGET_LABELS, families, promql_grouping_labels, promql_metric_names,
                              promql_rated_metrics, promql_selector_labels, series_catalog)

DASHBOARD = K8S / "grafana" / "acestep-dashboard.json"
ADAPTER_VALUES = K8S / "components" / "hpa" / "prometheus-adapter-values.yaml"
OPERATIONS_DOC = REPO / "docs" / "operations.md"


def _manifest_docs(kind: str) -> list[dict]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind") == kind]
    return docs


def _keda_queries() -> list[str]:
    return [t["metadata"]["query"] for so in _manifest_docs("ScaledObject")
            for t in so.get("spec", {}).get("triggers", []) if t["type"] == "prometheus"]


def _hpa_metric_names() -> set[str]:
    return {m["pods"]["metric"]["name"] for h in _manifest_docs("HorizontalPodAutoscaler")
            for m in h["spec"]["metrics"] if m["type"] == "Pods"}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _check_expr(expr: str) -> list[str]:
    """Problems with one PromQL expression (empty when it only uses what shared/metrics.py exports)."""
    catalog = series_catalog()
    problems = [f"{n} is not exported by shared/metrics.py" for n in promql_metric_names(expr) if n not in catalog]
    all_labels = {label for fam in families() for label in fam.labels} | TARGET_LABELS
    for name, labels in promql_selector_labels(expr):
        if name in catalog:
            unknown = labels - set(catalog[name].labels) - TARGET_LABELS
            problems += [f"{name} has no label {label!r}" for label in sorted(unknown)]
    problems += [f"grouping by unknown label {label!r}" for label in promql_grouping_labels(expr) - all_labels]
    for name in promql_rated_metrics(expr):
        if name in catalog and catalog[name].type == "gauge":
            problems.append(f"rate() over the gauge {name}")
    if "histogram_quantile" in expr and not re.search(r"_bucket\{", expr):
        problems.append("histogram_quantile without a _bucket series")
    return problems


def test_check_expr_catches_mistakes() -> None:
    assert _check_expr('sum(rate(acestep_gateway_songs_total{outcome="ok"}[5m]))') == []
    assert _check_expr("sum(acestep_dit_queue_depthh)")
    assert _check_expr("sum(acestep_gateway_songs)")  # a Counter is exported as _total
    assert _check_expr('sum(acestep_dit_queue_depth{stage="lm"})')
    assert _check_expr("rate(acestep_dit_queue_depth[5m])")
    assert _check_expr("sum by (color) (acestep_lm_queue_depth)")


def test_keda_queries_use_exported_series() -> None:
    queries = _keda_queries()
    assert queries, "no KEDA prometheus triggers found under k8s/"
    for query in queries:
        assert not _check_expr(query), (query, _check_expr(query))


def test_hpa_metrics_are_exported_and_served_by_the_adapter() -> None:
    names = _hpa_metric_names()
    assert names, "no HPA Pods metrics found under k8s/"
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: rule["seriesQuery"] for rule in rules}
    catalog = series_catalog()
    for name in names:
        assert name in catalog and catalog[name].type == "gauge", f"{name}: not an exported gauge"
        assert name in served, f"prometheus-adapter has no rule exposing {name}"
        assert promql_metric_names(served[name]) == {name}


def test_autoscaling_metrics_drive_both_autoscalers() -> None:
    keda = set().union(*(promql_metric_names(q) for q in _keda_queries()))
    assert keda == set(AUTOSCALING_METRICS), "KEDA must scale on exactly shared.metrics.AUTOSCALING_METRICS"
    assert _hpa_metric_names() == set(AUTOSCALING_METRICS), "the HPA alternative must use the same metrics"


def test_dashboard_queries_use_exported_series() -> None:
    exprs = _dashboard_exprs()
    problems = [f"{expr}: {p}" for expr in exprs for p in _check_expr(expr)]
    assert not problems, "\n".join(problems)
    for expr in exprs:
        for name, labels in promql_selector_labels(expr):
            assert "namespace" in labels, f"{name} in {expr!r} is not filtered by $namespace"


def test_dashboard_shows_the_key_figures() -> None:
    used = set().union(*(promql_metric_names(e) for e in _dashboard_exprs()))
    wanted = {
        "acestep_dit_queue_depth", "acestep_lm_queue_depth", "acestep_gateway_songs_total",
        "acestep_gateway_stage_seconds_bucket", "acestep_dit_batch_size_bucket", "acestep_lm_running_sequences",
        "acestep_lm_waiting_sequences", "acestep_lm_generated_tokens_total",
        "acestep_lm_time_to_first_token_seconds_bucket", "acestep_rpc_requests_total",
        "acestep_gateway_retries_total", "acestep_gateway_rejected_total", "acestep_lm_rejected_total",
        "acestep_dit_rejected_total",
    }
    assert wanted <= used, f"dashboard lacks {sorted(wanted - used)}"
    errors = [e for e in _dashboard_exprs() if "acestep_rpc_requests_total" in e]
    assert any("code" in promql_grouping_labels(e) for e in errors), "errors are not broken down by code"


def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "namespace" in variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{panel['title']}: no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_dashboard_configmap_carries_the_file(render_variant) -> None:
    rendered = render_variant("gpu-production")
    data = rendered.get("ConfigMap", "acestep-grafana-dashboard")
    assert data["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(data["data"]["acestep-dashboard.json"]) == json.loads(DASHBOARD.read_text())


def test_operations_doc_lists_exactly_the_exported_metrics() -> None:
    text = OPERATIONS_DOC.read_text()
    for family in families():
        assert f"`{family.primary}`" in text, f"docs/operations.md does not describe {family.primary}"
    catalog = series_catalog()
    known = set(catalog) | {fam.name for fam in families()}
    mentioned = set(re.findall(r"\bacestep_[a-z0-9_]+\b", text))
    assert mentioned <= known, f"docs/operations.md names unknown metrics {sorted(mentioned - known)}"


@pytest.mark.parametrize("family", families(), ids=lambda f: f.name)
def test_operations_doc_gives_type_and_labels(family) -> None:
    rows = [line for line in OPERATIONS_DOC.read_text().splitlines() if line.startswith(f"| `{family.primary}`")]
    assert len(rows) == 1, f"expected one table row for {family.primary}"
    assert family.type in rows[0]
    for label in family.labels:
        assert f"`{label}`" in rows[0], f"{family.primary}: label {label} not documented"
