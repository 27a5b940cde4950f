"""Small JSON schemas for the custom resources the manifests use (KEDA ScaledObject, Prometheus
Operator ServiceMonitor). They cover the fields these manifests set, with the CRDs' types and
required fields, and reject unknown fields so a typo cannot pass unnoticed. Written from the
CRD documentation (keda.sh/v1alpha1, monitoring.coreos.com/v1); extend them when a manifest
uses a new field."""

from __future__ import annotations

_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}},
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": _STR, "namespace": _STR, "labels": _STR_MAP, "annotations": _STR_MAP},
}
_SCALING_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": _INT,
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {"type": "array", "items": {
            "type": "object", "required": ["type", "value", "periodSeconds"], "additionalProperties": False,
            "properties": {"type": {"enum": ["Pods", "Percent"]}, "value": _INT, "periodSeconds": _INT}}},
    },
}
_PROMETHEUS_TRIGGER_METADATA = {
    "type": "object",
    "required": ["serverAddress", "query", "threshold"],
    "additionalProperties": False,
    # KEDA reads trigger metadata as strings: a bare number for threshold would be rejected.
    "properties": {key: _STR for key in (
        "serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
        "ignoreNullValues", "unsafeSsl", "queryParameters", "authModes")},
}

SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": _STR, "kind": _STR, "apiVersion": _STR,
                                                  "envSourceContainerName": _STR}},
                "minReplicaCount": _INT, "maxReplicaCount": _INT, "idleReplicaCount": _INT,
                "pollingInterval": _INT, "cooldownPeriod": _INT, "initialCooldownPeriod": _INT,
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"],
                             "additionalProperties": False,
                             "properties": {"failureThreshold": _INT, "replicas": _INT}},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False, "properties": {
                        "name": _STR,
                        "behavior": {"type": "object", "additionalProperties": False,
                                     "properties": {"scaleUp": _SCALING_RULES, "scaleDown": _SCALING_RULES}}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {"type": _STR, "name": _STR, "metricType": {"enum": ["AverageValue", "Value",
                                                                                         "Utilization"]},
                                   "useCachedMetrics": {"type": "boolean"},
                                   "authenticationRef": {"type": "object"},
                                   "metadata": _STR_MAP},
                    "if": {"properties": {"type": {"const": "prometheus"}}},
                    "then": {"properties": {"metadata": _PROMETHEUS_TRIGGER_METADATA}}}},
            },
        },
    },
}

_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h))+)$"}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": _STR,
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"port": _STR, "targetPort": {"type": ["string", "integer"]}, "path": _STR,
                                   "scheme": {"enum": ["http", "https"]}, "interval": _DURATION,
                                   "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
                                   "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}}}},
            },
        },
    },
}

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
}
