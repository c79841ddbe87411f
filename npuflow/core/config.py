"""Run configuration: frozen pydantic models validated once at the edge, and load_config(path)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from npuflow.core.engines import engine_problem, offline_problem
from npuflow.core.errors import ConfigError

SOURCE_SCHEMES = ("file://", "s3://", "hf://")
TEXT_SCHEMES = ("file://", "s3://", "builtin:")
Device = Literal["cpu", "cuda", "npu"]


def _text_uri(v: str, what: str) -> str:
    if not v.startswith(TEXT_SCHEMES):
        raise ValueError(f"unknown {what} scheme in {v!r}; allowed: {', '.join(TEXT_SCHEMES)}")
    return v


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceConfig(_Frozen):
    """Where the published weights come from."""

    uri: str  # file://PATH | s3://bucket/prefix | hf://org/name@revision
    allow_pickle: bool = False  # accept *.bin / *.pt checkpoints (they can run code when loaded)
    sha256: dict[str, str] = Field(default_factory=dict)  # pinned hashes: file name -> hex sha256
    generate: Literal["tiny-llama"] | None = None  # build the demo model at a file:// uri if missing
    token_env: str = "HF_TOKEN"  # environment variable holding the hub token (never the token itself)

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.startswith(SOURCE_SCHEMES):
            raise ValueError(f"unknown source scheme in {v!r}; allowed: {', '.join(SOURCE_SCHEMES)}")
        if v.startswith("hf://") and not re.fullmatch(r"hf://[\w.-]+/[\w.-]+(@[\w./-]+)?", v):
            raise ValueError(f"{v!r} is not hf://ORG/NAME[@REVISION]")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: dict[str, str]) -> dict[str, str]:
        for name, digest in v.items():
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"sha256 of {name!r} must be 64 lowercase hex characters")
        return v

    @model_validator(mode="after")
    def _generate_needs_file(self) -> SourceConfig:
        if self.generate and not self.uri.startswith("file://"):
            raise ValueError("source.generate builds a local model: it needs a file:// uri")
        return self


class CalibrationConfig(_Frozen):
    """Text that calibrated methods (GPTQ) run through the model to see real activations."""

    text: str = "builtin:tiny-corpus-train"  # file://PATH | s3://bucket/key | builtin:tiny-corpus-train
    samples: int = Field(32, ge=1)  # windows of seq_len tokens
    seq_len: int = Field(128, ge=8)  # tokens per window

    _text_scheme = field_validator("text")(lambda v: _text_uri(v, "calibration text"))


WEIGHT_ONLY = ("w8a16", "w4a16")


class QuantizationConfig(_Frozen):
    """Quantization of the linear layers: weight-only (w8a16, w4a16) or weights and activations (w8a8*)."""

    # w8a16: int8 symmetric per channel; w4a16: int4 asym per group; w8a8: int8 weights per channel and int8
    # activations, one static scale + offset per linear from calibration; w8a8-dynamic: per-token scales at run time
    scheme: Literal["w8a16", "w4a16", "w8a8", "w8a8-dynamic"] = "w8a16"
    group_size: Literal[32, 64, 128] | None = None  # w4a16 only: input channels per scale (default 128)
    method: Literal["rtn", "gptq"] = "rtn"  # round-to-nearest, or GPTQ (calibrated, arXiv:2210.17323)
    calibration: CalibrationConfig = CalibrationConfig()  # used by gptq, sensitivity and fallback auto
    # fnmatch patterns kept in float. Default: the embedding only for the native format's weight-only schemes
    # (lm_head int8 per output channel: half the bytes a CPU decode step reads, ~30% of its time on the 220M
    # Llama; measured in benchmarks/cpu_runtime.py), embedding and lm_head elsewhere (what the engines load)
    ignore: tuple[str, ...] = ("model.embed_tokens", "lm_head")
    # write sensitivity.json: each quantized linear's output error on calibration data (a forward pass of
    # the calibration text, layer by layer); off unless asked, on by default with fallback auto (it needs it)
    sensitivity: bool = False
    fallback: Literal["none", "auto"] = "none"  # auto: keep the most sensitive layers float until gates pass
    fallback_budget: int = Field(4, ge=0)  # at most this many extra float layers (a fused group counts once)
    format: Literal["native", "msmodelslim", "compressed-tensors"] = "native"
    # w8a8 schemes: SmoothQuant migration strength a in s = max|X|^a / max|W|^(1-a) (arXiv:2211.10438); null: none
    smoothquant_alpha: float | None = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("fallback") == "auto" and "sensitivity" not in data:
            data = {**data, "sensitivity": True}  # fallback auto ranks the layers by their sensitivity
        if "ignore" not in data and data.get("format", "native") == "native" and \
                data.get("scheme", "w8a16") in WEIGHT_ONLY:
            data = {**data, "ignore": ("model.embed_tokens",)}  # lm_head quantized (int8: quant.schemes.for_tensor)
        return data

    @model_validator(mode="after")
    def _pairs(self) -> QuantizationConfig:
        import fnmatch

        if self.fallback == "auto" and not self.sensitivity:
            raise ValueError("fallback auto ranks layers by sensitivity: it needs sensitivity: true")
        if self.scheme != "w4a16" and self.group_size is not None:
            raise ValueError(f"group_size applies to w4a16 only: {self.scheme} has one scale per output channel")
        if self.format == "msmodelslim" and self.scheme == "w4a16":
            raise ValueError(
                "format msmodelslim: supported: w8a16, w8a8, w8a8-dynamic (vllm-ascend has no dense W4A16 method); "
                "for w4a16 use format native or compressed-tensors"
            )
        if self.scheme.startswith("w8a8") and self.method != "rtn":
            raise ValueError(f"scheme {self.scheme}: supported method: rtn (weights rounded after SmoothQuant)")
        if self.scheme.startswith("w8a8") and self.sensitivity:  # the report measures weight rounding only
            raise ValueError(
                f"scheme {self.scheme}: sensitivity and fallback auto measure weight-only rounding, not W8A8's "
                "activation quantization, so they are not offered for it; keep layers float by name in "
                "quantization.ignore (down_proj is float by default in W8A8)")
        if self.scheme.startswith("w8a8"):  # activation ranges are calibrated for the decoder linears only
            for module in ("model.embed_tokens", "lm_head"):
                if not any(fnmatch.fnmatch(module, p) for p in self.ignore):
                    raise ValueError(f"scheme {self.scheme}: keep {module} in quantization.ignore (it stays float)")
        # what each serving engine cannot take quantized: msmodelslim has no quantized embedding lookup,
        # vLLM's compressed-tensors quantizes linear layers only (its lm_head is an embedding class)
        must_float = {"msmodelslim": ("model.embed_tokens",),
                      "compressed-tensors": ("model.embed_tokens", "lm_head")}.get(self.format, ())
        for module in must_float:
            if not any(fnmatch.fnmatch(module, p) for p in self.ignore):
                raise ValueError(f"format {self.format}: keep {module} in quantization.ignore (it must stay float)")
        return self


class OfflineConfig(_Frozen):
    """The offline model written with the deployable: prefill ONNX (checked with onnxruntime) and ATC's .om."""

    seq_len: int = Field(128, ge=1)  # static prompt length of the exported graph
    batch_size: int = Field(1, ge=1)  # static batch of the exported graph
    soc_version: str = "Ascend910B2"  # atc --soc_version


