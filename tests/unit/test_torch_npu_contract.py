"""Contract with torch_npu 2.13.0, read from its wheel as text (never imported): our references and our calls."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from npuflow.runtime.backends import npu_ops

TORCH_NPU = "torch_npu==2.13.0"
WHEEL_GLOB = "torch_npu-2.13.0-*.whl"
DOCS = "torch_npu/_op_plugin_docs.py"  # every documented op: `torch_npu.<op>(<params>) -> <ret>` in its docstring
SCHEMA = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"  # `func: <op>(<params>) -> <ret>`, all ops
ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("npuflow", "tasks", "flows")
WHEEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "npuflow" / "wheels"
WHEEL_DIRS = (Path(os.environ.get("NPUFLOW_WHEEL_DIR", WHEEL_CACHE)), WHEEL_CACHE, Path("/tmp/tnpu"))
# The ops the NPU runtime and DESIGN.md rely on; each must have a reference.
RUNTIME_OPS = {
    "npu_rms_norm", "npu_add_rms_norm", "npu_add_rms_norm_cast", "npu_rotary_mul", "npu_apply_rotary_pos_emb",
    "npu_fusion_attention", "npu_incre_flash_attention", "npu_fused_infer_attention_score", "npu_swiglu",
    "npu_weight_quant_batchmatmul", "npu_convert_weight_to_int4pack",
    "npu_quant_matmul", "npu_dynamic_quant", "npu_quantize", "npu_trans_quant_param",  # W8A8
}
REQUIRED = object()  # a parameter without a default


@dataclass(frozen=True)
class Param:
    name: str
    default: object  # REQUIRED, or the parsed default
    kw_only: bool


@dataclass(frozen=True)
class Signature:
    op: str
    params: tuple[Param, ...]
    source: str  # "docs" or "schema" (undocumented op, from the codegen yaml)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]


# ---- reading the wheel ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def torch_npu_wheel() -> Path:
    """The torch_npu 2.13.0 wheel: a local copy, else `pip download --no-deps` into ~/.cache/npuflow/wheels."""
    for folder in WHEEL_DIRS:
        found = sorted(folder.glob(WHEEL_GLOB))
        if found:
            return found[0]
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(WHEEL_CACHE),
           TORCH_NPU]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot download {TORCH_NPU} from PyPI: {err}")
    found = sorted(WHEEL_CACHE.glob(WHEEL_GLOB))
    if proc.returncode or not found:
        pytest.skip(f"cannot download {TORCH_NPU} from PyPI: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return found[0]


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # e.g. a C++ spelling; compared as text


def parse_params(text: str) -> tuple[Param, ...]:
    """`Tensor self, Tensor? x=None, *, int k=0` -> Params; torch's Python binding exposes a Tensor `self` as `input`."""
    params, kw_only = [], False
    for part in _split_top(text):
        if part == "*":
            kw_only = True
            continue
        decl, eq, default = part.partition("=")
        words = decl.split()
        name = words[-1]
        if name == "self" and (len(words) == 1 or words[0].startswith("Tensor")):
            name = "input"  # torchgen/api/python.py: "s/self/input/ outside method bindings"
        params.append(Param(name, _literal(default.strip()) if eq else REQUIRED, kw_only))
    return tuple(params)


def _balanced(text: str, open_at: int) -> int:
    """Index of the parenthesis closing the one at `open_at`."""
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError("unbalanced parentheses")


def docs_signatures(docs_source: str) -> dict[str, Signature]:
    """The prototype line in each `_add_torch_npu_docstr("<op>", doc)` call's doc (the last call for an op wins)."""
    out: dict[str, Signature] = {}
    for node in ast.walk(ast.parse(docs_source)):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_add_torch_npu_docstr"):
            continue
        op, doc = (a.value for a in node.args[:2])
        head = re.compile(rf"^[ \t]*(?:func:\s*)?(?:torch_npu\.)?{re.escape(op)}\(", re.M)
        for match in head.finditer(doc):
            close = _balanced(doc, match.end() - 1)
            if re.match(r"\s*->", doc[close + 1 :]):
                out[op] = Signature(op, parse_params(doc[match.end() : close]), "docs")
                break
    return out


def schema_signatures(schema_text: str) -> dict[str, Signature]:
    """`func: <op>(<params>) -> <ret>` lines of the codegen yaml (overloads `<op>.<name>` skipped)."""
    out: dict[str, Signature] = {}
    for op, params in re.findall(r"func: (\w+)\((.*)\) ->", schema_text):
        out.setdefault(op, Signature(op, parse_params(params), "schema"))
    return out


@pytest.fixture(scope="session")
def signatures(torch_npu_wheel) -> dict[str, Signature]:
    """Documented signatures; ops that exist in 2.13.0 but have no doc entry come from the schema yaml."""
    with zipfile.ZipFile(torch_npu_wheel) as wheel:
        docs = docs_signatures(wheel.read(DOCS).decode("utf-8"))
        schema = schema_signatures(wheel.read(SCHEMA).decode("utf-8"))
    return {**schema, **docs}


# ---- (a) references ----------------------------------------------------------------------------------------------


def _reference_ops() -> dict[str, object]:
    """npu_ops functions named like torch_npu ops (`npu_*`); helpers are `_private` or not `npu_`-prefixed."""
    return {
        name: fn for name, fn in inspect.getmembers(npu_ops, inspect.isfunction)
        if name.startswith("npu_") and fn.__module__ == npu_ops.__name__
    }


