"""The chart's view of who reads which setting agrees with what core.config declares.

The chart routes secrets by pod in templates/_helpers.tpl and owns some settings itself; these tests
fail when a declaration and the chart disagree (a secret reaching a pod whose process never reads it,
or missing from one that does; a setting the template sets that sync_chart's CHART_SET does not list).
"""

from __future__ import annotations

import re
from typing import Any

from core.config import ENV_PREFIX, Reader, Settings, setting_infos
from tests.chart.charttest import CHART, CI_VALUES, env_of, render
from tests.chart.sync_chart import CHART_SET

CPU_DEV, EXTERNAL_TLS, GPU_PROD = CI_VALUES
SECRETS = {name for name, info in setting_infos().items() if info.secret}


def _secret_settings(container: dict[str, Any]) -> set[str]:
    return {name.removeprefix(ENV_PREFIX).lower() for name in env_of(container)} & SECRETS


def _read_by(*readers: Reader) -> set[str]:
    return {name for name in SECRETS if setting_infos()[name].readers & set(readers)}


def test_each_pod_gets_exactly_the_secrets_its_process_reads() -> None:
    """Every secret given by name: the gateway pod (where `loraserve keys` runs too) gets those the gateway
    or the admin commands read, each Ray pod those a worker reads."""
    by_name = {name: {"existingSecret": "s", "key": name} for name in sorted(SECRETS)}
    r = render(GPU_PROD, values={"secrets": {"settings": by_name, "s3Presign": {"existingSecret": "p"}}})
    assert _secret_settings(r.gateway_container) == _read_by(Reader.GATEWAY, Reader.ADMIN)
    for group, template in r.ray_pod_templates().items():
        assert _secret_settings(template["spec"]["containers"][0]) == _read_by(Reader.WORKER), group


def test_the_gateway_env_names_only_declared_settings() -> None:
    names = set(setting_infos())
    r = render(EXTERNAL_TLS)
    env = {name.removeprefix(ENV_PREFIX).lower() for name in env_of(r.gateway_container) if name.startswith(ENV_PREFIX)}
    assert env <= names, sorted(env - names)


def test_chart_set_is_what_the_template_manages() -> None:
    """sync_chart.CHART_SET (refused in `settings` by the values schema) against the `$managed` settings
    of _helpers.tpl's loraserve.settings, which the chart sets from its own values (the dev MinIO's
    endpoint aside: with external S3 the operator sets it)."""
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    block = text.split('{{- define "loraserve.settings" -}}', 1)[1].split("{{- toYaml (merge $managed", 1)[0]
    block = re.sub(r"\{\{- if \.Values\.devMinio\.enabled -\}\}.*?\{\{- end -\}\}", "", block, flags=re.DOTALL)
    managed = set(re.findall(r'^\s+"(\w+)" ', block, flags=re.MULTILINE))
    managed |= set(re.findall(r'set \$managed "(\w+)"', block))
    assert managed == CHART_SET, (sorted(managed - CHART_SET), sorted(CHART_SET - managed))
    assert managed <= {f for f in Settings.__dataclass_fields__}