class ConvertConfig(_Frozen):
    """The runtime target."""

    device: Device = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the backend's default
    graph: bool = False  # graph mode (torch.compile / torchair); eager when false
    offline: OfflineConfig | None = None  # also export the offline model (ONNX + atc) into the deployable
    tp: int = Field(1, ge=1)  # smoke-test on tp x pp torchrun ranks, each reading only its part (a model
    pp: int = Field(1, ge=1)  # larger than one device); 1 x 1: in this process


class GateConfig(_Frozen):
    """Quality gates against the unquantized reference; a failed gate stops the release."""

    ppl_delta_pct_max: float = 1.0  # candidate perplexity at most this % above the reference
    top1_agreement_min: float = Field(0.95, ge=0, le=1)  # fraction of positions whose argmax agrees
    kl_divergence_max: float = Field(0.05, ge=0)  # mean KL(reference || candidate) per token, nats


class ValidationConfig(_Frozen):
    eval_text: str = "builtin:tiny-corpus"  # file://PATH | s3://bucket/key | builtin:tiny-corpus
    seq_len: int = Field(128, ge=8)  # tokens per evaluation window
    max_tokens: int = Field(8192, ge=64)  # evaluation tokens at most (the text is truncated)
    batch_size: int = Field(8, ge=1)  # windows per forward pass
    tp: int = Field(1, ge=1)  # score candidate and reference on tp x pp torchrun ranks, both sharded the same
    pp: int = Field(1, ge=1)  # way (a 70B fp16 reference then fits the cards the candidate needs); 1 x 1: here
    gates: GateConfig = GateConfig()

    _text_scheme = field_validator("eval_text")(lambda v: _text_uri(v, "eval_text"))


