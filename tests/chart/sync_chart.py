"""Brings the chart's copies of Python-side facts up to date: `python -m tests.chart.sync_chart`.

- helm/loraserve/files/serve-settings.json: serving.serve_config.chart_settings(), which the
  template renders serveConfigV2 with;
- values.schema.json's `settings` properties: every setting the chart does not set itself and
  that is not a secret, typed like its default, with its description (core.config); extra keywords
  already there, e.g. `minimum`, stay.

tests/chart fails with this command in its message when either is stale.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from core.config import Reader, Settings, setting_infos
from serving import serve_config
from tests.chart.charttest import CHART

# Settings the chart sets from its own values (refused in `settings`: the `$managed` of _helpers.tpl's
# loraserve.settings), and those only the process that starts Ray reads, which means nothing in a cluster
# (`loraserve gateway` starts no Ray; KubeRay starts the Ray nodes).
CHART_SET = frozenset(
    {
        "data_dir",
        "grpc_host",
        "grpc_port",
        "http_host",
        "http_port",
        "serve_grpc_host",
        "serve_grpc_port",
        "serve_http_port",
        "worker_metrics_port",
        "object_store",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
    }
)
UNUSED_IN_CLUSTER = frozenset(name for name, info in setting_infos().items() if info.readers == {Reader.RAY})
SCHEMA = CHART / "values.schema.json"
SERVE_SETTINGS = CHART / "files" / "serve-settings.json"
COMMAND = "python -m tests.chart.sync_chart"
JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def settings_schema(current: dict[str, Any]) -> dict[str, Any]:
    excluded = CHART_SET | UNUSED_IN_CLUSTER | serve_config.SECRET_SETTINGS
    infos = setting_infos()
    properties = {}
    for f in dataclasses.fields(Settings):
        if f.name not in excluded:
            typed = {"type": JSON_TYPES[type(f.default)], "description": infos[f.name].description}
            properties[f.name] = {**current.get(f.name, {}), **typed}
    return properties


def serve_settings_text() -> str:
    return json.dumps(serve_config.chart_settings(), indent=2) + "\n"


def main() -> None:
    schema = json.loads(SCHEMA.read_text())
    settings = schema["properties"]["settings"]
    settings["properties"] = settings_schema(settings["properties"])
    SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")
    SERVE_SETTINGS.write_text(serve_settings_text())


if __name__ == "__main__":
    main()
