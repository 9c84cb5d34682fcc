import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison_empty(monkeypatch):
    """Every ``torch.empty`` comes back NaN-filled (floats) or -7 (ints), so unwritten outputs are caught."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", poisoned)


def _cpu_has_avx512() -> bool:
    from moe.kernels.cpu_gemm import block_gemm_has_avx512

    return block_gemm_has_avx512()


@pytest.fixture(params=["native"] + (["avx2"] if _cpu_has_avx512() else []))
def skinny_isa(request):
    """The skinny kernels' own tiles ("native": AVX-512 where the CPU has it) and, on such CPUs, the AVX2 ones."""
    if request.param == "native":
        yield request.param
        return
    from moe.kernels.cpu_gemm import skinny_gemm_avx2_tiles

    with skinny_gemm_avx2_tiles() as changed:
        assert changed
        yield request.param


os.environ.setdefault("WANDB_MODE", "disabled")
# CPU: Triton kernels run interpreted
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