class ScenarioConfig(_Frozen):
    """One benchmark scenario: how many sequences, how long the prompt, how many tokens out."""

    batch_size: int = Field(1, ge=1)  # sequences decoded together
    input_len: int = Field(128, ge=1)  # prompt tokens
    output_len: int = Field(32, ge=2)  # generated tokens, fixed (no early stop)

    @property
    def name(self) -> str:
        return f"bs{self.batch_size}_in{self.input_len}_out{self.output_len}"


class ScenarioMatrix(_Frozen):
    """Scenarios as a product: every batch size x every input length, one output length."""

    batch_sizes: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 4, 16), min_length=1)
    input_lens: tuple[Annotated[int, Field(ge=1)], ...] = Field((512,), min_length=1)
    output_len: int = Field(128, ge=2)

    def expand(self) -> tuple[ScenarioConfig, ...]:
        return tuple(ScenarioConfig(batch_size=b, input_len=n, output_len=self.output_len)
                     for n in self.input_lens for b in self.batch_sizes)


class ServingLoadConfig(_Frozen):
    """The serving scenario of the benchmark: the model behind `npuflow serve` (router + the engine that
    will serve it) under a concurrency sweep, measured with vLLM's `vllm bench serve`."""

    concurrency: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 4, 16), min_length=1)  # requests in flight
    input_len: int = Field(128, ge=1)  # prompt tokens (random tokens, as vLLM's random dataset makes them)
    output_len: int = Field(64, ge=2)  # generated tokens per request, fixed (ignore_eos)
    prompts: int | None = Field(None, ge=1)  # requests per level; None: max(8, 2 x concurrency)
    python: str = ".venv-vllm/bin/python"  # interpreter with vllm installed (`make vllm`); relative: to the cwd
    startup_timeout_s: float = Field(600.0, gt=0)  # the server must answer /health within this
    goodput_ttft_ms: float | None = Field(None, gt=0)  # goodput SLOs; None: the rollout's absolute TTFT p95 limit
    goodput_tpot_ms: float | None = Field(None, gt=0)  # idem for TPOT

    @field_validator("concurrency")
    @classmethod
    def _sorted(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(v)) != len(v):
            raise ValueError("concurrency levels must be distinct")
        return tuple(sorted(v))


