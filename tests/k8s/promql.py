"""PromQL references to our metrics, and the catalog of series ``shared/metrics.py`` exports.

prometheus_client exports a Counter ``x_total`` (plus ``x_created``), a Histogram
``x_bucket`` / ``x_sum`` / ``x_count`` (plus ``x_created``) and a Gauge under its own name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prometheus_client.metrics import MetricWrapperBase

from shared import metrics

_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
             "histogram": ("_bucket", "_sum", "_count", "_created")}
# Labels Prometheus adds at scrape time (ServiceMonitor targets) plus the histogram bucket label.
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "endpoint", "container", "le"}


@dataclass(frozen=True)
class Family:
    """One metric as defined in shared/metrics.py."""

    name: str          # family name (a Counter's without ``_total``)
    type: str          # counter | gauge | histogram
    labels: tuple[str, ...]
    documentation: str

    @property
    def series(self) -> tuple[str, ...]:
        return tuple(self.name + s for s in _SUFFIXES[self.type])

    @property
    def primary(self) -> str:
        """The name people query: ``x_total`` for counters, the family name otherwise."""
        return self.name + "_total" if self.type == "counter" else self.name


def families() -> list[Family]:
    out = []
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            family = value.describe()[0]
            out.append(Family(family.name, family.type, tuple(value._labelnames), family.documentation))
    return out


def series_catalog() -> dict[str, Family]:
    """Every exported series name -> its family."""
    return {series: fam for fam in families() for series in fam.series}


# Every identifier starting with "acestep_" is one of our series (no label value in these queries
# starts with it); label matchers are read from the braces that follow a series name.
_PROMQL_NAME = re.compile(r"\b(acestep_[a-zA-Z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(acestep_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_RATE = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*(acestep_[a-zA-Z0-9_]+)")


def promql_metric_names(expr: str) -> set[str]:
    return set(_PROMQL_NAME.findall(expr))


def promql_selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names matched in its braces) for every ``metric{...}`` selector."""
    return [(name, set(m.group(1) for m in _MATCHER.finditer(body))) for name, body in _SELECTOR.findall(expr)]


def promql_grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in _BY.findall(expr) for label in group.split(",") if label.strip()}


def promql_rated_metrics(expr: str) -> set[str]:
    return set(_RATE.findall(expr))
