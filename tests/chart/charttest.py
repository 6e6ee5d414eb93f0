"""Helpers for the chart tests: a real Helm binary, rendering, strict schema checks."""

from __future__ import annotations

import copy
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "loraserve"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# What chart-testing installs: the chart's own defaults, then each ci/ file.
DEFAULTS = "defaults"
VALUE_SETS: dict[str, list[Path]] = {DEFAULTS: [], **{p.name: [p] for p in CI_VALUES}}
# The pinned KubeRay CRD the rendered RayService must satisfy (version and source: kuberay/README.md).
KUBERAY_CRD = Path(__file__).parent / "kuberay" / "ray.io_rayservices.yaml"
# The Kubernetes version whose schemas the rendered core manifests must satisfy.
KUBERNETES_VERSION = "1.33.0"
RELEASE = "t"


def helm() -> str:
    from tests.conftest import require_tool

    return require_tool("helm")


def helm_run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm(), *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def set_args(values: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """`--set-json` per leaf, so that the values merge into the files' as a values file would (a map
    given whole to --set-json replaces the files' map); JSON keeps the exact types."""
    import json

    args: list[str] = []
    for key, value in (values or {}).items():
        path = prefix + key.replace(".", "\\.")
        if isinstance(value, dict) and value:
            args += set_args(value, path + ".")
        else:
            args += ["--set-json", f"{path}={json.dumps(value)}"]
    return args


@dataclass
class Rendered:
    documents: list[dict[str, Any]]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [d for d in self.documents if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"{len(found)} {kind} named *{name_suffix}: {[d['metadata']['name'] for d in found]}"
        return found[0]

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.documents)

    @property
    def rayservice(self) -> dict[str, Any]:
        return self.one("RayService")

    @property
    def serve_config(self) -> dict[str, Any]:
        config: dict[str, Any] = yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])
        return config

    @property
    def gateway(self) -> dict[str, Any]:
        return self.one("Deployment", "-gateway")

    @property
    def gateway_container(self) -> dict[str, Any]:
        container: dict[str, Any] = self.gateway["spec"]["template"]["spec"]["containers"][0]
        return container

    def ray_pod_templates(self) -> dict[str, dict[str, Any]]:
        cluster = self.rayservice["spec"]["rayClusterConfig"]
        templates = {"head": cluster["headGroupSpec"]["template"]}
        for group in cluster["workerGroupSpecs"]:
            templates[group["groupName"]] = group["template"]
        return templates


def render(*values_files: Path, values: dict[str, Any] | None = None, chart: Path = CHART) -> Rendered:
    files = [a for f in values_files for a in ("-f", str(f))]
    out = helm_run("template", RELEASE, chart, "--namespace", "images", *files, *set_args(values)).stdout
    return Rendered([d for d in yaml.safe_load_all(out) if d])


def render_error(*values_files: Path, values: dict[str, Any] | None = None) -> str:
    files = [a for f in values_files for a in ("-f", str(f))]
    result = helm_run("template", RELEASE, CHART, *files, *set_args(values), check=False)
    assert result.returncode != 0, "helm accepted values that the schema should refuse"
    return result.stderr


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name → plain value (str) or the valueFrom object."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@cache
def rayservice_schema() -> dict[str, Any]:
    """KubeRay's RayService v1 schema with unknown fields made errors (objects that list properties)."""
    crd = yaml.safe_load(KUBERAY_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def validate_rayservice(document: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(rayservice_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def assert_no_unknown_fields(model: BaseModel, data: Any, where: str = "") -> None:
    """Pydantic ignores keys it does not know; Serve would too, silently. Here they are errors."""
    assert isinstance(data, dict), f"{where or '.'}: expected an object"
    fields = {(info.alias or name): name for name, info in type(model).model_fields.items()}
    fields.update({name: name for name in type(model).model_fields})
    unknown = sorted(set(data) - set(fields))
    assert not unknown, f"{where or '.'}: fields Ray Serve does not know: {unknown}"
    for key, value in data.items():
        attr = getattr(model, fields[key])
        if isinstance(attr, BaseModel):
            assert_no_unknown_fields(attr, value, f"{where}.{key}")
        elif isinstance(attr, list) and isinstance(value, list):
            for i, (item, raw) in enumerate(zip(attr, value)):
                if isinstance(item, BaseModel):
                    assert_no_unknown_fields(item, raw, f"{where}.{key}[{i}]")