def _same_default(documented: object, ours: object) -> bool:
    if documented is REQUIRED or ours is inspect.Parameter.empty:
        return documented is REQUIRED and ours is inspect.Parameter.empty
    if documented is None or isinstance(documented, bool) or isinstance(ours, bool):
        return documented is ours
    if isinstance(documented, int | float) and isinstance(ours, int | float):
        return float(documented) == float(ours)
    return documented == ours


def test_the_docs_parse_into_the_ops_we_know(signatures):
    documented = {op for op, sig in signatures.items() if sig.source == "docs"}
    assert len(documented) > 150
    wqbmm = signatures["npu_weight_quant_batchmatmul"]
    assert wqbmm.names == ["x", "weight", "antiquant_scale", "antiquant_offset", "quant_scale", "quant_offset",
                           "bias", "antiquant_group_size", "inner_precise"]
    assert signatures["npu_rms_norm"].params[0] == Param("input", REQUIRED, False)  # documented as `Tensor self`
    assert signatures["npu_add_rms_norm"].source == "schema"  # exists in 2.13.0, no doc entry


def test_every_runtime_op_has_a_reference():
    assert RUNTIME_OPS <= _reference_ops().keys()


@pytest.mark.parametrize("op", sorted(_reference_ops()))
def test_reference_signature_matches_torch_npu(op, signatures):
    assert op in signatures, f"npu_ops.{op} names no torch_npu 2.13.0 op"
    theirs = signatures[op].params
    ours = list(inspect.signature(_reference_ops()[op]).parameters.values())
    assert [p.name for p in ours] == [p.name for p in theirs], f"{op}: parameter names/order differ"
    for mine, doc in zip(ours, theirs, strict=True):
        assert _same_default(doc.default, mine.default), f"{op}({mine.name}): default {mine.default!r} vs {doc.default!r}"
        assert (mine.kind is inspect.Parameter.KEYWORD_ONLY) == doc.kw_only, f"{op}({mine.name}): keyword-only differs"


# ---- (b) calls in the project's source ------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCall:
    where: str  # path:line
    op: str
    positional: int
    keywords: tuple[str, ...]
    unpacked: bool  # *args or **kwargs: not checkable


def _is_op_namespace(node: ast.expr, op: str) -> bool:
    """torch_npu.<op>, torch.ops.npu.<op>, and <op> on an `ops` / `npu_ops` object (torch_npu or the references)."""
    if isinstance(node, ast.Name):
        return node.id == "torch_npu" or (node.id in ("ops", "npu_ops") and op.startswith("npu_"))
    return ast.unparse(node) == "torch.ops.npu"


def op_calls(source: str, where: str) -> list[OpCall]:
    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            op = node.func.attr
            if _is_op_namespace(node.func.value, op):
                calls.append(OpCall(
                    f"{where}:{node.lineno}", op,
                    positional=sum(not isinstance(a, ast.Starred) for a in node.args),
                    keywords=tuple(k.arg for k in node.keywords if k.arg is not None),
                    unpacked=any(isinstance(a, ast.Starred) for a in node.args) or any(
                        k.arg is None for k in node.keywords),
                ))
    return calls


def call_problems(call: OpCall, signatures: dict[str, Signature]) -> list[str]:
    sig = signatures.get(call.op)
    if sig is None:
        return [f"{call.where}: torch_npu.{call.op} is not an op of torch_npu 2.13.0"]
    if call.unpacked:
        return [f"{call.where}: {call.op} called with *args/**kwargs; spell the arguments out so they can be checked"]
    positional = [p.name for p in sig.params if not p.kw_only]
    problems = []
    if call.positional > len(positional):
        problems.append(f"{call.where}: {call.op} takes {len(positional)} positional arguments, got {call.positional}")
    unknown = sorted(set(call.keywords) - set(sig.names))
    if unknown:
        problems.append(f"{call.where}: {call.op} has no parameter {unknown}; it takes {sig.names}")
    doubled = sorted(set(call.keywords) & set(positional[: call.positional]))
    if doubled:
        problems.append(f"{call.where}: {call.op} gets {doubled} both by position and by keyword")
    given = set(positional[: call.positional]) | set(call.keywords)
    absent = [p.name for p in sig.params if p.default is REQUIRED and p.name not in given]
    if absent:
        problems.append(f"{call.where}: {call.op} misses required {absent}")
    return problems


def project_calls() -> list[OpCall]:
    calls = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            calls += op_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return calls


def test_project_torch_npu_calls_match_the_signatures(signatures):
    calls = project_calls()
    found = {(c.where.split(":")[0], c.op) for c in calls}
    assert ("npuflow/runtime/backends/npu.py", "npu_weight_quant_batchmatmul") in found  # the walker sees the backend
    assert ("npuflow/runtime/backends/npu_model.py", "npu_incre_flash_attention") in found  # ... and the model swap
    problems = [p for call in calls for p in call_problems(call, signatures)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "complaint"),
    [
        ("torch_npu.npu_rms_norm(x, w, eps=1e-6)", "no parameter ['eps']"),
        ("torch_npu.npu_rms_norm(self=x, gamma=w)", "no parameter ['self']"),  # the binding calls it `input`
        ("ops.npu_incre_flash_attention(q, k, v, 8)", "takes 3 positional arguments"),
        ("torch.ops.npu.npu_swiglu(dim=-1)", "misses required ['input']"),
        ("torch_npu.npu_flash_attention(q, k, v)", "not an op"),
        ("torch_npu.npu_swiglu(*args)", "*args/**kwargs"),
    ],
)
def test_the_call_check_catches_wrong_calls(source, complaint, signatures):
    problems = [p for call in op_calls(source, "snippet") for p in call_problems(call, signatures)]
    assert any(complaint in p for p in problems), problems
