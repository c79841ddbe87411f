"""ModelPool and the completions serving class without MLflow or HTTP: the pool is handed an alias
resolver (a dict here) and a loader (the demo model, quantized and loaded for real)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from npuflow.core.artifacts import Deployable
from npuflow.core.errors import NpuflowError
from npuflow.core.names import Alias, Role, Tag
from npuflow.registry.client import ModelVersion
from npuflow.runtime.engine import Engine, SamplingParams
from npuflow.runtime.scheduler import stream
from npuflow.serving.completions import ServingCompletions
from npuflow.serving.generation import Batcher, Run
from npuflow.serving.loaded import LoadedModel
from npuflow.serving.metrics import ServeMetrics
from npuflow.serving.options import ServeOptions
from npuflow.serving.pool import ModelPool
from npuflow.serving.protocol import ApiError, ChatCompletionRequest


class Registry:
    """Aliases in a dict and a loader that records what it loaded; versions in `broken` fail to load."""

    def __init__(self, demo_model, **aliases: str):
        self.model, self.tokenizer = demo_model
        self.aliases = dict(aliases)
        self.broken: set[str] = set()
        self.loaded: list[str] = []

    def resolve(self, alias: str) -> ModelVersion | None:
        v = self.aliases.get(alias)
        return None if v is None else ModelVersion(name="tiny", version=v, aliases=[alias], run_id=None,
                                                   tags={Tag.ARTIFACT_SHA256: f"sha-{v}"})

    def load(self, version: ModelVersion) -> LoadedModel:
        if version.version in self.broken:
            raise NpuflowError(f"weights of v{version.version} are corrupt")
        self.loaded.append(version.version)
        dep = Deployable(uri="file:///x", key="k", name="tiny", quantized_manifest_sha256="q", quantized_key="q",
                         device="cpu", device_name="cpu", runtime="npuflow-eager", dtype="float32", kernels={},
                         versions={}, smoke_logits_sha256="s")
        return LoadedModel(version=version, deployable=dep, model=self.model, engine=(engine := Engine(self.model, 256, slots=4)),
                           batcher=Batcher(engine, version.version),
                           tokenizer=self.tokenizer, device=torch.device("cpu"), context=256,
                           eos=frozenset({self.tokenizer.eos_token_id}))


def _pool(reg: Registry, **opts) -> ModelPool:
    o = ServeOptions(name="tiny", tracking_uri="memory", store_uri="memory", cache_dir=Path("/nonexistent"), **opts)
    return ModelPool(o, resolve=reg.resolve, load=reg.load, where="the test registry")


def test_champion_and_challenger_serve_with_their_weights(demo_model) -> None:
    reg = Registry(demo_model, champion="1", candidate="2")
    pool = _pool(reg, champion_weight=50, challenger_weight=50)
    state = pool.reload()
    assert state["status"] == "ok" and state["errors"] == []
    assert (state["champion"]["version"], state["challenger"]["version"]) == ("1", "2")
    assert state["challenger"]["artifact_sha256"] == "sha-2"
    picks = Counter()
    for _ in range(400):
        _, lm = pool.acquire()
        picks[lm.label] += 1
        pool.release(lm)
    assert 160 < picks["2"] < 240  # 50/50 with a seeded RNG
    assert pool.acquire(Role.CHAMPION)[1].label == "1" and pool.acquire(Role.CHALLENGER)[1].label == "2"


def test_no_champion_anywhere_is_an_error_naming_the_registry(demo_model) -> None:
    with pytest.raises(NpuflowError, match="no `champion` alias in the test registry"):
        _pool(Registry(demo_model)).reload()


def test_a_champion_that_fails_to_load_never_replaces_the_one_serving(demo_model) -> None:
    reg = Registry(demo_model, champion="1")
    pool = _pool(reg)
    pool.reload()
    reg.aliases[Alias.CHAMPION], reg.broken = "3", {"3"}
    state = pool.reload()
    assert state["champion"]["version"] == "1" and state["status"] == "degraded"
    assert "champion version 3 failed to load" in state["errors"][0] and "1 keeps serving" in state["errors"][0]
    assert pool.acquire()[1].label == "1"


def test_a_challenger_that_fails_to_load_is_out_of_rotation(demo_model) -> None:
    reg = Registry(demo_model, champion="1", candidate="2")
    reg.broken = {"2"}
    pool = _pool(reg, challenger_weight=100)
    state = pool.reload()
    assert state["challenger"]["status"] == "out_of_rotation" and "corrupt" in state["challenger"]["reason"]
    assert pool.effective_weights()[Role.CHALLENGER] == 0.0
    assert {pool.acquire()[1].label for _ in range(20)} == {"1"}  # every request to the champion (not released)
    with pytest.raises(ApiError) as err:
        pool.acquire(Role.CHALLENGER)
    assert err.value.status == 503 and "corrupt" in err.value.message


def test_promotion_reuses_the_loaded_challenger_and_drops_a_self_challenger(demo_model) -> None:
    reg = Registry(demo_model, champion="1", candidate="2")
    pool = _pool(reg)
    pool.reload()
    reg.aliases = {Alias.CHAMPION: "2", Alias.CANDIDATE: "2"}  # the candidate was promoted
    state = pool.reload()
    assert reg.loaded == ["1", "2"]  # v2 was not loaded a second time
    assert state["champion"]["version"] == "2" and pool.challenger.model is None
    assert [e["event"] for e in pool.events][-2:] == ["champion", "challenger removed"]


def test_in_flight_limit_and_release(demo_model) -> None:
    pool = _pool(Registry(demo_model, champion="1"), max_in_flight=2)
    pool.reload()
    first = pool.acquire()[1]
    pool.acquire()
    with pytest.raises(ApiError) as err:
        pool.acquire()
    assert err.value.status == 503 and err.value.type == "overloaded"
    pool.release(first)
    assert pool.acquire()[1].in_flight == 2


def test_taking_out_a_replaced_challenger_changes_nothing(demo_model) -> None:
    reg = Registry(demo_model, champion="1", candidate="2")
    pool = _pool(reg)
    pool.reload()
    old = pool.challenger.model
    reg.aliases[Alias.CANDIDATE] = "3"
    pool.reload()
    pool.take_out(old, "v2 failed to answer")  # a late failure of the version that was replaced
    assert pool.challenger.model is not None and pool.challenger.model.label == "3"


# ---- the completions serving class, without HTTP -----------------------------------------------------


@pytest.fixture
def serving(demo_model) -> ServingCompletions:
    pool = _pool(Registry(demo_model, champion="1", candidate="2"), max_tokens_limit=64)
    pool.reload()
    return ServingCompletions(pool, ServeMetrics(), pool.opts)


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"model": "tiny", "prompt": "a", "temprature": 0}, 400, "temprature", "not a field of this API"),
    ({"model": "tiny", "prompt": "a", "n": 2}, 400, "n", "not supported"),
    ({"model": "tiny", "prompt": "a", "seed": 2**64}, 400, "seed", "less than or equal"),
    ({"model": "tiny", "prompt": "a", "seed": -1}, 400, "seed", "greater than or equal"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 65}, 400, "max_tokens", "1..64"),
    ({"model": "tiny", "prompt": "a", "temperature": 3}, 400, "temperature", "less than or equal"),
    ({"model": "tiny"}, 400, "prompt", "required"),
    ({"model": "other", "prompt": "a"}, 404, "model", "tiny@champion"),
])
def test_bad_requests_are_refused_before_any_model_work(serving, body, status, param, words) -> None:
    with pytest.raises(ApiError) as err:
        serving.parse(body)
    assert (err.value.status, err.value.param) == (status, param) and words in err.value.message


def test_a_prompt_past_the_context_is_a_400(serving) -> None:
    req, _ = serving.parse({"model": "tiny", "prompt": "the cat " * 200, "max_tokens": 64})
    with pytest.raises(ApiError, match="exceeds the model's context of 256"):
        serving.prompt_ids(serving.pool.champion.model, req)


def test_create_answers_with_the_engines_text_usage_and_the_version(serving) -> None:
    req, pin = serving.parse({"model": "tiny@challenger", "prompt": "the cat sees", "max_tokens": 8,
                              "temperature": 0})
    resp = asyncio.run(serving.create(req, pin, 0.0))
    body = json.loads(resp.body)
    lm = serving.pool.challenger.model
    ids = lm.tokenizer("the cat sees")["input_ids"]
    expected = list(stream(Engine(lm.model, 256), ids, SamplingParams(max_tokens=8, stop_token_ids=lm.eos)))
    assert resp.headers["x-model-version"] == "2" and resp.headers["x-model-role"] == "challenger"
    assert body["choices"][0]["text"] == lm.tokenizer.decode(expected, skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                             "total_tokens": len(ids) + len(expected)}
    assert body["choices"][0]["finish_reason"] == ("length" if len(expected) == 8 else "stop")
    assert lm.in_flight == 0  # released


def _greedy_text(lm: LoadedModel, ids: list[int], n: int) -> str:
    toks = list(stream(Engine(lm.model, 256), ids, SamplingParams(max_tokens=n, stop_token_ids=lm.eos)))
    return lm.tokenizer.decode(toks, skip_special_tokens=True)


def test_a_stop_string_ends_the_text_before_it(serving) -> None:
    lm = serving.pool.champion.model
    full = _greedy_text(lm, lm.tokenizer("the cat sees")["input_ids"], 24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    req, pin = serving.parse({"model": "tiny@champion", "prompt": "the cat sees", "max_tokens": 24, "temperature": 0,
                              "stop": [stop, "never-appears"]})
    body = json.loads(asyncio.run(serving.create(req, pin, 0.0)).body)
    assert body["choices"][0]["text"] == full[: full.index(stop)] and body["choices"][0]["finish_reason"] == "stop"


def test_chat_renders_the_chat_template_and_streams_usage_last(serving) -> None:
    lm = serving.pool.champion.model
    messages = [{"role": "user", "content": "what color is the apple ?"}]
    ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    expected = _greedy_text(lm, ids, 10)
    req, pin = serving.parse({"model": "tiny@champion", "messages": messages, "max_tokens": 10, "temperature": 0},
                             ChatCompletionRequest)
    body = json.loads(asyncio.run(serving.create(req, pin, 0.0)).body)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant",
                                                                                    "content": expected}
    assert body["usage"]["prompt_tokens"] == len(ids)
    req, pin = serving.parse({"model": "tiny@champion", "messages": messages, "max_tokens": 10, "temperature": 0,
                              "stream": True, "stream_options": {"include_usage": True}}, ChatCompletionRequest)

    async def events() -> list[str]:
        resp = await serving.create(req, pin, 0.0)
        return [chunk async for chunk in resp.body_iterator]

    chunks = asyncio.run(events())
    assert chunks[-1] == "data: [DONE]\n\n"
    data = [json.loads(c.removeprefix("data: ")) for c in chunks[:-1]]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in data if d["choices"]) == expected
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] > 0
    assert serving.pool.champion.model.in_flight == 0


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 1e-30}, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_chat_requests_are_400s(serving, body, param) -> None:
    with pytest.raises(ApiError) as err:
        serving.parse(body, ChatCompletionRequest)
    assert (err.value.status, err.value.param) == (400, param)


def test_token_id_prompts_outside_the_vocabulary_are_400s(serving) -> None:
    req, _ = serving.parse({"model": "tiny", "prompt": [1, 2, 10**6]})
    with pytest.raises(ApiError, match="prompt token ids must be"):
        serving.prompt_ids(serving.pool.champion.model, req)


def test_an_engine_thread_outlives_a_request_whose_event_loop_is_gone(serving) -> None:
    """Tokens for a request nobody waits for (its loop closed) cancel it; the engine goes on serving."""
    lm = serving.pool.champion.model

    async def leave_after_first_token() -> None:
        run = Run(lm.batcher, lm.tokenizer("the cat")["input_ids"], SamplingParams(max_tokens=200))
        lm.batcher.submit(run)
        assert (await run.next())[0] == "token"  # the loop closes with the run still generating

    asyncio.run(leave_after_first_token())
    deadline = time.monotonic() + 10
    while lm.batcher.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lm.batcher.busy() and lm.batcher.alive()
    req, pin = serving.parse({"model": "tiny@champion", "prompt": "the dog", "max_tokens": 4, "temperature": 0})
    assert json.loads(asyncio.run(serving.create(req, pin, 0.0)).body)["usage"]["completion_tokens"] == 4


def test_the_kv_cache_is_sized_to_its_budget(caplog) -> None:
    """Llama-2-7B's static cache: 2 GiB a slot at 4096 tokens in fp16. A budget for 2.5 slots gives 2 (a
    warning names the flag); one below a slot is refused, naming --kv-cache-gib."""
    from transformers import LlamaConfig

    from npuflow.core.errors import NpuflowError
    from npuflow.serving.loading import kv_slots

    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008)
    gib = 2**30
    assert kv_slots(cfg, torch.float16, 4096, 16, 40 * gib) == 16
    with caplog.at_level("WARNING", logger="npuflow.serve"):
        assert kv_slots(cfg, torch.float16, 4096, 16, 5 * gib, "3") == 2
    assert "2 KV cache slots of --max-batch 16" in caplog.text and "--kv-cache-gib" in caplog.text
    gqa = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    assert kv_slots(gqa, torch.float16, 4096, 16, 5 * gib) == 10  # 8 kv heads: a quarter of the bytes
    with pytest.raises(NpuflowError, match=r"needs 2\.00 GiB of KV cache.*--kv-cache-gib"):
        kv_slots(cfg, torch.float16, 4096, 16, gib)
