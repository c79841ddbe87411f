"""The MLmodel file of a quantized artifact: MLflow's own tools load the registered version.

The registry's model version points at the quantized artifact in the store (weights, config, tokenizer,
quant_manifest.json), so `mlflow.artifacts.download_artifacts("models:/NAME@champion")` gives a reviewer
the weights themselves, and with this file `mlflow.pyfunc.load_model` loads them through npuflow's runtime
(`npuflow.serving.pyfunc`, npuflow installed beside MLflow) and generates text. A pyfunc over the artifact,
not an MLflow transformers model: the weights are npuflow's quantized layouts (int8/int4 with scales, or
the format an engine loads), which the transformers flavour cannot load, and copying a 70B model into the
MLflow run next to the store's copy would double what a release stores and uploads.

The file is deterministic (no timestamps, uuids or interpreter version), so the artifact's hash depends
only on the weights and this module.
"""

from __future__ import annotations

from pathlib import Path

MLMODEL = "MLmodel"
LOADER_MODULE = "npuflow.serving.pyfunc"
DEFAULT_MAX_TOKENS = 32

_TEXT = f"""\
# An npuflow quantized artifact. Load it with npuflow installed:
#   mlflow.pyfunc.load_model(uri).predict(["a prompt"], params={{"max_tokens": 16}})  -> ["completion"]
# model_config={{"device": "cuda"}} (or "npu") loads it there instead of the CPU. Greedy decoding.
flavors:
  python_function:
    loader_module: {LOADER_MODULE}
    data: .
signature:
  inputs: '[{{"type": "string", "required": true}}]'
  outputs: '[{{"type": "string", "required": true}}]'
  params: '[{{"name": "max_tokens", "type": "long", "default": {DEFAULT_MAX_TOKENS}, "shape": null}}]'
"""


def write_mlmodel(out_dir: Path) -> None:
    (out_dir / MLMODEL).write_text(_TEXT)
