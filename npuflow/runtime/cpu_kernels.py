"""npuflow's own CPU kernels (cpu_kernels.cpp), compiled on first use and loaded as torch ops:
torch.ops.npuflow_cpu.decode_attention (one query per row over the KV cache blocks) and
torch.ops.npuflow_cpu.int8_linear and int4_linear (the weight-only products of a decode step) and
int4_dequantize (the bf16 weight of a 4-bit linear, for prefill GEMMs), each with a fake
(meta) implementation so that torch.compile traces them as single opaque calls.

`problem()` builds the source once per machine with the system C++ compiler against the installed torch
(g++ -O3 -march=native: the host the runtime runs on), caches the library under
$NPUFLOW_KERNEL_CACHE (default ~/.cache/npuflow/kernels) keyed by a hash of the source, the flags and the
torch version, publishes it with an atomic rename (concurrent processes each build and one rename wins),
and loads it with torch.ops.load_library. Without a compiler, or when the build fails, it says why and the
runtime keeps its pure-torch path (`problem()`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w"]

_state: dict[str, str | None] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("NPUFLOW_KERNEL_CACHE", Path.home() / ".cache" / "npuflow" / "kernels"))


def _compiler() -> str | None:
    return next((cc for cc in ("c++", "g++", "clang++") if shutil.which(cc)), None)


def _command(cc: str, out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [cc, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *[f"-I{p}" for p in include_paths()], str(SOURCE),
            "-o", str(out), *[f"-L{p}" for p in library_paths()], "-lc10", "-ltorch_cpu",
            *[f"-Wl,-rpath,{p}" for p in library_paths()]]


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++) on PATH: install one (Debian: g++)")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + torch.__version__.encode()
                         + sys.version.encode()).hexdigest()[:16]
    lib = cache_dir() / f"npuflow_cpu_{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        done = subprocess.run(_command(cc, Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, lib)  # published whole, or not at all
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _register_fakes() -> None:
    @torch.library.register_fake("npuflow_cpu::decode_attention")
    def _(query, key, value, mask, scaling):
        b, h, _, d = query.shape
        return query.new_empty(b, 1, h, d)

    @torch.library.register_fake("npuflow_cpu::int8_linear")
    def _(x, w, scale):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("npuflow_cpu::int4_linear")
    def _(x, packed, scales, group_size):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("npuflow_cpu::int4_dequantize")
    def _(packed, scales, group_size):
        return packed.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.bfloat16)


def problem() -> str | None:
    """None when the kernels are loaded (built first if needed), else why not (once per process)."""
    if "problem" not in _state:
        if os.environ.get("NPUFLOW_CPU_KERNELS", "1") == "0":
            _state["problem"] = "turned off (NPUFLOW_CPU_KERNELS=0)"
        else:
            try:
                torch.ops.load_library(str(_build()))
                _register_fakes()
                _state["problem"] = None
            except (RuntimeError, OSError) as e:
                _state["problem"] = str(e)
    return _state["problem"]


def available() -> bool:
    return problem() is None