class BenchmarkConfig(_Frozen):
    """What to measure. Scenarios, first match wins: `scenarios` (a list), `matrix` (a product), the one
    scenario of batch_size/input_len/output_len when any of them is set, else the default matrix:
    batch 1, 4, 16 x input 512 x output 128 (the reference deployment analysis)."""

    batch_size: int | None = Field(None, ge=1)  # sequences decoded together (one scenario; default 1)
    input_len: int | None = Field(None, ge=1)  # prompt tokens (idem; default 128)
    output_len: int | None = Field(None, ge=2)  # generated tokens, fixed, no early stop (idem; default 32)
    scenarios: tuple[ScenarioConfig, ...] = ()  # measured in order; the first is the primary (unsuffixed)
    matrix: ScenarioMatrix | None = None  # batch_sizes x input_lens x output_len, in that order
    warmup: int = Field(2, ge=0)  # untimed runs first, per scenario
    iterations: int = Field(5, ge=1)  # timed runs at least, per scenario
    min_seconds: float = Field(0.0, ge=0)  # and keep running for at least this many seconds, per scenario
    stability_stdev_pct_max: float = Field(5.0, gt=0)  # TPOT stdev above this % of its mean: `unstable`
    tpot_regression_pct: float = Field(5.0, ge=0)  # regression gate: TPOT p50 at most this % above champion
    # deployment mode the pipeline measures and reports; tensor-parallel and pipeline-parallel run tp x pp
    # torchrun ranks (one device each): tp splits every decoder linear, pp the layers into contiguous stages
    mode: Literal["single", "tensor-parallel", "pipeline-parallel"] = "single"
    tp: int = Field(1, ge=1)  # tensor-parallel ranks per pipeline stage (divides heads, kv heads, the MLP)
    pp: int = Field(1, ge=1)  # pipeline stages (divides num_hidden_layers)
    device_spec: str | None = None  # npuflow.bench.devices key for the roofline peaks; None: from the device name
    serving_load: ServingLoadConfig | None = None  # also measure the served model under load (None: not)

    @model_validator(mode="after")
    def _mode_and_tp(self) -> BenchmarkConfig:
        if self.mode == "tensor-parallel" and self.tp < 2:
            raise ValueError("mode tensor-parallel needs tp >= 2 (ranks)")
        if self.mode == "pipeline-parallel" and self.pp < 2:
            raise ValueError("mode pipeline-parallel needs pp >= 2 (stages)")
        if self.mode == "single" and (self.tp != 1 or self.pp != 1):
            raise ValueError("tp and pp apply to modes tensor-parallel and pipeline-parallel; use tp: 1, pp: 1 "
                             "with mode single")
        return self

    @model_validator(mode="after")
    def _one_way_to_say_scenarios(self) -> BenchmarkConfig:
        given = [k for k, v in (("scenarios", self.scenarios), ("matrix", self.matrix)) if v]
        single = [k for k in ("batch_size", "input_len", "output_len") if getattr(self, k) is not None]
        if len(given) > 1 or (given and single):
            raise ValueError(f"give scenarios one way: {', '.join(given + single)} were all set; use "
                             "`scenarios` (a list), `matrix` (a product) or batch_size/input_len/output_len")
        return self

    @property
    def resolved_scenarios(self) -> tuple[ScenarioConfig, ...]:
        """The scenarios to measure, in order (see the class docstring)."""
        if self.scenarios:
            return self.scenarios
        if self.matrix is not None:
            return self.matrix.expand()
        if (self.batch_size, self.input_len, self.output_len) != (None, None, None):
            return (ScenarioConfig(batch_size=self.batch_size or 1, input_len=self.input_len or 128,
                                   output_len=self.output_len or 32),)
        return ScenarioMatrix().expand()


class PromotionConfig(_Frozen):
    """How much worse than the champion a candidate may be and still take over."""

    ppl_regression_pct: float = Field(1.0, ge=0)  # ppl_candidate at most this % above the champion's
    top1_drop_max: float = Field(0.01, ge=0)  # top1_agreement at most this much below the champion's
    # speed: benchmark.tpot_regression_pct, the report's regression gate, which promotion applies too
    # direct: a candidate that passes takes `champion` at once; rollout: it stays `candidate` and the
    # release flow runs the staged rollout (rollout:) to move it (the first version is promoted directly)
    strategy: Literal["direct", "rollout"] = "direct"

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tpot_regression_pct" in data:
            raise ValueError("tpot_regression_pct moved to benchmark.tpot_regression_pct: one TPOT tolerance "
                             "for the report's regression gate and for promotion; delete it here")
        return data


