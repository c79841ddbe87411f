"""Rank-local loading, pipeline- and tensor-parallel ranks (torchrun, gloo on CPU) against one device."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from npuflow.core.config import QuantizationConfig
from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.eval.quality import compare
from npuflow.quant.model import quantize_model
from npuflow.quant.streaming import quantize_dir
from npuflow.runtime.backends import cpu
from npuflow.runtime.engine import Engine
from npuflow.runtime.loader import load_quantized, load_reference
from npuflow.runtime.parallel import shard_llama
from npuflow.runtime.pipeline import init_ranks, launch_task
from npuflow.runtime.scheduler import generate
from npuflow.runtime.shard_load import Placement, load_rank_local, read_local, stage_layers

pytestmark = pytest.mark.integration
# Within 1e-4 relative; the two metrics that are differences of near-equal numbers (ppl delta of ~0.001 %, KL of
# ~1e-6 nats here) also within these absolute bounds: the ranks sum row-parallel partial products in another
# order (float32 rounding, ~1e-8 relative on the perplexities), which a difference amplifies (measured 1.4e-3
# relative on a ppl delta of -0.001 %). The ppl delta's bound, 1e-4 percentage points, is the two perplexity
# ratios within 1e-6 of each other (the 1e-4 relative on the metrics is 1e-2 points): with the int8
# lm_head (the native default) the head's matmul is split by vocabulary rows and BLAS rounds the halves
# differently, measured 6.5e-5 and 1.1e-5 points apart, 6.5e-7 relative on the perplexity.
ABS = {"ppl_delta_pct": 1e-4, "kl_divergence": 1e-8}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ranks share 2 cores (see test_tensor_parallel.py)


@pytest.fixture(scope="module")
def quantized(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, scheme, group, ignore in (("w8a16", "w8a16", None, None), ("w4a16-g32", "w4a16", 32, None),
                                        ("w4a16-g128", "w4a16", 128, None),
                                        ("w8a16-int8-head", "w8a16", None, ("model.embed_tokens",)),
                                        ("w8a16-int8-tables", "w8a16", None, ())):
        d = tmp_path_factory.mktemp(f"pp-{name}")
        extra = {"ignore": ignore} if ignore is not None else {}
        quantize_dir(tiny_model_dir, d, QuantizationConfig(scheme=scheme, group_size=group, **extra))
        out[name] = d
    for scheme in ("w8a8", "w8a8-dynamic"):  # SmoothQuant-calibrated on the demo corpus (the demo model's own)
        d = tmp_path_factory.mktemp(f"pp-{scheme}")
        quantize_model(tiny_model_dir, d, QuantizationConfig(scheme=scheme))
        out[scheme] = d
    return out


def _tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


@pytest.mark.parametrize("name", ["w8a16", "w4a16-g32", "w8a8", "w8a8-dynamic"])
def test_rank_local_reads_equal_the_whole_model_sliced(quantized, name):
    """Each rank's slices, read with get_slice, are exactly what slicing the whole loaded model gives."""
    d = quantized[name]
    for rank in range(2):
        whole = _tensors(shard_llama(load_quantized(d, cpu, torch.float32), rank, 2))
        local = _tensors(load_rank_local(d, cpu, torch.float32, Placement(tp_rank=rank, tp=2)))
        local = {k.replace(".local.", "."): t for k, t in local.items()}  # a quantized table's rows: .local
        assert whole.keys() == local.keys()
        for k, t in whole.items():
            if k.startswith(("model.embed_tokens.", "lm_head.")):  # split by vocabulary rows here
                t = t[rank * 256 : (rank + 1) * 256]  # 512 rows over 2 ranks
            assert torch.equal(t, local[k]), k
    raw, _ = read_local(d, Placement(tp_rank=1, tp=2), tied=False)
    full, _ = read_local(d, Placement(), tied=False)
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert raw[k].numel() * 2 == full[k].numel()  # half of every decoder linear was read
    assert torch.equal(raw["model.layers.0.input_layernorm.weight"], full["model.layers.0.input_layernorm.weight"])


