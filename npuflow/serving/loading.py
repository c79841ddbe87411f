"""A registered version loaded for serving: its weights from the store, checked, with its engine."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from npuflow.core.artifacts import Deployable, QuantizedArtifact, load_manifest, materialize
from npuflow.core.errors import ConfigError, IntegrityError, NpuflowError
from npuflow.core.names import Alias, Runtime, Tag, runtime_label
from npuflow.core.store import open_store
from npuflow.registry import client as registry
from npuflow.runtime.backends import get_backend
from npuflow.runtime.engine import Engine
from npuflow.runtime.loader import DTYPES, load_quantized, load_tokenizer, stop_token_ids
from npuflow.serving.generation import Batcher, on_own_thread
from npuflow.serving.loaded import LoadedModel
from npuflow.serving.options import ServeOptions
from npuflow.serving.pool import ModelPool
from npuflow.serving.remote import EngineProcess, RanksProcess, RemoteEngine, VllmProcess, connect

log = logging.getLogger("npuflow.serve")


def _find_quantized(deployable: Deployable, location: dict[str, str], store_uri: str):
    """The quantized weights' manifest and store: the configured store first, then the recorded one."""
    roots = [store_uri]
    uri, key = location.get("uri", ""), location.get("key", "")
    if key and uri.endswith(key):
        roots.append(uri[: -len(key)].rstrip("/"))
    for root in dict.fromkeys(roots):
        store = open_store(root)
        found = load_manifest(store, deployable.quantized_key, QuantizedArtifact)
        if found is not None:
            if found.manifest_sha256 != deployable.quantized_manifest_sha256:  # the chain: version tag ->
                raise IntegrityError(  # deployable (checked by deployable_of) -> this manifest -> file hashes
                    f"the quantized weights' manifest at {store.url(deployable.quantized_key)} is not the one "
                    f"this version was registered with (sha256 {found.manifest_sha256[:12]}…, registered "
                    f"{deployable.quantized_manifest_sha256[:12]}…): the store was modified after the release; "
                    "not serving it. Re-run the release to republish, or restore the store")
            return found, store
    raise NpuflowError(
        f"the quantized weights {deployable.quantized_key} are not in {' or '.join(dict.fromkeys(roots))}; "
        "re-run the release or point NPUFLOW_STORE_URI at the store that holds them"
    )


KV_SHARE = {"cpu": 0.5, "default": 0.9}  # of the memory free once the weights are in, for the KV cache


def kv_budget_bytes(device: torch.device) -> int:
    """The KV cache a version may allocate when --kv-cache-gib is not given: half the host memory available
    on the CPU (the host runs everything else too), 90% of the accelerator memory free after the weights."""
    if device.type == "cpu":
        return int(_host_available_bytes() * KV_SHARE["cpu"])
    free, _ = getattr(torch, device.type).mem_get_info(device)  # torch.cuda / torch.npu
    return int(free * KV_SHARE["default"])


