"""The Helm chart, rendered by a real Helm for each ci/*-values.yaml and checked without a cluster.

Core manifests against Kubernetes' own schemas (strict, a named version), the RayService against
KubeRay's CRD schema with unknown fields as errors, its serveConfigV2 against Ray Serve's schema
and against serving.serve_config for the same settings.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from core.config import ENV_PREFIX, Settings
from serving import serve_config
from tests.chart.charttest import (
    CHART,
    CI_VALUES,
    DEFAULTS,
    VALUE_SETS,
    KUBERNETES_VERSION,
    Rendered,
    assert_no_unknown_fields,
    env_of,
    helm_run,
    render,
    validate_rayservice,
)
from tests.chart.sync_chart import CHART_SET, COMMAND, SERVE_SETTINGS, serve_settings_text, settings_schema

CPU_DEV, EXTERNAL_TLS, GPU_PROD = CI_VALUES
CORE_KINDS = {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget", "NetworkPolicy", "Ingress", "Secret"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return {name: render(*files) for name, files in VALUE_SETS.items()}


def gateway_settings(r: Rendered) -> Settings:
    """The settings `loraserve gateway` reads from the rendered Deployment's env (secrets left out)."""
    env = {k: v for k, v in env_of(r.gateway_container).items() if isinstance(v, str) and k.startswith(ENV_PREFIX)}
    return Settings.from_env(env)


def test_the_three_value_sets_are_the_ones_named() -> None:
    assert [p.name for p in CI_VALUES] == ["cpu-dev-values.yaml", "external-tls-values.yaml", "gpu-prod-values.yaml"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(name: str) -> None:
    result = helm_run("lint", "--strict", CHART, *[a for f in VALUE_SETS[name] for a in ("-f", f)])
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", VALUE_SETS)
def test_core_manifests_match_the_kubernetes_schemas(rendered: dict[str, Rendered], name: str) -> None:
    documents = rendered[name].documents
    core = [d for d in documents if d["kind"] in CORE_KINDS]
    assert {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= {d["kind"] for d in core}
    for document in core:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    # The Ray pod templates and the Serve Service inside the RayService are core objects too.
    r = rendered[name]
    for group, template in r.ray_pod_templates().items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": group, **template["metadata"]}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    serve_service = r.rayservice["spec"]["serveService"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", **serve_service}, KUBERNETES_VERSION, strict=True)


def test_the_kubernetes_validation_is_strict(rendered: dict[str, Rendered]) -> None:
    deployment = json.loads(json.dumps(rendered[GPU_PROD.name].gateway))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_rayservice_matches_kuberays_crd(rendered: dict[str, Rendered], name: str) -> None:
    rayservice = rendered[name].rayservice
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert validate_rayservice(rayservice) == []


def test_the_crd_check_refuses_unknown_fields(rendered: dict[str, Rendered]) -> None:
    rayservice = json.loads(json.dumps(rendered[GPU_PROD.name].rayservice))
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["tolerationz"] = []
    errors = validate_rayservice(rayservice)
    assert any("rayStartParam" in e for e in errors) and any("tolerationz" in e for e in errors), errors


@pytest.mark.parametrize("name", VALUE_SETS)
def test_serve_config_is_valid_for_ray_serve_and_equals_the_embedded_one(
    rendered: dict[str, Rendered], name: str
) -> None:
    r = rendered[name]
    config = r.serve_config
    assert_no_unknown_fields(ServeDeploySchema.model_validate(config), config)
    settings = gateway_settings(r)
    expected = serve_config.serve_config(settings)
    # args may name a setting at its default (the chart passes what it was given): compare meaning.
    (app,) = config["applications"]
    (expected_app,) = expected["applications"]
    args, expected_args = app.pop("args"), expected_app.pop("args")
    assert set(args) <= set(serve_config.replica_setting_names())
    assert serve_config.settings_from_args(args, env={}) == serve_config.settings_from_args(expected_args, env={})
    assert config == json.loads(json.dumps(expected))


