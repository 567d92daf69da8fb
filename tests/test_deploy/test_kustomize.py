"""Render every overlay with kustomize and check what a cluster (and a reviewer) would reject.

Built-in kinds are validated offline with kubernetes-validate (strict: unknown fields fail); the
KEDA and Prometheus Operator CRDs against the JSON schemas in ``schemas/``, written from the
documented CRD fields. The rest checks the contracts between the manifests and the worker: probes,
ports, security posture, grace period, and the autoscaler's view of the consumer group.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from worker.settings import Settings

from ._support import (
    K8S,
    KUBERNETES_VERSION,
    REQUESTS_PARTITIONS,
    SCHEMAS,
    find,
    render,
    worker_container,
    worker_env,
)

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.schema.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.schema.json",
}
RECOMMENDED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by")
# Worker (librdkafka-free kafka-python) SASL mechanism -> KEDA kafka scaler `sasl` value.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
DEFAULTS = Settings.model_construct()


def _setting(env: dict[str, str], name: str, default: Any) -> str:
    return env.get(name, str(default))


def test_every_overlay_renders_the_worker(docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in docs}
    expected = {"ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "ScaledObject"}
    assert expected <= kinds
    assert "Secret" not in kinds, "credentials are referenced, never rendered into the manifests"
    assert "HorizontalPodAutoscaler" not in kinds, "KEDA owns the HPA"
    assert "replicas" not in find(docs, "Deployment")["spec"], "replicas would fight the HPA on apply"


def test_base_renders_without_overlay() -> None:
    docs = render(K8S / "base")
    resources = worker_container(docs)["resources"]
    assert "nvidia.com/gpu" not in {**resources.get("requests", {}), **resources.get("limits", {})}


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, "1.34.0"])
def test_builtin_kinds_validate_strictly(docs: list[dict[str, Any]], version: str) -> None:
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS]
    errors = []
    for doc in builtin:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(map(str, exc.path))
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {where}")
    assert not errors, f"invalid for Kubernetes {version}:\n" + "\n".join(errors)


def test_custom_resources_match_their_schemas(docs: list[dict[str, Any]]) -> None:
    known = {d["kind"] for d in docs if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS}
    others = {(d["apiVersion"], d["kind"]) for d in docs if "." in d["apiVersion"].split("/")[0]}
    assert others <= set(CRD_SCHEMAS) | {("policy/v1", "PodDisruptionBudget")}, f"no schema for {others}"
    assert "ScaledObject" in known
    for doc in docs:
        schema_file = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema_file is None:
            continue
        schema = json.loads((SCHEMAS / schema_file).read_text(encoding="utf-8"))
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=str)
        assert not errors, f"{doc['kind']}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )


def test_recommended_labels_everywhere(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        missing = [label for label in RECOMMENDED_LABELS if label not in labels]
        assert not missing, f"{doc['kind']}/{doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/name"] == "space-worker"


def test_images_are_pinned(overlay: str, docs: list[dict[str, Any]]) -> None:
    image = worker_container(docs)["image"]
    name, _, tag = image.rpartition(":")
    assert "@sha256:" in image or (name and "/" not in tag and tag != "latest"), image
    flavour = {"cpu-dev": "-cpu", "gpu-prod": "-cuda"}.get(overlay)
    if flavour:
        assert tag.endswith(flavour), f"{overlay} runs {image}"


def test_pod_runs_restricted(docs: list[dict[str, Any]]) -> None:
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001, "the image's USER"
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    assert not pod.get("hostNetwork")
    assert not pod.get("hostPID")
    assert not pod.get("hostIPC")
    for container in pod["containers"] + pod.get("initContainers", []):
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert not ctx["capabilities"].get("add")
        assert ctx.get("privileged") in (None, False)
    allowed_volume_types = {
        "emptyDir",
        "projected",
        "secret",
        "configMap",
        "persistentVolumeClaim",
        "downwardAPI",
    }
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= allowed_volume_types, volume


def test_writable_paths_are_volumes(docs: list[dict[str, Any]]) -> None:
    env = worker_env(docs)
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in worker_container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state_dir = _setting(env, "SPACE_WORKER__STATE_DIR", DEFAULTS.worker.state_dir)
    for path in ("/tmp", "/home/space", state_dir):  # TMPDIR, HOME (Dockerfiles), state dir
        assert path in mounts, f"{path} must be writable under readOnlyRootFilesystem"
        assert "emptyDir" in volumes[mounts[path]["name"]], path
        assert not mounts[path].get("readOnly")
    models_root = _setting(env, "SPACE_MODELS__ROOT", DEFAULTS.models.root)
    if not models_root.startswith("s3://"):
        assert mounts[models_root]["readOnly"] is True, "models are mounted read-only"
    secrets_dir = env["SPACE_SECRETS_DIR"]
    assert mounts[secrets_dir]["readOnly"] is True
    assert "projected" in volumes[mounts[secrets_dir]["name"]]


def test_probes_and_ports_match_the_worker(docs: list[dict[str, Any]]) -> None:
    env = worker_env(docs)
    container = worker_container(docs)
    port = int(_setting(env, "SPACE_HTTP__PORT", DEFAULTS.http.port))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http-metrics": port}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] in ("/readyz", "/healthz")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("http-metrics", port)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model load + warm-up budget"
    service = find(docs, "Service", "space-worker-metrics")
    assert service["spec"]["ports"] == [
        {"name": "http-metrics", "port": port, "targetPort": "http-metrics", "protocol": "TCP"}
    ]
    assert container["args"] == ["serve"]


def test_grace_period_exceeds_the_drain_budget(docs: list[dict[str, Any]]) -> None:
    env = worker_env(docs)
    grace_s = float(_setting(env, "SPACE_WORKER__SHUTDOWN_GRACE_S", DEFAULTS.worker.shutdown_grace_s))
    termination_s = find(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert termination_s >= grace_s + 10, f"{termination_s} s leaves no margin over {grace_s} s of drain"


def test_a_read_write_once_volume_keeps_every_worker_on_one_node(docs: list[dict[str, Any]]) -> None:
    # RWO attaches a volume to one node at a time: pods KEDA adds (or a rollout's surge pod) on another
    # node hang in ContainerCreating with Multi-Attach. A hostname spread even prefers other nodes.
    pod = find(docs, "Deployment")["spec"]["template"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    rwo = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "PersistentVolumeClaim"
        and d["metadata"]["name"] in claims
        and "ReadWriteOnce" in d["spec"]["accessModes"]
    ]
    if not rwo:
        return
    spreads = pod["spec"].get("topologySpreadConstraints", [])
    assert not [c for c in spreads if c["topologyKey"] == "kubernetes.io/hostname"], rwo
    terms = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and t["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        for t in terms
    ), rwo


def test_the_rollout_deadline_leaves_room_beyond_the_startup_budget(docs: list[dict[str, Any]]) -> None:
    # Kubernetes counts progressDeadlineSeconds (default 600) from pod creation; scheduling, image pulls
    # and the startup probe's whole budget come out of it, or `kubectl rollout status` fails a rollout
    # that would have finished.
    deployment = find(docs, "Deployment")
    probe = worker_container(docs)["startupProbe"]
    budget_s = probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
    assert deployment["spec"].get("progressDeadlineSeconds", 600) >= budget_s + 300, budget_s


def test_selectors_select_the_pods(docs: list[dict[str, Any]]) -> None:
    deployment = find(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": find(docs, "Service")["spec"]["selector"],
        "PodDisruptionBudget": find(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector, kind
        assert selector.items() <= pod_labels.items(), kind
    assert find(docs, "PodDisruptionBudget")["spec"].get("maxUnavailable") == 1
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    service = find(docs, "Service")
    for monitor in monitors:
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        port_names = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names


def test_gpu_only_in_gpu_prod(overlay: str, docs: list[dict[str, Any]]) -> None:
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    resources = worker_container(docs)["resources"]
    env = worker_env(docs)
    if overlay == "gpu-prod":
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert "nvidia.com/gpu.present" not in pod.get("nodeSelector", {}), "the GPU request schedules; no GFD label"
        assert env["SPACE_MODELS__DEVICE"] == "cuda"
        assert env["SPACE_MODELS__PRECISION"] == "bf16"
        assert int(env["SPACE_BATCHING__MAX_BATCH_SIZE"]) > DEFAULTS.batching.max_batch_size
    else:
        assert "nvidia.com/gpu" not in {**resources.get("requests", {}), **resources.get("limits", {})}
        assert env.get("SPACE_MODELS__DEVICE") != "cuda"
    assert resources["requests"]["memory"] == resources["limits"]["memory"], "no memory overcommit"
    threads = env.get("SPACE_MODELS__THREADS")
    assert threads is not None, "set SPACE_MODELS__THREADS: torch defaults to the node's core count"
    assert int(threads) <= int(resources["limits"]["cpu"]), "torch threads <= CPU limit"


def test_scaledobject_follows_the_consumer_group(docs: list[dict[str, Any]]) -> None:
    env = worker_env(docs)
    scaled = find(docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == find(docs, "Deployment")["metadata"]["name"]
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    kafka = DEFAULTS.kafka
    bootstrap = _setting(env, "SPACE_KAFKA__BOOTSTRAP_SERVERS", kafka.bootstrap_servers)
    assert meta["bootstrapServers"] == bootstrap
    assert meta["consumerGroup"] == _setting(env, "SPACE_KAFKA__GROUP_ID", kafka.group_id) == "space-workers"
    assert meta["topic"] == _setting(env, "SPACE_KAFKA__REQUESTS_TOPIC", kafka.requests_topic)
    offset_reset = _setting(env, "SPACE_KAFKA__AUTO_OFFSET_RESET", kafka.auto_offset_reset)
    assert meta["offsetResetPolicy"] == offset_reset, "KEDA must count lag the way the consumer starts"
    assert meta.get("allowIdleConsumers", "false") == "false"
    assert not (meta.get("limitToPartitionsWithLag") == "true" and meta.get("allowIdleConsumers") == "true")


def test_replica_bounds_and_lag_threshold(docs: list[dict[str, Any]]) -> None:
    scaled = find(docs, "ScaledObject")
    spec, notes = scaled["spec"], scaled["metadata"]["annotations"]
    assert int(notes["scaling.space-worker/requests-partitions"]) == REQUESTS_PARTITIONS
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= REQUESTS_PARTITIONS
    rate = float(notes["scaling.space-worker/per-pod-images-per-second"])
    drain_s = float(notes["scaling.space-worker/target-drain-seconds"])
    threshold = float(spec["triggers"][0]["metadata"]["lagThreshold"])
    assert threshold == rate * drain_s
    assert re.search(r"estimate|not measured|measured", notes["scaling.space-worker/per-pod-figure"])
    # docs/scaling.md: a keeping-up pod still shows the lag floor L0 = in-flight images + r x commit
    # interval; the threshold must sit well above it (>= 7 x), or KEDA scales on pipeline occupancy.
    env = worker_env(docs)
    inflight = float(_setting(env, "SPACE_BATCHING__MAX_INFLIGHT_IMAGES", DEFAULTS.batching.max_inflight_images))
    commit_s = float(_setting(env, "SPACE_KAFKA__COMMIT_INTERVAL_MS", DEFAULTS.kafka.commit_interval_ms)) / 1000
    lag_floor = inflight + rate * commit_s
    assert threshold >= 7 * lag_floor, f"lagThreshold {threshold} < 7 x lag floor {lag_floor}"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    scale_down = behavior["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300
    assert {"type": "Pods", "value": 1, "periodSeconds": 60} in scale_down["policies"]
    assert scale_down.get("selectPolicy", "Max") == "Min" or len(scale_down["policies"]) == 1


def test_kafka_security_matches_between_worker_and_scaler(docs: list[dict[str, Any]]) -> None:
    env = worker_env(docs)
    (trigger,) = find(docs, "ScaledObject")["spec"]["triggers"]
    meta = trigger["metadata"]
    protocol = _setting(env, "SPACE_KAFKA__SECURITY_PROTOCOL", DEFAULTS.kafka.security_protocol)
    expected_tls = "enable" if protocol.endswith("SSL") else "disable"
    assert meta.get("tls", "disable") == expected_tls, protocol
    if protocol.startswith("SASL"):
        assert meta.get("sasl") == KEDA_SASL[env["SPACE_KAFKA__SASL_MECHANISM"]]
        auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        params = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
        assert {"username", "password"} <= set(params)
        pod = find(docs, "Deployment")["spec"]["template"]["spec"]
        mounted = {
            (source["secret"]["name"], item["key"])
            for volume in pod["volumes"]
            for source in volume.get("projected", {}).get("sources", [])
            for item in source["secret"]["items"]
        } | {
            (volume["secret"]["secretName"], item["key"])
            for volume in pod["volumes"]
            if "secret" in volume
            for item in volume["secret"]["items"]
        }
        for ref in params.values():
            assert (ref["name"], ref["key"]) in mounted, f"KEDA reads {ref} that the worker does not mount"
        if "ca" in params:
            assert env["SPACE_KAFKA__SSL_CAFILE"].endswith("/" + params["ca"]["key"])
    else:
        assert "sasl" not in meta
        assert "authenticationRef" not in trigger