@pytest.mark.parametrize("name", ["w8a16-int8-head", "w8a16-int8-tables"])
def test_quantized_vocab_tables_are_split_by_vocabulary_rows(quantized, name):
    """An int8 lm_head (and embedding) is read by vocabulary rows on each tp rank: qweight and per-row scale
    rows [r*V/2, (r+1)*V/2) of the whole model's, inside the vocab-parallel head / embedding."""
    from npuflow.runtime.loader import QuantLinear, W8Embedding
    from npuflow.runtime.shard_load import VocabParallelEmbedding, VocabParallelHead

    d = quantized[name]
    whole = load_quantized(d, cpu, torch.float32)
    assert isinstance(whole.lm_head, QuantLinear)
    for rank in range(2):
        local = load_rank_local(d, cpu, torch.float32, Placement(tp_rank=rank, tp=2))
        rows = slice(rank * 256, (rank + 1) * 256)
        head = local.lm_head
        assert isinstance(head, VocabParallelHead) and isinstance(head.local, QuantLinear)
        assert torch.equal(head.local.qweight, whole.lm_head.qweight[rows])
        assert torch.equal(head.local.scale, whole.lm_head.scale[rows])
        emb = local.model.embed_tokens
        assert isinstance(emb, VocabParallelEmbedding) and emb.start == rank * 256
        if name == "w8a16-int8-tables":
            assert isinstance(emb.local, W8Embedding) and isinstance(whole.model.embed_tokens, W8Embedding)
            assert torch.equal(emb.local.weight, whole.model.embed_tokens.weight[rows])
            assert torch.equal(emb.local.weight_scale, whole.model.embed_tokens.weight_scale[rows])
        else:
            assert torch.equal(emb.weight, whole.model.embed_tokens.weight[rows])


@pytest.mark.parametrize("name", ["w8a16-int8-head", "w8a16-int8-tables"])
def test_quantized_vocab_tables_decode_like_one_device(quantized, name):
    d = quantized[name]
    prompts = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    single = generate(Engine(load_quantized(d, cpu, torch.float32), max_len=36, slots=2), prompts, 16).tolist()
    got = launch_task("generate", d, "cpu", "float32", 2, 1, {"prompts": prompts.tolist(), "max_new_tokens": 16},
                      timeout_s=240)
    assert got["greedy_tokens"] == single


def test_pipeline_stage_reads_only_its_layers(quantized):
    place = Placement(layers=stage_layers(4, 1, 2), first=False, last=True)
    raw, _ = read_local(quantized["w8a16"], place, tied=False)
    assert not any(k.startswith(("model.embed_tokens", "model.layers.2", "model.layers.3")) for k in raw)
    assert "lm_head.weight" in raw and "model.layers.1.mlp.up_proj.weight" in raw  # layer 3 as local 1
    model = load_rank_local(quantized["w8a16"], cpu, torch.float32, place)
    assert len(model.model.layers) == model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]


@pytest.mark.parametrize(("name", "tp", "pp"), [("w8a16", 2, 1), ("w8a16", 1, 2), ("w4a16-g32", 2, 1),
                                                ("w4a16-g32", 1, 2), ("w8a16", 2, 2)])
def test_greedy_tokens_equal_single_device(quantized, name, tp, pp):
    d = quantized[name]
    prompts = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    single = generate(Engine(load_quantized(d, cpu, torch.float32), max_len=36, slots=2), prompts, 16).tolist()
    got = launch_task("generate", d, "cpu", "float32", tp, pp, {"prompts": prompts.tolist(), "max_new_tokens": 16},
                      timeout_s=240)
    assert got["greedy_tokens"] == single
    assert len(got["ranks"]) == tp * pp and all(r["peak_rss_mb"] > 0 for r in got["ranks"])