def test_every_setting_a_replica_reads_reaches_the_serve_config_and_no_other() -> None:
    """Each setting the chart accepts, at a non-default value: the Serve config's args carry exactly the
    replica settings (serving.serve_config decides), the deployments entry the deployment options."""
    accepted = _schema_settings()
    changed: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        if f.name in accepted:
            changed[f.name] = _other_value(f.default)
    changed.update(
        min_replicas=2,
        max_replicas=5,
        initial_replicas=3,
        replica_num_gpus=1.0,
        s3_endpoint="s3:9000",
        s3_presign_endpoint="https://files.example.com",
    )
    r = render(GPU_PROD, values={"settings": changed})
    (app,) = r.serve_config["applications"]
    expected = serve_config.application_config(gateway_settings(r))
    assert sorted(app["args"]) == sorted(expected["args"])
    assert serve_config.settings_from_args(app["args"], env={}) == serve_config.settings_from_args(
        expected["args"], env={}
    )
    assert app["deployments"] == json.loads(json.dumps(expected["deployments"]))
    # ... and the gateway gets every one of them.
    settings = gateway_settings(r)
    for name, value in changed.items():
        assert getattr(settings, name) == value, name


def _other_value(default: Any) -> Any:
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 7
    if isinstance(default, float):
        return default + 0.5
    return f"{default}-x"


def _schema_settings() -> dict[str, Any]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    properties: dict[str, Any] = schema["properties"]["settings"]["properties"]
    return properties


def test_the_charts_copy_of_the_serve_settings_is_current() -> None:
    assert SERVE_SETTINGS.read_text() == serve_settings_text(), f"stale: {COMMAND}"