class SloConfig(_Frozen):
    """What a challenger must meet during a rollout stage (None: that limit is not checked)."""

    error_rate_max: float = Field(0.01, ge=0, le=1)  # errors / requests on the challenger, fraction
    ttft_ms_p95_max: float | None = Field(None, gt=0)  # absolute limit on the challenger's TTFT p95, ms
    tpot_ms_p95_max: float | None = Field(None, gt=0)  # absolute limit on the challenger's TPOT p95, ms
    ttft_regression_pct: float | None = Field(20.0, ge=0)  # TTFT p95 at most this % above the champion's
    tpot_regression_pct: float | None = Field(20.0, ge=0)  # TPOT p95 at most this % above the champion's


class StageConfig(_Frozen):
    """One rollout stage: the challenger's traffic share, how long and how much to watch, its SLOs."""

    name: Literal["shadow", "canary", "full"]  # shadow: mirrored requests, answers from the champion
    weight: float = Field(0.0, ge=0, le=100)  # challenger's share of routed traffic, % (shadow: 0)
    min_duration_s: float = Field(60.0, ge=0)  # watch at least this long, seconds
    min_requests: int = Field(50, ge=1)  # challenger requests at least before a verdict
    max_duration_s: float = Field(600.0, gt=0)  # load generator stops here at the latest, seconds
    max_requests: int = Field(2000, ge=1)  # load generator sends at most this many requests
    slo: SloConfig = SloConfig()

    @model_validator(mode="after")
    def _consistent(self) -> StageConfig:
        if self.name == "shadow" and self.weight != 0:
            raise ValueError("a shadow stage routes no traffic to the challenger: weight must be 0")
        if self.name == "full" and self.weight != 100:
            raise ValueError("the full stage routes all traffic to the challenger: weight must be 100")
        if self.max_duration_s < self.min_duration_s:
            raise ValueError("max_duration_s must be >= min_duration_s")
        return self


class RolloutConfig(_Frozen):
    """Progressive delivery of the candidate against the serving champion (npuflow rollout)."""

    stages: tuple[StageConfig, ...] = (
        StageConfig(name="shadow", weight=0),
        StageConfig(name="canary", weight=10),
        StageConfig(name="canary", weight=50),
        StageConfig(name="full", weight=100),
    )
    max_tokens: int = Field(16, ge=1)  # completion tokens per load-generator request
    concurrency: int = Field(2, ge=1)  # load-generator requests in flight at once
    approval: bool = False  # pause for a human decision before the full stage
    approval_timeout_s: int = Field(3600, gt=0)  # no decision within this many seconds: rejected
    approval_poll_s: int = Field(10, ge=1)  # how often the paused flow checks for a decision, seconds

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: tuple[StageConfig, ...]) -> tuple[StageConfig, ...]:
        if not v:
            raise ValueError("a rollout needs at least one stage")
        if any(s.name == "full" for s in v[:-1]):
            raise ValueError("`full` can only be the last stage")
        return v


