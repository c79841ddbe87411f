"""Run config: every shipped YAML loads; bad configs fail at the edge naming the field and the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from npuflow.core.config import BenchmarkConfig, RunConfig, flatten, load_config, parse_config
from npuflow.core.errors import ConfigError

CONFIG_DIR = Path(__file__).parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))

MINIMAL = "name: t\nsource:\n  uri: file:///tmp/model\n"


def _load_error(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.exit_code == 2  # bad input, not a failed stage
    return info.value


# ---------------------------------------------------------------------------------------------- shipped configs


def test_configs_are_shipped() -> None:
    # guards the parametrized test below against silently running zero cases
    assert "tiny-llama-cpu.yaml" in [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert isinstance(cfg, RunConfig)
    assert cfg.name == raw["name"]
    assert cfg.source.uri == raw["source"]["uri"]
    assert cfg.convert.device == raw["convert"]["device"]
    # the resolved config round-trips through its JSON form (what MLflow and Prefect store)
    assert parse_config(cfg.model_dump(mode="json")) == cfg


def test_demo_config_values() -> None:
    cfg = load_config(CONFIG_DIR / "tiny-llama-cpu.yaml")
    assert cfg.source.generate == "tiny-llama"
    assert cfg.quantization.ignore == ("model.embed_tokens",)  # lm_head int8: the native default
    assert cfg.validation.gates.top1_agreement_min == 0.95
    assert cfg.benchmark.min_seconds == 0.0  # default filled in


# ---------------------------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    ("text", "field", "allowed"),
    [
        pytest.param(
            MINIMAL + "bogus: 1\n",
            "bogus: unknown key",
            ["benchmark", "convert", "name", "promotion", "quantization", "source", "validation"],
            id="unknown-top-level-key",
        ),
        pytest.param(
            MINIMAL + "quantization:\n  bogus: 1\n",
            "quantization.bogus: unknown key",
            ["format", "ignore", "scheme"],
            id="unknown-nested-key",
        ),
        pytest.param(
            MINIMAL + "validation:\n  gates:\n    ppl_max: 1\n",
            "validation.gates.ppl_max: unknown key",
            ["kl_divergence_max", "ppl_delta_pct_max", "top1_agreement_min"],
            id="unknown-key-two-levels-down",
        ),
        pytest.param(
            MINIMAL + "benchmark:\n  batch_size: x\n",
            "benchmark.batch_size:",
            ["valid integer"],
            id="wrong-type",
        ),
        pytest.param(
            MINIMAL + "benchmark:\n  output_len: 1\n",
            "benchmark.output_len:",
            ["greater than or equal to 2"],
            id="out-of-range",
        ),
        pytest.param("name: t\n", "source: required but missing", [], id="missing-source"),
        pytest.param(
            MINIMAL + "convert:\n  device: tpu\n", "convert.device:", ["'cpu'", "'cuda'", "'npu'"], id="unknown-device"
        ),
        pytest.param(
            MINIMAL + "quantization:\n  scheme: w3a16\n", "quantization.scheme:", ["'w8a16'", "'w4a16'"], id="unknown-scheme"
        ),
        pytest.param(
            "name: t\nsource:\n  uri: ftp://x\n",
            "source.uri: unknown source scheme in 'ftp://x'",
            ["file://", "s3://", "hf://"],
            id="unknown-source-scheme",
        ),
        pytest.param(
            "name: t\nsource:\n  uri: hf://only-a-name\n",
            "source.uri:",
            ["hf://ORG/NAME[@REVISION]"],
            id="malformed-hf-uri",
        ),
        pytest.param(
            MINIMAL + "  sha256:\n    model.safetensors: abc123\n",
            "source.sha256: sha256 of 'model.safetensors'",
            ["64 lowercase hex"],
            id="short-sha256-pin",
        ),
        pytest.param(
            MINIMAL + "  sha256:\n    model.safetensors: " + "AB" * 32 + "\n",
            "source.sha256: sha256 of 'model.safetensors'",
            ["64 lowercase hex"],
            id="uppercase-sha256-pin",
        ),
        pytest.param(
            "name: t\nsource:\n  uri: s3://bucket/model\n  generate: tiny-llama\n",
            "source:",
            ["needs a file:// uri"],
            id="generate-needs-file-uri",
        ),
        pytest.param(
            MINIMAL + "validation:\n  eval_text: http://example.com/t.txt\n",
            "validation.eval_text: unknown eval_text scheme",
            ["file://", "s3://", "builtin:"],
            id="unknown-eval-text-scheme",
        ),
        pytest.param(
            "name: has space\nsource:\n  uri: file:///tmp/model\n", "name:", ["letters, digits"], id="bad-name"
        ),
    ],
)
def test_bad_config_names_field_and_allowed_values(tmp_path: Path, text: str, field: str, allowed: list[str]) -> None:
    message = str(_load_error(tmp_path, text))
    assert str(tmp_path / "run.yaml") in message  # which file
    assert f"  {field}" in message, message
    for word in allowed:
        assert word in message, f"{word!r} missing from: {message}"


def test_every_bad_field_is_reported_at_once(tmp_path: Path) -> None:
    message = str(_load_error(tmp_path, MINIMAL + "convert:\n  device: tpu\nbenchmark:\n  warmup: -1\nextra: 1\n"))
    assert "convert.device:" in message
    assert "benchmark.warmup:" in message
    assert "extra: unknown key" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml") as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.exit_code == 2


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path)


def test_invalid_yaml(tmp_path: Path) -> None:
    message = str(_load_error(tmp_path, "name: t\nsource: [unclosed\n"))
    assert "is not valid YAML" in message


def test_utf8_comments_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes((MINIMAL + "# café — 模型\n").encode())
    assert load_config(path).name == "t"


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9 (latin-1)\n")
    with pytest.raises(ConfigError, match=r"run\.yaml"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "got"),
    [("- name: t\n- source: x\n", "got list"), ("just a string\n", "got str"), ("", "got NoneType")],
    ids=["list", "scalar", "empty-file"],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    message = str(_load_error(tmp_path, text))
    assert "expected a mapping at the top level" in message and got in message


# ---------------------------------------------------------------------------------------------- frozen + flatten


def test_config_is_frozen() -> None:
    cfg = load_config(CONFIG_DIR / "tiny-llama-cpu.yaml")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.convert.device = "npu"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.validation.gates.top1_agreement_min = 0.0  # type: ignore[misc]
    assert cfg.convert.device == "cpu"


def test_flatten_gives_dotted_string_keys() -> None:
    cfg = load_config(CONFIG_DIR / "tiny-llama-cpu.yaml")
    flat = flatten(cfg)
    assert flat["name"] == "tiny-llama"
    assert flat["convert.device"] == "cpu"
    assert flat["validation.gates.top1_agreement_min"] == "0.95"
    assert flat["benchmark.warmup"] == "2" and flat["benchmark.output_len"] == "None"  # scenarios listed
    assert flat["quantization.ignore"] == "model.embed_tokens"
    assert all(isinstance(v, str) for v in flat.values())
    assert not any(isinstance(v, dict) for v in flat.values())
    # every leaf of the config is there, and only leaves
    assert {"source", "convert", "validation", "validation.gates"}.isdisjoint(flat)
    leaves = {
        "source.uri", "source.allow_pickle", "source.generate", "source.token_env",
        "quantization.scheme", "quantization.format",
        "convert.dtype", "convert.graph",
        "validation.eval_text", "validation.seq_len", "validation.max_tokens", "validation.batch_size",
        "validation.gates.ppl_delta_pct_max", "validation.gates.kl_divergence_max",
        "benchmark.batch_size", "benchmark.input_len", "benchmark.warmup", "benchmark.iterations",
        "benchmark.min_seconds",
        "promotion.ppl_regression_pct", "promotion.top1_drop_max", "benchmark.tpot_regression_pct",
    }
    assert leaves <= set(flat), leaves - set(flat)


def test_flatten_sha256_pins_by_file_name(tmp_path: Path) -> None:
    pin = "0" * 64
    path = tmp_path / "run.yaml"
    path.write_text(MINIMAL + f"  sha256:\n    model.safetensors: '{pin}'\n")
    assert flatten(load_config(path))["source.sha256.model.safetensors"] == pin


# ---------------------------------------------------------------------------------------------- benchmark scenarios


def test_benchmark_default_is_the_reference_matrix() -> None:
    names = [s.name for s in BenchmarkConfig().resolved_scenarios]
    assert names == ["bs1_in512_out128", "bs4_in512_out128", "bs16_in512_out128"]


def test_benchmark_matrix_single_and_list() -> None:
    m = BenchmarkConfig(matrix={"batch_sizes": [1, 2], "input_lens": [64, 128], "output_len": 16})
    assert [s.name for s in m.resolved_scenarios] == ["bs1_in64_out16", "bs2_in64_out16", "bs1_in128_out16",
                                                     "bs2_in128_out16"]
    assert [s.name for s in BenchmarkConfig(input_len=64).resolved_scenarios] == ["bs1_in64_out32"]
    listed = BenchmarkConfig(scenarios=[{"batch_size": 4, "input_len": 8, "output_len": 2}])
    assert [s.name for s in listed.resolved_scenarios] == ["bs4_in8_out2"]


@pytest.mark.parametrize("body", [
    {"input_len": 64, "scenarios": [{}]},
    {"matrix": {}, "scenarios": [{}]},
    {"matrix": {}, "batch_size": 2},
    {"matrix": {"batch_sizes": []}},
])
def test_benchmark_scenarios_said_two_ways_are_refused(body: dict) -> None:
    with pytest.raises(ValueError):
        BenchmarkConfig(**body)


# ---------------------------------------------------------------------------------------------- serving engine


def _serving(serving: dict, quantization: dict | None = None, convert: dict | None = None) -> dict:
    return {"name": "t", "source": {"uri": "file:///tmp/model"}, "serving": serving,
            "quantization": quantization or {}, "convert": convert or {}}


def test_serving_defaults_to_the_npuflow_engine() -> None:
    cfg = parse_config({"name": "t", "source": {"uri": "file:///tmp/model"}})
    assert cfg.serving.engine == "npuflow"
    assert flatten(cfg)["serving.engine"] == "npuflow"


def test_vllm_on_cpu_with_w4a16_compressed_tensors_is_accepted() -> None:
    cfg = parse_config(_serving({"engine": "vllm", "extra_args": ["--enforce-eager"], "tensor_parallel_size": 1},
                                {"scheme": "w4a16", "format": "compressed-tensors"}))
    assert cfg.serving.extra_args == ("--enforce-eager",)


@pytest.mark.parametrize(("quantization", "convert", "needle"), [
    ({"scheme": "w8a16", "format": "native"}, {"device": "cpu"}, "vLLM CPU has no W8A16 kernel"),
    ({"scheme": "w8a16", "format": "compressed-tensors"}, {"device": "cpu"}, "scheme: w4a16, format: compressed-tensors"),
    ({"scheme": "w4a16", "format": "compressed-tensors"}, {"device": "cpu", "dtype": "float32"}, "convert.dtype auto or bfloat16"),
    ({"scheme": "w4a16", "format": "native"}, {"device": "cuda"}, "scheme: w8a16, format: compressed-tensors"),
    ({"scheme": "w4a16", "format": "compressed-tensors"}, {"device": "npu"}, "scheme: w8a16, format: msmodelslim"),
])
def test_an_engine_scheme_device_triple_vllm_cannot_run_is_refused_naming_what_it_can(
        quantization: dict, convert: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_serving({"engine": "vllm"}, quantization, convert))
    assert needle in str(info.value) and "engine vllm" in str(info.value)


def test_vllm_on_cuda_and_ascend_accept_their_formats() -> None:
    parse_config(_serving({"engine": "vllm"}, {"scheme": "w8a16", "format": "compressed-tensors"}, {"device": "cuda"}))
    parse_config(_serving({"engine": "vllm"}, {"scheme": "w8a16", "format": "msmodelslim"}, {"device": "npu"}))


def test_vllm_settings_without_engine_vllm_are_refused() -> None:
    with pytest.raises(ConfigError, match="extra_args configure a vLLM engine: set engine: vllm"):
        parse_config(_serving({"extra_args": ["--enforce-eager"]}))


def test_the_npuflow_engine_takes_tensor_and_pipeline_parallel_sizes() -> None:
    cfg = parse_config(_serving({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}))
    assert cfg.serving.engine == "npuflow" and cfg.serving.ranks == 4


@pytest.mark.parametrize("serving", [{"engine": "sglang"}, {"engine": "vllm", "url": "ftp://x"},
                                     {"engine": "vllm", "tensor_parallel_size": 0}, {"engine": "vllm", "gpus": 2}])
def test_bad_serving_sections_are_refused(serving: dict) -> None:
    with pytest.raises(ConfigError, match="serving"):
        parse_config(_serving(serving, {"scheme": "w4a16", "format": "compressed-tensors"}))


def test_the_serving_load_scenario_takes_goodput_slos_from_the_rollout_unless_given() -> None:
    base = {"name": "m", "source": {"uri": "file:///tmp/m"}}
    stages = [{"name": "canary", "weight": 10, "slo": {"ttft_ms_p95_max": 900, "tpot_ms_p95_max": 80}},
              {"name": "full", "weight": 100, "slo": {"ttft_ms_p95_max": 700}}]
    cfg = parse_config({**base, "benchmark": {"serving_load": {"concurrency": [16, 1, 4]}},
                        "rollout": {"stages": stages}})
    load = cfg.benchmark.serving_load
    assert load.concurrency == (1, 4, 16) and (load.goodput_ttft_ms, load.goodput_tpot_ms) == (700, 80)
    given = parse_config({**base, "benchmark": {"serving_load": {"goodput_ttft_ms": 250}}, "rollout": {"stages": stages}})
    assert given.benchmark.serving_load.goodput_ttft_ms == 250
    assert parse_config(base).benchmark.serving_load is None  # off unless asked for
    with pytest.raises(ConfigError, match="concurrency levels must be distinct"):
        parse_config({**base, "benchmark": {"serving_load": {"concurrency": [4, 4]}}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({**base, "benchmark": {"serving_load": {"users": 4}}})