def test_the_values_schema_lists_every_setting_the_chart_does_not_set() -> None:
    listed = _schema_settings()
    assert listed == settings_schema(listed), f"values.schema.json's settings are stale: {COMMAND}"
    # As the command writes it: a key written twice (two edits merged) reads as one, and the last one wins.
    text = (CHART / "values.schema.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n", f"values.schema.json is not as {COMMAND} writes it"


def test_the_chart_sets_what_it_owns(rendered: dict[str, Rendered]) -> None:
    seen = {
        name.removeprefix(ENV_PREFIX).lower()
        for r in rendered.values()
        for name, value in env_of(r.gateway_container).items()
        if name.startswith(ENV_PREFIX) and isinstance(value, str)
    }
    assert CHART_SET <= seen, sorted(CHART_SET - seen)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_reach_pods_only_through_secret_key_refs(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    containers = [r.gateway_container] + [t["spec"]["containers"][0] for t in r.ray_pod_templates().values()]
    secret_env = {ENV_PREFIX + n.upper() for n in serve_config.SECRET_SETTINGS} | {"HF_TOKEN"}
    for container in containers:
        for env_name, value in env_of(container).items():
            if env_name in secret_env:
                assert set(value) == {"secretKeyRef"}, (container["name"], env_name)
    text = r.rayservice["spec"]["serveConfigV2"]
    assert not any(secret in text for secret in serve_config.SECRET_SETTINGS)
    ray_env = env_of(r.ray_pod_templates()["head"]["spec"]["containers"][0])
    assert {"LORASERVE_S3_ACCESS_KEY", "LORASERVE_S3_SECRET_KEY"} <= set(ray_env)


def test_gpu_production(rendered: dict[str, Rendered]) -> None:
    r = rendered[GPU_PROD.name]
    spec = r.gateway["spec"]
    assert spec["replicas"] == 3 and spec["strategy"]["type"] == "RollingUpdate"
    container = r.gateway_container
    assert container["command"] == ["loraserve", "gateway"]
    env = env_of(container)
    assert env["LORASERVE_STORE_URL"] == {"secretKeyRef": {"name": "loraserve-postgresql", "key": "dsn"}}
    assert env["LORASERVE_SERVE_GRPC_HOST"] == r.rayservice["spec"]["serveService"]["metadata"]["name"]
    assert env["LORASERVE_GRPC_HOST"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe
    settings = gateway_settings(r)
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_grace_seconds == 120
    assert r.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert {p["name"] for p in r.one("Service", "-gateway")["spec"]["ports"]} == {"grpc", "http"}
    assert "PersistentVolumeClaim" not in r.kinds()

    cluster = r.rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 8)
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert volumes["weights-cache"] == {"name": "weights-cache", "emptyDir": {"sizeLimit": "200Gi"}}
    mounts = {m["name"]: m["mountPath"] for m in worker["containers"][0]["volumeMounts"]}
    assert mounts["weights-cache"] == "/data" == r.serve_config["applications"][0]["args"]["data_dir"]
    assert env_of(worker["containers"][0])["HF_TOKEN"] == {"secretKeyRef": {"name": "loraserve-hf", "key": "token"}}
    (deployment,) = r.serve_config["applications"][0]["deployments"]
    assert deployment["ray_actor_options"] == {"num_cpus": 8, "num_gpus": 1}
    assert deployment["autoscaling_config"]["max_replicas"] == 8


def test_cpu_dev_runs_one_gateway_on_a_pvc_with_the_dev_minio(rendered: dict[str, Rendered]) -> None:
    r = rendered[CPU_DEV.name]
    assert r.gateway["spec"]["replicas"] == 1 and r.gateway["spec"]["strategy"]["type"] == "Recreate"
    pvc = r.one("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in r.gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    env = env_of(r.gateway_container)
    assert "LORASERVE_STORE_URL" not in env
    minio = r.one("Service", "-minio")["metadata"]["name"]
    assert env["LORASERVE_S3_ENDPOINT"] == f"{minio}:9000" and env["LORASERVE_S3_SECURE"] == "false"
    (group,) = r.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert r.serve_config["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] == 0


def test_the_worker_shared_secret_is_made_once_unless_given(rendered: dict[str, Rendered]) -> None:
    """The gateway and every Ray pod read the same Secret; the chart makes it when none is named."""
    for name, secret_name in ((CPU_DEV.name, "t-loraserve-worker-secret"), (EXTERNAL_TLS.name, "loraserve-workers")):
        r = rendered[name]
        containers = [r.gateway_container] + [t["spec"]["containers"][0] for t in r.ray_pod_templates().values()]
        refs = {env_of(c)["LORASERVE_WORKER_SHARED_SECRET"]["secretKeyRef"]["name"] for c in containers}
        assert refs == {secret_name}, name
    made = rendered[CPU_DEV.name].one("Secret", "-worker-secret")
    assert len(base64.b64decode(made["data"]["worker-shared-secret"])) == 48
    assert not [d for d in rendered[EXTERNAL_TLS.name].documents if d["metadata"]["name"].endswith("-worker-secret")]


def test_external_services_with_tls(rendered: dict[str, Rendered]) -> None:
    r = rendered[EXTERNAL_TLS.name]
    container = r.gateway_container
    env = env_of(container)
    assert env["LORASERVE_TLS_CERT_FILE"] == "/etc/loraserve/tls/tls.crt"
    assert env["LORASERVE_TLS_CLIENT_CA_FILE"] == "/etc/loraserve/tls/ca.crt"
    assert env["LORASERVE_S3_PRESIGN_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-reader", "key": "access-key"}}
    assert env["LORASERVE_S3_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-writer", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["LORASERVE_STORE_URL"] == {"secretKeyRef": {"name": "pg-app", "key": "uri"}}
    # Kubernetes' gRPC probes speak no TLS; the HTTP port is TLS too.
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTPS"}
    volumes = {v["name"]: v for v in r.gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "loraserve-grpc-tls"
    # Secret settings by name reach the gateway and the Ray pods that read them, never the Serve config.
    shared = {"secretKeyRef": {"name": "loraserve-workers", "key": "secret"}}
    assert env["LORASERVE_WORKER_SHARED_SECRET"] == shared
    assert env["LORASERVE_WEBHOOK_SIGNING_KEY"] == {
        "secretKeyRef": {"name": "loraserve-webhooks", "key": "ed25519-private-key"}
    }
    for template in r.ray_pod_templates().values():
        assert env_of(template["spec"]["containers"][0])["LORASERVE_WORKER_SHARED_SECRET"] == shared
    assert "shared_secret" not in r.rayservice["spec"]["serveConfigV2"]
    ingress = r.one("Ingress")
    assert ingress["spec"]["tls"] == [{"hosts": ["files.example.com"], "secretName": "files-example-com-tls"}]
    monitor = r.one("ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "ray-metrics", "worker-metrics"}
    labelled = [d for d in r.documents if d["kind"] == "Service" and d["metadata"]["labels"].get("loraserve.dev/metrics")]
    assert {p["name"] for s in labelled for p in s["spec"]["ports"]} >= {"http", "ray-metrics", "worker-metrics"}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_network_policies(rendered: dict[str, Rendered]) -> None:
    r = rendered[EXTERNAL_TLS.name]
    ray = r.one("NetworkPolicy", "-ray")["spec"]
    pods = {group: t["metadata"]["labels"] for group, t in r.ray_pod_templates().items()}
    gateway_labels = r.gateway["spec"]["template"]["metadata"]["labels"]
    assert all(_selects(ray["podSelector"], labels) for labels in pods.values())
    assert not _selects(ray["podSelector"], gateway_labels)
    rules = ray["ingress"]
    from_ray, from_operator, from_gateway, from_monitoring = rules
    assert "ports" not in from_ray and all(_selects(from_ray["from"][0]["podSelector"], p) for p in pods.values())
    assert {p["port"] for p in from_operator["ports"]} == {6379, 8265, 10001, 52365}
    assert from_operator["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    assert [p["port"] for p in from_gateway["ports"]] == [9000]
    assert _selects(from_gateway["from"][0]["podSelector"], gateway_labels)
    assert {p["port"] for p in from_monitoring["ports"]} == {8080, 9500}
    gateway = r.one("NetworkPolicy", "-gateway")["spec"]
    assert _selects(gateway["podSelector"], gateway_labels)
    rule, prometheus = gateway["ingress"]
    assert {p["port"] for p in rule["ports"]} == {50051, 8080}
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"loraserve.dev/client": "true"}}}]
    assert [p["port"] for p in prometheus["ports"]] == [8080]
    assert prometheus["from"] == from_monitoring["from"]
    # Ray pods from an open port list on no other rule: only the operator, the gateway, Prometheus.
    assert len(rules) == 4


def test_ray_pod_templates_carry_no_chart_or_version_label(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    """A chart bump must not change the Ray cluster's spec (KubeRay would build a new cluster)."""
    for r in rendered.values():
        for template in r.ray_pod_templates().values():
            labels = template["metadata"]["labels"]
            assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels
    bumped = tmp_path / "loraserve"
    shutil.copytree(CHART, bumped)
    chart = yaml.safe_load((bumped / "Chart.yaml").read_text())
    chart["version"] = "9.9.9"
    (bumped / "Chart.yaml").write_text(yaml.safe_dump(chart))
    before = rendered[GPU_PROD.name].rayservice["spec"]
    after = render(GPU_PROD, chart=bumped).rayservice["spec"]
    assert after["rayClusterConfig"] == before["rayClusterConfig"]
    assert after["serveConfigV2"] == before["serveConfigV2"]


def test_the_documented_values_example_installs(tmp_path: Path) -> None:
    """The minimal GPU values file in the deployment docs' "Kubernetes" section renders and lints."""
    page = (CHART.parents[1] / "docs" / "deployment.md").read_text()
    section = page.split("## Kubernetes", 1)[1]
    example = section.split("# values-gpu.yaml\n", 1)[1].split("```", 1)[0]
    values = tmp_path / "values-gpu.yaml"
    values.write_text(example)
    helm_run("lint", "--strict", CHART, "-f", values)
    r = render(values)
    assert r.gateway["spec"]["replicas"] == 2
    assert r.serve_config["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] == 4


def test_the_webhook_signing_key_is_made_once_for_the_gateways_unless_given(rendered: dict[str, Rendered]) -> None:
    """Every gateway signs with the same Ed25519 key (any gateway's JWKS verifies any delivery)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    r = rendered[CPU_DEV.name]
    made = r.one("Secret", "-webhook-signing")
    key = load_pem_private_key(base64.b64decode(made["data"]["webhook-signing-key"]), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    assert env_of(r.gateway_container)["LORASERVE_WEBHOOK_SIGNING_KEY"] == {
        "secretKeyRef": {"name": made["metadata"]["name"], "key": "webhook-signing-key"}
    }
    for template in r.ray_pod_templates().values():
        assert "LORASERVE_WEBHOOK_SIGNING_KEY" not in env_of(template["spec"]["containers"][0])
    given = rendered[EXTERNAL_TLS.name]
    assert not [d for d in given.documents if d["metadata"]["name"].endswith("-webhook-signing")]


def test_the_defaults_install_one_gateway_with_the_dev_minio_and_say_what_to_change(rendered: dict[str, Rendered]) -> None:
    """chart-testing installs the defaults as they are: they must make a release that runs alone in its namespace."""
    r = rendered[DEFAULTS]
    assert r.gateway["spec"]["replicas"] == 1 and r.gateway["spec"]["strategy"]["type"] == "Recreate"
    volumes = {v["name"]: v for v in r.gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == r.one("PersistentVolumeClaim")["metadata"]["name"]
    env = env_of(r.gateway_container)
    minio = r.one("Service", "-minio")["metadata"]["name"]
    assert env["LORASERVE_S3_ENDPOINT"] == f"{minio}:9000"
    assert env["LORASERVE_S3_ACCESS_KEY"]["secretKeyRef"]["name"] == r.one("Secret", "-minio")["metadata"]["name"]
    notes = helm_run("install", "t", CHART, "--dry-run=client", "--namespace", "images").stdout.split("NOTES:", 1)[1]
    assert "never for production" in notes and "devMinio.enabled=false, settings.s3_endpoint" in notes
    assert "from the namespace\nimages only" in notes


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_reach_only_the_pods_that_read_them(rendered: dict[str, Rendered], name: str) -> None:
    """The queue's DSN and the webhook signing key stay on the gateway, however they are given; the
    Ray pods get the S3 keys and the workers' shared secret they do read."""
    r = rendered[name]
    gateway_only = {ENV_PREFIX + n.upper() for n in serve_config.GATEWAY_SECRETS}
    assert ENV_PREFIX + "WEBHOOK_SIGNING_KEY" in env_of(r.gateway_container)
    for group, template in r.ray_pod_templates().items():
        env = env_of(template["spec"]["containers"][0])
        assert not gateway_only & set(env), (group, sorted(gateway_only & set(env)))
        assert {"LORASERVE_S3_ACCESS_KEY", "LORASERVE_WORKER_SHARED_SECRET"} <= set(env)


def test_secret_settings_by_name_are_routed_by_who_reads_them() -> None:
    given = {
        name: {"existingSecret": "s", "key": name}
        for name in ("store_url", "webhook_signing_key", "worker_shared_secret", "files_url_secret")
    }
    r = render(GPU_PROD, values={"secrets": {"settings": given}})
    gateway = env_of(r.gateway_container)
    assert {ENV_PREFIX + n.upper() for n in given} <= set(gateway)
    for template in r.ray_pod_templates().values():
        env = env_of(template["spec"]["containers"][0])
        assert "LORASERVE_STORE_URL" not in env and "LORASERVE_WEBHOOK_SIGNING_KEY" not in env
        assert env["LORASERVE_WORKER_SHARED_SECRET"] == {"secretKeyRef": {"name": "s", "key": "worker_shared_secret"}}
        assert "LORASERVE_FILES_URL_SECRET" in env


def test_no_replica_code_reads_a_gateway_only_secret() -> None:
    """GATEWAY_SECRETS is right only while nothing a Ray pod runs (serving/, storage/, what they import
    from core/ and clients/python/loraserve/) names those settings; entrypoints/ (`loraserve keys` opens the
    queue, in the gateway pod) is not imported there."""
    import re

    root = CHART.parents[1]
    readers = {
        path.relative_to(root).as_posix()
        for folder in ("serving", "storage", "core", "clients/python/loraserve")
        for path in (root / folder).rglob("*.py")
        if path.name != "config.py" and path.parent.name != "v1"
        for name in serve_config.GATEWAY_SECRETS
        if re.search(rf"\b{name}\b", path.read_text())
    }
    assert readers <= {"serving/serve_config.py"}, readers


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_runs_on_a_read_only_root_with_its_writable_paths_mounted(
    rendered: dict[str, Rendered], name: str
) -> None:
    r = rendered[name]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in r.documents if d["kind"] == "Deployment"}
    pods.update({group: template["spec"] for group, template in r.ray_pod_templates().items()})
    for pod_name, pod in pods.items():
        volumes = {v["name"] for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, (pod_name, container["name"])
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts and set(mounts.values()) <= volumes, (pod_name, mounts)
    for group, template in r.ray_pod_templates().items():
        mounts = {m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        # Ray's sessions and logs, the libraries' caches under $HOME (the image's /home/ray).
        assert {"/tmp/ray", "/tmp", "/home/ray", "/data"} <= mounts, group
    autoscaler = r.rayservice["spec"]["rayClusterConfig"].get("autoscalerOptions")
    if autoscaler:
        assert autoscaler["securityContext"]["readOnlyRootFilesystem"] is True
        head_volumes = {v["name"] for v in r.ray_pod_templates()["head"]["spec"]["volumes"]}
        assert {m["mountPath"] for m in autoscaler["volumeMounts"]} >= {"/tmp", "/tmp/ray"}
        assert {m["name"] for m in autoscaler["volumeMounts"]} <= head_volumes


@pytest.mark.parametrize("name", VALUE_SETS)
def test_only_the_autoscaler_gets_a_service_account_token(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    autoscaling = r.rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]
    for group, template in r.ray_pod_templates().items():
        expected = autoscaling and group == "head"
        assert template["spec"]["automountServiceAccountToken"] is expected, group
    for document in r.documents:
        if document["kind"] == "Deployment":
            assert document["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_the_operator_reaches_ray_only_from_its_namespace(rendered: dict[str, Rendered]) -> None:
    elsewhere = render(GPU_PROD, values={"networkPolicy": {"kuberayOperator": {"namespace": "kuberay-system"}}})
    for r, namespace in ((rendered[EXTERNAL_TLS.name], "images"), (elsewhere, "kuberay-system")):
        (peer,) = r.one("NetworkPolicy", "-ray")["spec"]["ingress"][1]["from"]
        assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
        assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_tls_on_the_gateway_is_tls_to_its_probes_and_to_the_ingress(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    tls = "LORASERVE_TLS_CERT_FILE" in env_of(r.gateway_container)
    ports = {p["name"]: p.get("appProtocol") for p in r.one("Service", "-gateway")["spec"]["ports"]}
    assert ports == ({"grpc": "https", "http": "https"} if tls else {"grpc": "kubernetes.io/h2c", "http": "http"})
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if tls:
            assert r.gateway_container[probe]["httpGet"]["scheme"] == "HTTPS", probe
        else:
            assert "grpc" in r.gateway_container[probe], probe
    for ingress in (d for d in r.documents if d["kind"] == "Ingress"):
        assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == ("HTTPS" if tls else "HTTP")


def test_the_ingress_backend_protocol_follows_the_port_and_yields_to_annotations() -> None:
    ingress = {"enabled": True, "className": "nginx", "host": "a.example.com", "servicePort": "grpc"}
    annotation = "nginx.ingress.kubernetes.io/backend-protocol"
    r = render(EXTERNAL_TLS, values={"gateway": {"ingress": ingress}})
    assert r.one("Ingress")["metadata"]["annotations"][annotation] == "GRPCS"
    r = render(GPU_PROD, values={"gateway": {"ingress": ingress}})
    assert r.one("Ingress")["metadata"]["annotations"][annotation] == "GRPC"
    r = render(GPU_PROD, values={"gateway": {"ingress": {**ingress, "annotations": {annotation: "AJP"}}}})
    assert r.one("Ingress")["metadata"]["annotations"][annotation] == "AJP"
    r = render(GPU_PROD, values={"gateway": {"ingress": {**ingress, "className": "traefik"}}})
    assert "annotations" not in r.one("Ingress")["metadata"]