class ServingConfig(_Frozen):
    """Which engine serves this release behind the npuflow router (`npuflow serve`): npuflow's own runtime
    (in process; on tp x pp ranks as a child process group when either is > 1), or vLLM as a child process
    per served version (or, for either engine, at a URL someone else runs)."""

    engine: Literal["npuflow", "vllm"] = "npuflow"
    python: str = ".venv-vllm/bin/python"  # vllm: the engine's interpreter (relative: to the working dir); `make vllm`
    url: str | None = None  # connect to this engine instead of starting one; `{version}` is replaced
    tensor_parallel_size: int = Field(1, ge=1)  # vllm --tensor-parallel-size; npuflow: tp ranks (torchrun)
    pipeline_parallel_size: int = Field(1, ge=1)  # vllm --pipeline-parallel-size; npuflow: pp stages (torchrun)
    max_model_len: int | None = Field(None, ge=16)  # vllm --max-model-len (default: the model's context)
    startup_timeout_s: float = Field(300.0, gt=0)  # an engine process's /health must answer within this, seconds
    extra_args: tuple[str, ...] = ()  # more vllm arguments, verbatim (e.g. --enforce-eager: starts faster)
    env: dict[str, str] = Field(default_factory=dict)  # more environment for an engine process (VLLM_CPU_KVCACHE_SPACE, ...)

    VLLM_ONLY: ClassVar[tuple[str, ...]] = ("python", "max_model_len", "extra_args")

    @model_validator(mode="after")
    def _vllm_only(self) -> ServingConfig:
        if self.engine == "npuflow":
            default = ServingConfig.model_construct()
            touched = sorted(k for k in self.VLLM_ONLY if getattr(self, k) != getattr(default, k))
            if touched:
                raise ValueError(f"{', '.join(touched)} configure a vLLM engine: set engine: vllm or delete them")
        if self.url is not None and not re.fullmatch(r"https?://\S+", self.url):
            raise ValueError(f"url must be http(s)://HOST:PORT, got {self.url!r}")
        return self

    @property
    def ranks(self) -> int:
        """Processes (devices) one served version runs on: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


class RunConfig(_Frozen):
    """One release of one model line."""

    name: str  # registered model name in MLflow (one per model line)
    source: SourceConfig
    quantization: QuantizationConfig = QuantizationConfig()
    convert: ConvertConfig = ConvertConfig()
    validation: ValidationConfig = ValidationConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    promotion: PromotionConfig = PromotionConfig()
    rollout: RolloutConfig = RolloutConfig()
    serving: ServingConfig = ServingConfig()

    @model_validator(mode="after")
    def _engine_runs_it(self) -> RunConfig:
        q = self.quantization
        problem = engine_problem(self.serving.engine, self.convert.device, q.scheme, q.format, self.convert.dtype)
        if problem is not None:
            raise ValueError(f"serving: {problem}")
        if self.convert.offline is not None and (why := offline_problem(q.scheme)) is not None:
            raise ValueError(f"convert.offline: {why}")
        return self

    @model_validator(mode="after")
    def _goodput_from_rollout(self) -> RunConfig:
        """The serving scenario's goodput SLOs default to the rollout's strictest absolute p95 limits."""
        load = self.benchmark.serving_load
        if load is None:
            return self
        fill = {}
        for key, limit in (("goodput_ttft_ms", "ttft_ms_p95_max"), ("goodput_tpot_ms", "tpot_ms_p95_max")):
            given = [getattr(st.slo, limit) for st in self.rollout.stages if getattr(st.slo, limit) is not None]
            if getattr(load, key) is None and given:
                fill[key] = min(given)
        if fill:
            bench = self.benchmark.model_copy(update={"serving_load": load.model_copy(update=fill)})
            object.__setattr__(self, "benchmark", bench)  # frozen: set once, while validating
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("name must be letters, digits, '.', '_' or '-' (it keys the registry and store)")
        return v


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at `loc` (for 'unknown key' messages)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def format_validation_error(err: ValidationError, model: type[BaseModel] = RunConfig) -> str:
    """One message that names every bad field and what is allowed there."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; allowed here: {', '.join(_allowed_keys(model, e['loc']))}"
        elif e["type"] == "missing":
            msg = "required but missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, origin: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config {origin}:\n{format_validation_error(err)}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config; raises ConfigError naming each bad field."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass the path of a YAML run config, e.g. configs/tiny-llama-cpu.yaml)")
    try:
        data = yaml.safe_load(p.read_bytes())  # bytes: a bad encoding is a YAMLError too
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from None
    return parse_config(data, origin=str(p))


def flatten(config: BaseModel) -> dict[str, str]:
    """Dotted keys -> string values (MLflow params)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        if isinstance(value, dict) and not value and prefix:
            out[prefix] = "{}"

    walk("", config.model_dump(mode="json"))
    return out
