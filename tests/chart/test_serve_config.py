"""serving.serve_config: the Serve config that the embedded mode and the chart share."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from ray.serve.schema import ServeDeploySchema

from loraserve.cli import main
from core.config import ENV_PREFIX, Settings
from serving import serve_config
from tests.chart.charttest import assert_no_unknown_fields

# Non-default values for settings of every kind (replica, deployment, gateway-only, secret).
CHANGED = Settings(
    data_dir=Path("/data"),
    store_url="postgresql://u:p@db/loraserve",
    grpc_host="0.0.0.0",
    serve_app_name="images",
    serve_grpc_port=9100,
    replica_num_gpus=1.0,
    replica_num_cpus=8.0,
    min_replicas=1,
    max_replicas=4,
    initial_replicas=2,
    max_pipelines_per_replica=4,
    worker_metrics_port=9500,
    object_store="s3",
    s3_endpoint="s3.internal:9000",
    s3_access_key="AK",
    s3_secret_key="SK",
    s3_presign_access_key="RO",
    s3_presign_secret_key="ROS",
    s3_secure=False,
    allow_pickle_weights=True,
    max_weights_cache_bytes=5 * 1024**3,
    fetch_timeout_seconds=12.5,
    max_attempts=3,
)
SECRET_ENV = {ENV_PREFIX + name.upper(): str(getattr(CHANGED, name)) for name in serve_config.SECRET_SETTINGS}


def test_the_config_is_a_valid_serve_config_with_no_unknown_field() -> None:
    config = serve_config.serve_config(CHANGED)
    parsed = ServeDeploySchema.model_validate(config)
    assert_no_unknown_fields(parsed, config)
    (app,) = parsed.applications
    assert (app.name, app.route_prefix, app.import_path) == ("images", "/images", serve_config.IMPORT_PATH)
    assert parsed.grpc_options.port == 9100
    assert parsed.grpc_options.grpc_servicer_functions == serve_config.SERVICER_FUNCTIONS
    (worker,) = app.deployments
    assert worker.name == serve_config.DEPLOYMENT_NAME
    assert worker.ray_actor_options.model_dump(exclude_unset=True) == {"num_cpus": 8.0, "num_gpus": 1.0}
    assert worker.max_ongoing_requests == 2
    assert worker.autoscaling_config == {
        "min_replicas": 1,
        "max_replicas": 4,
        "initial_replicas": 2,
        "target_ongoing_requests": 1.0,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
    }


def test_a_fixed_replica_count_is_num_replicas_not_autoscaling() -> None:
    (worker,) = serve_config.application_config(Settings(min_replicas=3, max_replicas=3))["deployments"]
    assert worker["num_replicas"] == 3
    assert "autoscaling_config" not in worker


def test_no_secret_and_no_gateway_setting_reaches_the_config() -> None:
    text = json.dumps(serve_config.serve_config(CHANGED))
    for secret in ("postgresql://", '"SK"', '"AK"', '"RO"', '"ROS"'):
        assert secret not in text
    args = serve_config.application_config(CHANGED)["args"]
    assert "max_attempts" not in args and "grpc_host" not in args and "replica_num_gpus" not in args


def test_args_plus_the_pods_secret_env_give_back_the_replica_settings() -> None:
    args = json.loads(json.dumps(serve_config.application_config(CHANGED)["args"]))
    rebuilt = serve_config.settings_from_args(args, env=SECRET_ENV)
    for name in [*serve_config.replica_setting_names(), *serve_config.SECRET_SETTINGS]:
        assert getattr(rebuilt, name) == getattr(CHANGED, name), name


def test_args_refuse_unknown_settings_and_secrets() -> None:
    with pytest.raises(ValueError, match="no setting: max_replcas"):
        serve_config.settings_from_args({"max_replcas": 2}, env={})
    with pytest.raises(ValueError, match="must not carry secrets \\(s3_secret_key\\)"):
        serve_config.settings_from_args({"s3_secret_key": "x"}, env={})
    with pytest.raises(ValueError, match="must be a int"):
        serve_config.settings_from_args({"worker_metrics_port": "many"}, env={})


def test_every_setting_is_sorted_into_one_kind_and_secret_looking_ones_are_secrets() -> None:
    names = {f.name for f in dataclasses.fields(Settings)}
    kinds = [serve_config.SECRET_SETTINGS, serve_config.DEPLOYMENT_SETTINGS, serve_config.NOT_FOR_REPLICAS]
    for kind in kinds:
        assert kind <= names, f"not settings: {sorted(kind - names)}"
    assert not (kinds[0] & kinds[1]) and not (kinds[0] & kinds[2]) and not (kinds[1] & kinds[2])
    secret_looking = {
        n for n in names if re.search(r"(secret|password|token|access_key|_dsn$|store_url)", n)
    }
    assert secret_looking <= serve_config.SECRET_SETTINGS, (
        f"{sorted(secret_looking - serve_config.SECRET_SETTINGS)} look like secrets: add them to "
        "serving.serve_config.SECRET_SETTINGS (and to the chart's secret env)"
    )


def test_serve_config_command_prints_the_same_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve-config", "--replica-num-gpus", "1", "--max-replicas", "4", "--serve-app-name", "images"]) == 0
    printed: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert printed == serve_config.serve_config(
        Settings(replica_num_gpus=1.0, max_replicas=4, serve_app_name="images")
    )


def test_the_import_path_builds_the_worker_application_from_the_configs_args() -> None:
    # What Serve does with the config on a KubeRay cluster (ray.serve's import_attr), short of running it.
    from ray._common.utils import import_attr
    from ray.serve import Application

    args = json.loads(json.dumps(serve_config.application_config(CHANGED)["args"]))
    app = import_attr(serve_config.IMPORT_PATH)(args)
    assert isinstance(app, Application)
    worker = app._bound_deployment
    assert worker.name == serve_config.DEPLOYMENT_NAME
    rebuilt = worker.init_args[0]
    assert [getattr(rebuilt, n) for n in serve_config.replica_setting_names()] == [
        getattr(CHANGED, n) for n in serve_config.replica_setting_names()
    ]
