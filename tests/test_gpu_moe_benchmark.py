"""``benchmarks/gpu_moe.py`` imports and parses its arguments on a CPU machine (it can only run on a GPU)."""

import pytest
import torch

from benchmarks import gpu_moe


def test_defaults_cover_the_issue_grid():
    args = gpu_moe.parse_args([])
    assert args.models == ["mixtral", "qwen3", "deepseek"]
    assert args.tokens == [1, 16, 64, 256, 1024, 4096, 16384] and args.graph_tokens == [1, 16, 64]
    assert args.autotune and not args.deterministic and args.flush
    assert gpu_moe.MODELS["deepseek"] == gpu_moe.Shape(D=7168, F=2048, E=256, K=8)


def test_options_and_bad_values():
    args = gpu_moe.parse_args(["--models", "qwen3", "--tokens", "1", "4096", "--no-autotune", "--deterministic"])
    assert (args.models, args.tokens, args.autotune, args.deterministic) == (["qwen3"], [1, 4096], False, True)
    with pytest.raises(SystemExit):
        gpu_moe.parse_args(["--tokens", "0"])
    with pytest.raises(SystemExit):
        gpu_moe.parse_args(["--models", "llama"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_refuses_to_run_without_a_gpu(capsys):
    assert gpu_moe.main(["--models", "qwen3", "--tokens", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
