"""Device logic that needs no GPU: ``engine.device`` resolution, KV sizing from free memory, rank devices, the
attention backend choice, and the one-line error of a CUDA device on a machine without one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from serve import LLM, EngineConfig
from serve.engine.device import CPU_KV_CACHE_BYTES, MAX_KV_BLOCKS, kv_cache_blocks, kv_cache_budget, resolve_device
from serve.launch.ranks import rank_device
from serve.models.attention import TorchAttention
from serve.models.attention_backends import select_attention_backend
from serve.models.cpu_attention import CpuAttention, paged_decode_available

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


def test_auto_is_cuda_where_torch_sees_it_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_a_cuda_device_without_cuda_names_the_key(spec):
    with pytest.raises(ValueError, match=rf"^engine.device \('{spec}'\) needs a CUDA GPU"):
        resolve_device(spec)


@pytest.mark.parametrize("field,value", [("device", "gpu"), ("device", "cuda:x"), ("device", "cuda:-1"),
                                         ("gpu_memory_utilization", 0.0), ("gpu_memory_utilization", 1.5),
                                         ("kv_cache_bytes", 0), ("attention_backend", "flash")])
def test_bad_device_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} \({value!r}\)"):
        EngineConfig(**{field: value})


def test_kv_budget_on_the_cpu_and_from_free_gpu_memory(monkeypatch):
    cpu = torch.device("cpu")
    assert kv_cache_budget(cpu, None, 0.9) == CPU_KV_CACHE_BYTES
    assert kv_cache_budget(cpu, 12345, 0.9) == 12345
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * gib, 80 * gib))  # 20 GiB weights etc.
    cuda = torch.device("cuda", 0)
    assert kv_cache_budget(cuda, None, 0.9) == 52 * gib  # 60 free - 8 kept (10% of 80)
    assert kv_cache_budget(cuda, None, 0.5) == 20 * gib
    assert kv_cache_budget(cuda, 4096, 0.5) == 4096  # an explicit byte count wins
    with pytest.raises(ValueError, match=r"^engine.gpu_memory_utilization \(0.2\) leaves no memory"):
        kv_cache_budget(cuda, None, 0.2)
    assert kv_cache_blocks(cuda, None, 0.9, 2**20) == 52 * 1024  # 1 MiB blocks
    assert kv_cache_blocks(cuda, None, 0.9, 1024) == MAX_KV_BLOCKS  # a tiny model: capped, not 54M blocks


def test_each_rank_takes_its_local_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (rank_device("auto"), rank_device("cuda"), rank_device("cpu")) == ("cuda:3", "cuda:3", "cpu")
    assert rank_device("cuda:1") == "cuda:1"  # as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto") == "auto"


def test_attention_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    fp32_auto = select_attention_backend("auto", cpu, torch.float32)
    assert type(fp32_auto) is (CpuAttention if paged_decode_available(torch.zeros(1)) else TorchAttention)
    assert type(select_attention_backend("auto", cpu, torch.bfloat16)) is TorchAttention  # the C kernel is fp32
    assert type(select_attention_backend("torch", cpu, torch.float32)) is TorchAttention
    with pytest.raises(ValueError, match=r"^engine.attention_backend \('cpu'\) needs an fp32 CPU cache"):
        select_attention_backend("cpu", cpu, torch.bfloat16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"^engine.attention_backend \('triton'\) needs a CUDA device"):
        select_attention_backend("triton", cpu, torch.float32)


def test_engine_device_auto_serves_here_with_model_and_cache_on_it():
    llm = LLM(device="auto", max_num_seqs=2, num_kv_blocks=64, max_model_len=256)
    device = resolve_device("auto")
    engine = llm.engine
    assert engine.device == device and engine.runner.cache.pool.device.type == device.type
    assert {p.device.type for p in engine.model.parameters()} == {device.type}
    assert llm.generate([[1, 2, 3]])[0].token_ids


@NO_CUDA
def test_moe_serve_with_a_cuda_device_fails_at_start_in_one_line():
    cmd = [sys.executable, "-m", "serve.launch.cli", "engine.device=cuda", "server.port=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("moe-serve: error: engine.device ('cuda') needs a CUDA GPU"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_serving_processes_wait_passively_unless_told(given, expected):
    """OpenMP threads spinning at barriers collapse 2-thread serving next to another busy process (see
    serve/__init__.py): ``import serve`` before torch sets the passive policy, a user's choice wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import serve, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == expected, out.stderr[-1000:]
