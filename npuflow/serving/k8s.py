"""Kubernetes manifests for a rollout stage: a KServe InferenceService (canaryTrafficPercent) and a plain
vllm-ascend Deployment + Service on Ascend NPUs. Rendering is pure; `apply` runs only with a kube context."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from npuflow.core.config import StageConfig
from npuflow.core.errors import ConfigError, NpuflowError

ASCEND_RESOURCE = "huawei.com/Ascend910"  # Ascend device plugin's extended resource name
VLLM_ASCEND_IMAGE = "quay.io/ascend/vllm-ascend:v0.9.1"  # image with vllm + vllm-ascend + CANN
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def resource_name(*parts: str) -> str:
    """A DNS-1123 label (lowercase alphanumerics and '-', at most 63 characters) from the parts."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:63].rstrip("-")
    if not _DNS1123.fullmatch(name):
        raise ConfigError(f"cannot make a Kubernetes name from {parts!r}")
    return name


def inference_service(name: str, version: str, storage_uri: str, stage: StageConfig, npus: int = 1,
                      namespace: str = "default") -> dict:
    """KServe InferenceService serving `version`; KServe keeps the previous revision for the rest of the traffic
    (canaryTrafficPercent = the stage's challenger share; the full stage promotes with 100)."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": resource_name(name), "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": resource_name(name), "npuflow/version": version},
                     "annotations": {"npuflow/stage": stage.name}},
        "spec": {"predictor": {
            "canaryTrafficPercent": round(stage.weight),
            "model": {
                "modelFormat": {"name": "huggingface"},
                "runtime": "kserve-huggingfaceserver",
                "storageUri": storage_uri,
                "args": ["--backend=vllm", "--quantization=ascend"],
                "resources": {"requests": {ASCEND_RESOURCE: str(npus), "cpu": "8", "memory": "64Gi"},
                              "limits": {ASCEND_RESOURCE: str(npus), "cpu": "16", "memory": "128Gi"}},
            },
        }},
    }


def vllm_ascend(name: str, version: str, model_path: str, npus: int = 1, replicas: int = 1,
                namespace: str = "default", port: int = 8000) -> list[dict]:
    """A Deployment running vllm-ascend's OpenAI server on `npus` Ascend NPUs, and its ClusterIP Service."""
    app = resource_name(name, "v" + version)
    labels = {"app.kubernetes.io/name": app, "npuflow/model": resource_name(name), "npuflow/version": version}
    container = {
        "name": "vllm",
        "image": VLLM_ASCEND_IMAGE,
        "command": ["vllm", "serve", model_path, "--quantization", "ascend", "--host", "0.0.0.0",
                    "--port", str(port), "--tensor-parallel-size", str(npus)],
        "ports": [{"name": "http", "containerPort": port}],
        "resources": {"requests": {ASCEND_RESOURCE: str(npus)}, "limits": {ASCEND_RESOURCE: str(npus)}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 10},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": app, "namespace": namespace, "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app.kubernetes.io/name": app}},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": app, "namespace": namespace, "labels": labels},
        "spec": {"selector": {"app.kubernetes.io/name": app},
                 "ports": [{"name": "http", "port": port, "targetPort": "http"}]},
    }
    return [deployment, service]


def render_stage(out_dir: Path, name: str, version: str, storage_uri: str, model_path: str, stage: StageConfig,
                 index: int, npus: int = 1, namespace: str = "default") -> Path:
    """Write the stage's manifests as one multi-document YAML file and return its path."""
    docs = [inference_service(name, version, storage_uri, stage, npus, namespace),
            *vllm_ascend(name, version, model_path, npus, namespace=namespace)]
    path = Path(out_dir) / f"{index:02d}-{stage.name}-{round(stage.weight)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def apply(path: Path, context: str | None) -> bool:
    """`kubectl apply` the file in that kube context; without a context nothing is applied (returns False)."""
    if not context:
        return False
    if shutil.which("kubectl") is None:
        raise NpuflowError("a kube context is configured but kubectl is not on PATH")
    subprocess.run(["kubectl", "--context", context, "apply", "-f", str(path)], check=True)
    return True
