"""No unmarked host synchronisation, and no unexplained host tensor, on the engine's step path.

On CUDA a ``.item()``, ``.tolist()``, ``.cpu()`` or ``int(tensor.max())`` stalls the host until the GPU catches
up, and breaks CUDA-graph capture. Each one that the step path keeps says so on its line (or the line above)
with ``# NOTE: host sync`` and why it is there. In ``serve/`` a ``torch.tensor(...)`` without a device, or a
``device="cpu"``, makes a host tensor: each says why in a comment naming the host.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
NOT_STEP_PATH = {  # model surgery, checkpoint loading and references: they run before or beside serving
    "moe/reference.py", "moe/hf.py", "moe/deepspeed_interop.py", "moe/patch.py", "moe/kernels/native.py",
    "serve/models/loader.py", "serve/models/registry.py", "serve/models/config.py",
}
STEP_PATH = sorted(
    p for pattern in ("moe/*.py", "moe/kernels/*.py", "routing/router.py", "routing/stats.py", "quant/fp8*.py",
                      "serve/models/*.py", "serve/engine/model_runner.py", "serve/engine/cuda_graphs.py",
                      "serve/engine/sampler.py", "serve/engine/greedy.py")
    for p in ROOT.glob(pattern) if p.relative_to(ROOT).as_posix() not in NOT_STEP_PATH)
SYNC = re.compile(r"\.(item|tolist|cpu|numpy)\(\)|\b(int|float|bool)\(.*\.(any|all|sum|max|min|argmax)\(")
HOST_TENSOR = re.compile(r"torch\.tensor\((?!.*device=)|device=[\"']cpu[\"']")


def _unmarked(pattern: re.Pattern, marker: str, files) -> list[str]:
    found = []
    for path in files:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.split("#", 1)[0]
            if pattern.search(code) and not code.lstrip().startswith(('"', "'")):
                context = line + (lines[i - 1] if i else "")
                if marker not in context:
                    found.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    return found


def test_the_scan_covers_the_step_path_and_finds_the_marked_syncs():
    names = {p.relative_to(ROOT).as_posix() for p in STEP_PATH}
    assert {"moe/layer.py", "moe/triton_backend.py", "routing/router.py", "serve/models/attention.py",
            "serve/engine/model_runner.py", "serve/engine/sampler.py"} <= names
    marked = sum(bool(SYNC.search(line)) for p in STEP_PATH for line in p.read_text().splitlines()
                 if "host sync" in line)
    assert marked >= 4  # the CPU strategies' and the sampler's: the pattern sees them


def test_every_host_sync_on_the_step_path_is_marked():
    assert _unmarked(SYNC, "host sync", STEP_PATH) == []


def test_every_host_tensor_in_serve_is_explained():
    serve_files = [p for p in STEP_PATH if p.relative_to(ROOT).parts[0] == "serve"]
    assert _unmarked(HOST_TENSOR, "host", serve_files) == []
