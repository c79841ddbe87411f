"""tp x pp layouts before any rank starts: what divides, which tensor each rank reads, the 70B plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from npuflow.bench.plan import plan_layout
from npuflow.core.config import BenchmarkConfig, load_config
from npuflow.core.errors import ConfigError
from npuflow.runtime.pipeline import Layout, check_layout, rank_failure
from npuflow.runtime.shard_load import Placement, local_name, split_dim, stage_layers

ROOT = Path(__file__).resolve().parents[2]
LLAMA_70B = {"num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
             "num_hidden_layers": 80, "hidden_size": 8192}


@pytest.mark.parametrize(("tp", "pp", "message"), [
    (3, 1, "num_attention_heads = 64 does not split over tp = 3; choose a tp that divides 64"),
    (16, 1, "num_key_value_heads = 8 does not split over tp = 16; choose a tp that divides 8"),
    (1, 3, "num_hidden_layers = 80 does not split over pp = 3; choose a pp that divides 80"),
])
def test_a_layout_that_does_not_divide_the_model_is_refused(tp, pp, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(LLAMA_70B, tp, pp)


def test_int4_groups_stay_whole_on_every_rank():
    check_layout(LLAMA_70B, 8, 1, group_size=128)  # o_proj 8192 / 8 = 1024, down_proj 28672 / 8 = 3584
    with pytest.raises(ConfigError, match=r"down_proj.s 28672 input features over tp = 8 \(3584 each\) do not split into whole int4 groups of 1024"):
        check_layout(LLAMA_70B, 8, 1, group_size=1024)


def test_layout_ranks_and_stage_layers():
    grid = [Layout(r, tp=2, pp=2) for r in range(4)]
    assert [(x.stage, x.tp_rank) for x in grid] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert grid[1].peer(1) == 3 and grid[3].logits_src == 2
    assert stage_layers(80, 3, 4) == range(60, 80)


def test_each_rank_reads_its_slices_and_only_its_stage():
    col, row = "model.layers.5.self_attn.q_proj.weight", "model.layers.5.mlp.down_proj.weight"
    assert split_dim(col, 2, 8) == 0 and split_dim(row, 2, 8) == 1
    assert split_dim("model.layers.5.mlp.down_proj.weight_scale", 1, 8) is None  # per output row: whole
    assert split_dim("model.layers.5.mlp.down_proj.weight_scale", 2, 4) == 1  # int4 groups: whole groups
    assert split_dim("model.layers.5.mlp.down_proj.bias", 1, None) is None  # added once after all_reduce
    assert split_dim("model.embed_tokens.weight", 2, None) is None
    second = Placement(layers=range(4, 8), first=False, last=True)
    assert local_name(col, second, tied=False) == "model.layers.1.self_attn.q_proj.weight"
    assert local_name("model.layers.3.input_layernorm.weight", second, tied=False) is None
    assert local_name("model.embed_tokens.weight", second, tied=False) is None
    assert local_name("model.embed_tokens.weight", second, tied=True) == "lm_head.weight"
    assert local_name("lm_head.weight", Placement(layers=range(4), first=True, last=False), tied=False) is None


def test_rank_failure_names_the_rank_a_signal_killed():
    stderr = ("[rank0]: RuntimeError: Connection closed by peer\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\nRoot Cause (first observed "
              "failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 42)  (SIGKILL)\n")
    assert rank_failure(stderr) == "rank 1 died (killed by signal 9); the other ranks were stopped"
    assert rank_failure("[rank1]: npuflow.core.errors.ConfigError: bad tp\nChildFailedError: x\n") == \
        "npuflow.core.errors.ConfigError: bad tp"


def test_benchmark_modes_and_their_rank_counts():
    assert BenchmarkConfig(mode="pipeline-parallel", pp=2, tp=2).pp == 2
    for bad, message in (({"mode": "pipeline-parallel"}, "pipeline-parallel needs pp >= 2"),
                         ({"pp": 2}, "tp and pp apply to modes tensor-parallel and pipeline-parallel")):
        with pytest.raises(ValueError, match=message):
            BenchmarkConfig(**bad)


def test_the_70b_config_validates_and_plans_a_layout_that_fits_910b_cards():
    cfg = load_config(ROOT / "configs" / "llama-2-70b-npu.yaml")
    b = cfg.benchmark
    check_layout(LLAMA_70B, b.tp, b.pp)
    layout = plan_layout("llama-2-70b", "ascend-910b2", cfg.quantization.scheme, b.tp, b.pp, context=4096,
                         batch=16)
    assert layout["devices"] == b.tp * b.pp == 4 and layout["min_devices"] == 2 and layout["fits"]
    # ~68.7 GB of w8a16 linears / 4 + a quarter of the fp16 embedding and lm_head (0.52 GB each) per card
    assert 17.3 < layout["per_device_weights_gb"] < 17.6 and layout["per_device_gb"] < layout["usable_gb"]
    assert not plan_layout("llama-2-70b", "ascend-910b2", "w8a16", 1, 1)["fits"]  # one card cannot hold it