def _host_available_bytes() -> int:
    """The kernel's MemAvailable (free plus reclaimable page cache); free pages where /proc is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_slots(cfg, dtype: torch.dtype, context: int, max_batch: int, budget: int, label: str = "?") -> int:
    """KV cache slots (sequences decoded together) within `budget` bytes: max_batch, or fewer (logged) when
    max_batch sequences of the full context do not fit; NpuflowError naming the fix when one does not.

    The engine's cache is static: every slot holds K and V for the whole context in every layer, so a
    Llama-2-7B (32 layers, 32 kv heads of 128, 4096 tokens, fp16) needs 2 GiB a slot and 32 GiB for 16."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_slot = 2 * cfg.num_hidden_layers * kv_heads * head_dim * context * dtype.itemsize
    gib = 2**30
    if per_slot > budget:
        raise NpuflowError(f"version {label}: one sequence of its {context}-token context needs "
                           f"{per_slot / gib:.2f} GiB of KV cache and the budget is {budget / gib:.2f} GiB: give "
                           "--kv-cache-gib a larger budget or free memory on the device")
    slots = min(max_batch, budget // per_slot)
    if slots < max_batch:
        log.warning("version %s: %d KV cache slots of --max-batch %d fit the %.2f GiB budget (%.2f GiB each); "
                    "raise --kv-cache-gib for more", label, slots, max_batch, budget / gib, per_slot / gib)
    return int(slots)


def load_version(c, version: registry.ModelVersion, opts: ServeOptions) -> LoadedModel:
    """Load a registered version's quantized weights with its deployable's device and dtype."""
    deployable, location = registry.deployable_of(c, version)
    quantized, store = _find_quantized(deployable, location, opts.store_uri)
    model_dir = materialize(store, quantized.key, quantized.files, opts.cache_dir)
    return load_dir(model_dir, version, deployable, opts)


def load_dir(model_dir: Path, version: registry.ModelVersion, deployable: Deployable,
             opts: ServeOptions) -> LoadedModel:
    """The quantized model in model_dir on the deployable's device, checked to answer (a prefill and a
    decode step through its engine; graph mode compiles here), with its engine thread started; or, for a
    deployable served by vLLM, or by npuflow on tp x pp ranks (serving.tensor_parallel_size /
    pipeline_parallel_size), that engine started (or connected to) and checked to answer."""
    if deployable.engine not in ("npuflow", "vllm"):
        raise NpuflowError(f"{version.name} version {version.version}: unknown serving engine "
                           f"{deployable.engine!r} in its deployable (known: npuflow, vllm)")
    if deployable.engine == "vllm" or opts.serving.ranks > 1 or opts.serving.url is not None:
        return load_remote(model_dir, version, deployable, opts)
    return on_own_thread(_load_local, model_dir, version, deployable, opts)  # the engine thread: OpenMP's only user


def _load_local(model_dir: Path, version: registry.ModelVersion, deployable: Deployable,
                opts: ServeOptions) -> LoadedModel:
    backend = get_backend(deployable.device)
    graph = deployable.runtime == Runtime.NPUFLOW_GRAPH
    model = load_quantized(model_dir, backend, DTYPES[deployable.dtype])  # graph mode: the engine compiles
    tokenizer = load_tokenizer(model_dir)
    cfg = model.config
    context = int(cfg.max_position_embeddings)
    budget = int(opts.kv_cache_gib * 2**30) if opts.kv_cache_gib else kv_budget_bytes(backend.device())
    slots = kv_slots(cfg, DTYPES[deployable.dtype], context, opts.max_batch, budget, version.version)
    engine = Engine(model, max_len=context, slots=slots, compile=graph)
    lm = serve_engine(engine, tokenizer, version, deployable, opts)
    log.info("loaded %s version %s (%s, %s) from %s", version.name, version.version, deployable.device,
             deployable.dtype, model_dir)
    return lm


def serve_engine(engine: Engine, tokenizer, version: registry.ModelVersion, deployable: Deployable,
                 opts: ServeOptions) -> LoadedModel:
    """The engine checked to answer (a prefill and a decode step; graph mode compiles here) and its engine
    thread started: the LoadedModel the pool serves (in `npuflow serve`, and on rank 0 of tp x pp ranks)."""
    with torch.inference_mode():
        logits = engine.prefill(0, [tokenizer.bos_token_id or 0])  # (1, V)
        one = torch.ones(1, 1, dtype=torch.long, device=logits.device)
        logits = torch.cat([logits, engine.step(0, logits.argmax(-1, keepdim=True), one)])
    if not torch.isfinite(logits).all():
        raise NpuflowError(f"{version.name} version {version.version} produced NaN/Inf logits when loaded")
    cfg = engine.model.config
    return LoadedModel(version=version, deployable=deployable, model=engine.model, tokenizer=tokenizer, engine=engine,
                       batcher=Batcher(engine, version.version, max_request_s=opts.max_request_s),
                       device=engine.device, context=engine.max_len, eos=stop_token_ids(cfg.eos_token_id, tokenizer),
                       vocab_size=int(cfg.vocab_size))


def load_remote(model_dir: Path, version: registry.ModelVersion, deployable: Deployable,
                opts: ServeOptions) -> LoadedModel:
    """A version served by an engine at a URL: vLLM, or npuflow's own engine on tp x pp ranks (serving/ranks.py),
    started on model_dir as a child process group (or the one at serving.url connected to), one completion
    checked; only the tokenizer loads in the router (prompt checks, chat template)."""
    import json

    from npuflow.runtime.pipeline import check_model_layout

    cfg = opts.serving
    hf = json.loads((model_dir / "config.json").read_text())
    context = min(int(hf.get("max_position_embeddings", 2048)), cfg.max_model_len or 1 << 30)
    kind = "vLLM" if deployable.engine == "vllm" else "npuflow"
    tokenizer = load_tokenizer(model_dir)
    process: EngineProcess | None = None
    if cfg.url is not None:
        url, served = connect(cfg.url, version.version, kind)
    else:
        served = f"{version.name}-v{version.version}"
        log_path = opts.cache_dir / "engines" / f"{served}.log"
        if deployable.engine == "vllm":
            process = VllmProcess(cfg, model_dir, served, deployable.device, deployable.dtype, context, log_path)
        else:
            check_model_layout(model_dir, cfg.tensor_parallel_size, cfg.pipeline_parallel_size)  # before a rank starts
            process = RanksProcess(cfg, model_dir, served, deployable.device, deployable.dtype, context, log_path,
                                   graph=deployable.runtime == Runtime.NPUFLOW_GRAPH, max_batch=opts.max_batch,
                                   kv_cache_gib=opts.kv_cache_gib, max_tokens_limit=opts.max_tokens_limit,
                                   max_request_s=opts.max_request_s)
        url = process.start()
    remote = RemoteEngine(url, served, process, request_timeout_s=opts.max_request_s,
                          kind="vllm" if kind == "vLLM" else "npuflow")
    try:
        _probe(url, served, tokenizer.bos_token_id or 0, f"{version.name} version {version.version}", process,
               kind)
    except BaseException:
        remote.close()
        raise
    log.info("serving %s version %s with %s at %s (%s, %s, tp %d x pp %d) from %s", version.name, version.version,
             remote.kind, url, deployable.device, deployable.dtype, cfg.tensor_parallel_size,
             cfg.pipeline_parallel_size, model_dir)
    return LoadedModel(version=version, deployable=deployable, model=None, engine=None, batcher=None,
                       tokenizer=tokenizer, device=torch.device("cpu"), context=context,
                       eos=stop_token_ids(hf.get("eos_token_id"), tokenizer), remote=remote,
                       vocab_size=int(hf.get("vocab_size", 0)))


def _probe(url: str, served: str, token: int, what: str, process: EngineProcess | None = None,
           kind: str = "vLLM") -> None:
    """One two-token completion through the engine, or NpuflowError naming what it answered (and, for an
    engine npuflow started, what its log says went wrong)."""
    import httpx

    try:
        probe = httpx.post(f"{url}/v1/completions", timeout=120,
                           json={"model": served, "prompt": [token], "max_tokens": 2})
    except httpx.HTTPError as err:
        raise NpuflowError(f"{what}: the {kind} engine at {url} did not answer its first completion: {err}") from None
    if probe.status_code != 200:
        raise NpuflowError(f"{what}: the {kind} engine at {url} failed its first completion "
                           f"({probe.status_code}): {probe.text[:500]}{process.failure_hint() if process else ''}")


def directory_pool(opts: ServeOptions, model_dir: Path, device: str = "cpu", dtype: str = "auto",
                   graph: bool = True, engine: str = "npuflow") -> ModelPool:
    """A pool serving one quantized directory as the champion, without a registry (`npuflow serve
    --model DIR [--engine vllm]`: trying a model, benchmarking the server)."""
    version, deployable = directory_version(model_dir, opts.name, device, dtype, graph, engine)
    return ModelPool(opts, resolve=lambda alias: version if alias == Alias.CHAMPION else None,
                     load=lambda v: load_dir(model_dir, v, deployable, opts), where=str(model_dir))


def directory_version(model_dir: Path, name: str, device: str, dtype: str, graph: bool,
                      engine: str) -> tuple[registry.ModelVersion, Deployable]:
    """A quantized directory as the champion version "local" and its deployable (no registry, no convert stage):
    the manifest's hash stands for the artifact's; a ConfigError when it is not quantized or the engine cannot
    run it."""
    import hashlib
    import json

    from npuflow.core.engines import engine_dtype, engine_problem
    from npuflow.runtime.loader import resolve_dtype

    manifest = model_dir / "quant_manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"{model_dir} is not a quantized model directory (no quant_manifest.json); "
                          "run `npuflow quantize` first")
    quant = json.loads(manifest.read_text())
    problem = engine_problem(engine, device, str(quant.get("scheme")), str(quant.get("format", "native")), dtype)
    if problem is not None:
        raise ConfigError(f"{model_dir}: {problem}")
    backend = get_backend(device)
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    dt = str(resolve_dtype(engine_dtype(engine, device, dtype), backend)).removeprefix("torch.")
    deployable = Deployable(uri=model_dir.resolve().as_uri(), key="local", name=name, quantized_manifest_sha256=sha,
                            quantized_key="local", device=device, device_name=backend.device_name(),
                            runtime=runtime_label(graph), dtype=dt, kernels={}, versions={}, smoke_logits_sha256="",
                            engine=engine)
    version = registry.ModelVersion(name=name, version="local", aliases=[Alias.CHAMPION], run_id=None,
                                    tags={Tag.ARTIFACT_SHA256: sha})
    return version, deployable


def registry_pool(opts: ServeOptions):
    """The pool serving `opts.name` from the MLflow registry at opts.tracking_uri."""
    c = registry.client(opts.tracking_uri)
    return ModelPool(opts, resolve=lambda alias: registry.by_alias(c, opts.name, alias),
                     load=lambda version: load_version(c, version, opts), where=opts.tracking_uri)
