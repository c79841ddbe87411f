#!/usr/bin/env bash
# Build the separate llama.cpp virtualenv from infra/llamacpp/requirements.txt.
# Usage: infra/llamacpp/install.sh [VENV_DIR]   (default: .venv-llamacpp in the repo root)
# Idempotent: a stamp named after the sha256 of requirements.txt and this script is written inside
# the venv; when it is present the script exits at once.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
req="$here/requirements.txt"
venv="${1:-.venv-llamacpp}"
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac

hash="$(cat "$req" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
stamp="$venv/.npuflow-llamacpp-$hash"
if [[ -f "$stamp" ]]; then
    echo "llama.cpp venv up to date: $venv"
    exit 0
fi

python3 -m venv "$venv"
# Keep the venv out of git even without a .gitignore entry.
echo '*' > "$venv/.gitignore"
py="$venv/bin/python"
"$py" -m pip install --upgrade pip

# Native CPU build of llama.cpp: tuned for this host's ISA (AVX2/AVX-512/AMX where present), OpenMP
# threads, and every GPU backend off so the build never looks for (or links) CUDA, ROCm, Vulkan, Metal.
# The library is therefore not portable to an older CPU: rebuild per host (delete the venv).
export CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DGGML_CUDA=OFF -DGGML_HIP=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_SYCL=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export FORCE_CMAKE=1
# --no-binary: always the source build above, never a prebuilt wheel from some index.
"$py" -m pip install --no-binary llama-cpp-python -r "$req"

"$py" - <<'PY'
import gguf
import llama_cpp

info = llama_cpp.llama_print_system_info().decode()
assert "CUDA" not in info, f"llama.cpp was built with CUDA: {info}"
print("llama-cpp-python", llama_cpp.__version__, "gguf", gguf.__version__ if hasattr(gguf, "__version__") else "?")
print(info)
PY

rm -f "$venv"/.npuflow-llamacpp-*
touch "$stamp"
echo "llama.cpp venv ready: $venv"
