"""values.schema.json refuses what cannot work, and says which value and why (Helm prints the path)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.chart.charttest import CHART, CI_VALUES, render, render_error

CPU_DEV, EXTERNAL_TLS, GPU_PROD = CI_VALUES


def test_the_schema_is_draft_07_and_closed_everywhere() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def closed(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and where.count("/if") == 0 and "/then" not in where:
                assert node.get("additionalProperties") is False, f"{where} accepts unknown keys"
            for key, value in node.items():
                closed(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                closed(value, f"{where}/{i}")

    closed(schema, "")


def test_two_gateways_on_sqlite_are_refused() -> None:
    error = render_error(CPU_DEV, values={"gateway": {"replicas": 2}})
    assert "at '/gateway/replicas': maximum: got 2, want 1" in error
    assert "at '/store/type': value must be 'postgresql'" in error


def test_gpu_replicas_without_gpu_limits_are_refused() -> None:
    resources = {"requests": {"cpu": "8"}, "limits": {"memory": "48Gi", "nvidia.com/gpu": None}}
    error = render_error(GPU_PROD, values={"workers": {"group": {"resources": resources}}})
    assert "at '/workers/group/resources/limits': missing property 'nvidia.com/gpu'" in error


def test_missing_secrets_are_refused() -> None:
    error = render_error(GPU_PROD, values={"secrets": {"s3": {"existingSecret": ""}}})
    assert "at '/secrets/s3/existingSecret': minLength: got 0, want 1" in error
    error = render_error(GPU_PROD, values={"secrets": {"postgresql": {"existingSecret": ""}}})
    assert "at '/secrets/postgresql/existingSecret': minLength: got 0, want 1" in error
    # External S3 needs its endpoint too.
    error = render_error(GPU_PROD, values={"settings": {"s3_endpoint": ""}})
    assert "at '/settings/s3_endpoint': minLength: got 0, want 1" in error


def test_unknown_keys_and_settings_the_chart_owns_are_refused() -> None:
    error = render_error(GPU_PROD, values={"gateway": {"replica": 2}, "settings": {"grpc_port": 1, "max_replcas": 2}})
    assert "at '/gateway': additional properties 'replica' not allowed" in error
    assert "at '/settings': additional properties" in error and "'grpc_port'" in error and "'max_replcas'" in error


def test_wrong_types_and_the_dev_postgresql_without_its_store_are_refused() -> None:
    error = render_error(GPU_PROD, values={"settings": {"max_replicas": "four"}})
    assert "at '/settings/max_replicas': got string, want integer" in error
    error = render_error(CPU_DEV, values={"devPostgresql": {"enabled": True}})
    assert "at '/store/type': value must be 'postgresql'" in error


def test_the_dev_postgresql_needs_no_secret() -> None:
    r = render(CPU_DEV, values={"devPostgresql": {"enabled": True}, "store": {"type": "postgresql"}, "gateway": {"replicas": 2}})
    (container,) = r.gateway["spec"]["template"]["spec"]["containers"]
    (store_url,) = [e for e in container["env"] if e["name"] == "LORASERVE_STORE_URL"]
    assert store_url["valueFrom"]["secretKeyRef"]["name"] == r.one("Secret", "-postgresql")["metadata"]["name"]


@pytest.mark.parametrize(
    "values",
    [{"image": {"variant": "rocm"}}, {"store": {"type": "mysql"}}, {"gateway": {"ingress": {"servicePort": "https"}}}],
    ids=["variant", "store", "ingress-port"],
)
def test_enums_are_refused(values: dict[str, Any]) -> None:
    assert "value must be one of" in render_error(GPU_PROD, values=values)


def test_secret_settings_need_a_secret_and_a_key_and_a_setting_name() -> None:
    error = render_error(GPU_PROD, values={"secrets": {"settings": {"Signing-Key": {"existingSecret": "hooks"}}}})
    assert "'Signing-Key' does not match pattern" in error
    assert "at '/secrets/settings/Signing-Key': missing property 'key'" in error


def test_ray_without_auth_needs_to_be_asked_for_by_name() -> None:
    error = render_error(GPU_PROD, values={"workers": {"rayAuthMode": "disabled"}})
    assert "at '/workers/allowRayWithoutAuth': value must be true" in error
    r = render(GPU_PROD, values={"workers": {"rayAuthMode": "disabled", "allowRayWithoutAuth": True}})
    assert r.rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}


def test_the_dev_minio_refuses_the_external_s3_it_would_hide() -> None:
    """On by default: a production values file that forgets to turn it off is told so, not served by it."""
    error = render_error(values={"settings": {"s3_endpoint": "s3.example.com"}, "secrets": {"s3": {"existingSecret": "s3"}}})
    assert "at '/settings/s3_endpoint': maxLength: got 14, want 0" in error
    assert "at '/secrets/s3/existingSecret': maxLength: got 2, want 0" in error


def test_the_operator_namespace_is_a_namespace_name() -> None:
    error = render_error(GPU_PROD, values={"networkPolicy": {"kuberayOperator": {"namespace": "Kube Ray"}}})
    assert "at '/networkPolicy/kuberayOperator/namespace'" in error
    error = render_error(GPU_PROD, values={"networkPolicy": {"kuberayOperator": {"namespaceSelector": {}}}})
    assert "additional properties 'namespaceSelector' not allowed" in error


def test_s3_addresses_are_refused_in_the_form_the_gateway_refuses() -> None:
    """storage.s3 refuses these at start: the pod would crash-loop; helm says which value instead."""
    error = render_error(GPU_PROD, values={"settings": {"s3_endpoint": "https://s3.example.com"}})
    assert "at '/settings/s3_endpoint'" in error and "does not match pattern" in error
    error = render_error(GPU_PROD, values={"settings": {"s3_presign_endpoint": "files.example.com"}})
    assert "at '/settings/s3_presign_endpoint'" in error and "does not match pattern" in error