@pytest.mark.parametrize("name", ["w8a8", "w8a8-dynamic"])
def test_w8a8_runs_its_int8_gemms_on_tensor_parallel_ranks(quantized, name):
    """W8A8 across 2 ranks: every rank's quantized linears keep their activation quantization (static: the
    whole input's scale and offset), and the greedy tokens are one device's. Static W8A8 sums exact integer
    products; per-token W8A8 quantizes each rank's half of o_proj's input on its own (as vLLM does), so its
    logits differ from one device's by a little, which greedy decoding of the trained demo model absorbs."""
    from npuflow.runtime.loader import QuantLinear

    d = quantized[name]
    single_model = load_quantized(d, cpu, torch.float32)
    local = load_rank_local(d, cpu, torch.float32, Placement(tp_rank=1, tp=2))
    for path in ("self_attn.q_proj", "self_attn.o_proj"):
        ql = local.model.layers[0].get_submodule(path)
        ql = getattr(ql, "inner", ql)  # o_proj: inside its RowParallel
        whole = single_model.model.layers[0].get_submodule(path)
        assert isinstance(ql, QuantLinear) and ql.act == whole.act == ("tensor" if name == "w8a8" else "token")
        assert ql.scale.dtype == torch.float32
        if name == "w8a8":
            assert torch.equal(ql.input_scale, whole.input_scale) and torch.equal(ql.input_offset, whole.input_offset)
    prompts = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    single = generate(Engine(single_model, max_len=36, slots=2), prompts, 16).tolist()
    got = launch_task("generate", d, "cpu", "float32", 2, 1, {"prompts": prompts.tolist(), "max_new_tokens": 16},
                      timeout_s=240)
    assert got["greedy_tokens"] == single


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_validation_metrics_across_ranks_equal_single_device(quantized, tiny_model_dir, tp, pp):
    """Candidate and fp32 reference both sharded the same way (a 70B reference then fits the same cards)."""
    d = quantized["w8a16"]
    windows = torch.randint(3, 500, (4, 48), generator=torch.Generator().manual_seed(1))
    single = compare(load_reference(tiny_model_dir, cpu.device()), load_quantized(d, cpu, torch.float32), windows,
                     2, cpu.device())
    got = launch_task("validate", d, "cpu", "float32", tp, pp,
                      {"reference": str(tiny_model_dir), "windows": windows.tolist(), "batch_size": 2}, timeout_s=240)
    for k, v in single.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=ABS.get(k, 0.0)), k


@pytest.mark.parametrize(("name", "tp", "pp", "message"), [
    ("w8a16", 3, 1, "num_attention_heads = 4 does not split over tp = 3; choose a tp that divides 4"),
    ("w8a16", 4, 1, "num_key_value_heads = 2 does not split over tp = 4; choose a tp that divides 2"),
    ("w8a16", 1, 3, "num_hidden_layers = 4 does not split over pp = 3; choose a pp that divides 4"),
    ("w4a16-g128", 2, 1, "do not split into whole int4 groups of 128; use a tp or group_size that does"),
])
def test_a_layout_that_does_not_divide_fails_before_any_rank_starts(quantized, name, tp, pp, message):
    started = time.monotonic()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        launch_task("generate", quantized[name], "cpu", "float32", tp, pp, {"prompts": [[5]], "max_new_tokens": 2})
    assert time.monotonic() - started < 2  # no torchrun was started


def test_a_rendezvous_that_times_out_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 1 never comes
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 2000))
    started = time.monotonic()
    with pytest.raises(NpuflowError, match=r"rendezvous at 127\.0\.0\.1:\d+ failed within 2 s .*1/2 clients joined"):
        init_ranks("cpu", 2, 1, timeout_s=2)
    assert time.monotonic() - started < 20


