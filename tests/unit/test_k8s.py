"""Kubernetes manifests rendered per rollout stage: kinds, required fields, names, Ascend resources."""

from __future__ import annotations

import yaml

from npuflow.core.config import RolloutConfig
from npuflow.serving.k8s import _DNS1123, ASCEND_RESOURCE, apply, render_stage, resource_name


def test_every_stage_renders_an_inference_service_and_a_vllm_ascend_deployment_and_service(tmp_path):
    stages = RolloutConfig().stages
    for i, stage in enumerate(stages):
        path = render_stage(tmp_path, "Llama-2-7B_w8a16", "3", "s3://models/llama/abc", "/models/llama", stage, i)
        docs = list(yaml.safe_load_all(path.read_text()))
        assert [d["kind"] for d in docs] == ["InferenceService", "Deployment", "Service"]
        for d in docs:
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(d)
            assert _DNS1123.fullmatch(d["metadata"]["name"]) and len(d["metadata"]["name"]) <= 63
        isvc, dep, svc = docs
        assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
        assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == round(stage.weight)
        assert isvc["spec"]["predictor"]["model"]["resources"]["limits"][ASCEND_RESOURCE] == "1"
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"][ASCEND_RESOURCE] == "1"
        assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["00-shadow-0.yaml", "01-canary-10.yaml",
                                                            "02-canary-50.yaml", "03-full-100.yaml"]


def test_names_are_dns_labels_and_nothing_is_applied_without_a_kube_context(tmp_path):
    assert resource_name("Llama-2-7B_w8a16", "v12") == "llama-2-7b-w8a16-v12"
    assert len(resource_name("x" * 100)) == 63
    assert apply(tmp_path / "none.yaml", context=None) is False
