"""``import moe`` works without the optional dependencies (triton, deepspeed, megablocks, wandb)."""

import subprocess
import sys

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'triton', 'deepspeed', 'megablocks', 'wandb'}:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
import importlib.util
optional = {'triton', 'deepspeed', 'megablocks', 'wandb'}
importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] in optional else _find(name, *a)
"""


def test_import_moe_without_optional_dependencies():
    code = (
        "import importlib.util; _find = importlib.util.find_spec\n" + BLOCKER +
        "import torch, moe, routing, all_to_all\n"
        "layer = moe.MoE(moe.MoEConfig(16, 8, 4, 2))\n"
        "assert layer.backend is moe.Backend.TORCH\n"
        "print(layer(torch.randn(3, 16)).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([3, 16])" in result.stdout