def test_a_rank_that_dies_fails_the_run_with_its_rank_instead_of_a_hang(quantized):
    failure: dict[str, BaseException] = {}

    def run() -> None:
        try:
            launch_task("generate", quantized["w8a16"], "cpu", "float32", 1, 2,
                        {"prompts": [[5] * 20], "max_new_tokens": 200}, timeout_s=120)
        except NpuflowError as e:
            failure["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    victim, deadline = None, time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if "npuflow.runtime.pipeline" in cmd and "torch.distributed.run" not in cmd \
                        and p.environ().get("RANK") == "1":
                    victim = p
            except psutil.Error:
                continue
        time.sleep(0.2)
    assert victim is not None, "rank 1 never started"
    time.sleep(3)  # joined and loading or generating
    victim.send_signal(signal.SIGKILL)
    thread.join(timeout=90)
    assert not thread.is_alive()
    assert "rank 1 died (killed by signal 9); the other ranks were stopped" in str(failure["error"])


def test_the_validate_stage_scores_on_tp_ranks_as_on_one_device(quantized, tiny_model_dir):
    """validation: {tp: 2} runs the stage's scoring on 2 ranks; its metrics equal one device's."""
    from npuflow.core.config import ValidationConfig
    from npuflow.core.text import load_eval_text, make_windows
    from npuflow.runtime.loader import load_tokenizer
    from npuflow.stages.validate import score

    tok = load_tokenizer(tiny_model_dir)
    windows = make_windows(tok(load_eval_text("builtin:tiny-corpus"))["input_ids"], 64, 512)
    args = (tiny_model_dir, quantized["w8a16"], windows)
    one = score(*args, ValidationConfig(seq_len=64, max_tokens=512, batch_size=4), "cpu", torch.float32,
                torch.float32)
    two = score(*args, ValidationConfig(seq_len=64, max_tokens=512, batch_size=4, tp=2), "cpu", torch.float32,
                torch.float32)
    assert one["eval_tokens"] == two["eval_tokens"] > 400
    for k, v in one.items():
        assert two[k] == pytest.approx(v, rel=1e-4, abs=ABS.get(k, 0.0)), k


def test_the_convert_smoke_test_runs_on_the_configured_ranks(quantized):
    """convert: {tp: 2} / {pp: 2}: the smoke forward on the ranks, the fingerprint of one device's."""
    from npuflow.core.config import ConvertConfig
    from npuflow.stages.convert import smoke_test, smoke_test_ranks

    model = load_quantized(quantized["w8a16"], cpu, torch.float32)
    one = smoke_test(model, model.config.vocab_size, cpu.device())
    assert smoke_test_ranks(quantized["w8a16"], ConvertConfig(tp=2), torch.float32) == one
    assert smoke_test_ranks(quantized["w8a16"], ConvertConfig(pp=2), torch.float32) == one


def test_the_benchmark_runs_pipeline_parallel_and_reports_every_rank(quantized):
    from npuflow.bench.measure import make_prompt
    from npuflow.bench.parallel import launch
    from npuflow.core.config import BenchmarkConfig

    cfg = BenchmarkConfig(batch_size=2, input_len=32, output_len=8, warmup=0, iterations=1, mode="pipeline-parallel",
                          pp=2)
    result = launch(quantized["w8a16"], "cpu", "float32", cfg, timeout_s=240)
    assert result["devices"] == 2 and result["mode"] == "pipeline-parallel" and (result["tp"], result["pp"]) == (1, 2)
    assert [(r["stage"], r["tp_rank"]) for r in result["ranks"]] == [(0, 0), (1, 0)]
    assert all(r["rank_weight_bytes"] < result["weight_bytes"] and r["peak_rss_mb"] > 0 for r in result["ranks"])
    model = load_quantized(quantized["w8a16"], cpu, torch.float32)
    prompt = make_prompt(cfg.resolved_scenarios[0], model.config.vocab_size, cpu.device())
    single = generate(Engine(model, max_len=prompt.shape[1] + 8, slots=2), prompt, 8).tolist()
    assert result["greedy_tokens"] == single
