"""A decode-only step of the whole model in one C call (``csrc/decode_step.c``), fp32 CPU.

Through torch a decode step is ~15 ops per layer whose dispatch outweighs their arithmetic at decode sizes (the
default model's batch-1 step: ~2.7 ms, its arithmetic well under one). :class:`FusedDecode` runs the same
layers over the model's own weights and the paged cache in place: embedding, per layer RMSNorm, qkv, per-head
q/k norms and NeoX RoPE, the K/V write, the paged decode kernel, output projection, RMSNorm, the softmax top-k
router and SwiGLU experts (or a dense SwiGLU MLP), then the final norm and the sampled rows' logits. The MoE
layers' routing observers (``on_routing``: routing statistics) still see every decision.

It serves the models it computes exactly and nothing else: :func:`unsupported` names what a model has that it
does not (an attention window, sinks, biases, a shared expert, sigmoid routing, FP8 experts, expert parallelism,
...); those models, and every step with a prefill chunk, take the torch path.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch

from all_to_all.dispatcher import LocalDispatcher
from moe import MoE
from moe.config import Activation
from moe.experts import Experts
from moe.kernels.native import FLOAT, INT, LONG, PTR, load_library
from moe.shared import SharedExpert
from routing.config import Scoring
from routing.router import Router, Routing
from serve.models.attention import PagedKVCache
from serve.models.config import QKNorm
from serve.models.decoder import MoEDecoder

_SOURCE = Path(__file__).parent / "csrc" / "decode_step.c"
_STEP_ARGS = [PTR, FLOAT, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, LONG, PTR, PTR, PTR, PTR, PTR, LONG, PTR, PTR, PTR,
              PTR, PTR, INT, PTR, PTR]  # ..., threads, then a launch's pending-token source and greedy tokens out
_SIGNATURES = {"decode_step": (_STEP_ARGS, None), "decode_worker_new": ([], PTR),
               "decode_worker_launch": ([PTR, *_STEP_ARGS], None), "decode_worker_wait": ([PTR], ctypes.c_double),
               "decode_worker_free": ([PTR], None)}
LAYER_PTRS = 9  # IN_NORM, QKV, Q_NORM, K_NORM, O_PROJ, POST_NORM, ROUTER, W13, W2 (the C enum)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return load_library(_SOURCE, _SIGNATURES)


def unsupported(model: MoEDecoder, cache) -> str | None:
    """Why the fused step cannot compute ``model`` exactly (None: it can)."""
    c = model.config
    checks = [
        (_library() is None, "no C compiler / AVX2"),
        (not isinstance(cache, PagedKVCache) or cache.pool.dtype != torch.float32 or cache.pool.device.type != "cpu",
         "not an fp32 CPU K/V cache"),
        (c.mla is not None, "multi-head latent attention"),
        (c.qk_norm not in (QKNorm.NONE, QKNorm.HEAD), f"q/k norm {c.qk_norm.value}"),
        (c.attention_bias or c.o_proj_bias or c.clip_qkv is not None, "attention biases or clipping"),
        (not all(w.full for w in c.attention_windows) or c.attention_sinks, "attention windows or sinks"),
        (c.rope_interleave or c.nope_layers or c.attn_temperature, "interleaved RoPE or NoPE layers"),
        (c.hypermoe is not None, "HyperMoE"),
    ]
    for layer in model.layers:
        mlp = layer.mlp
        if isinstance(mlp, SharedExpert):
            checks.append((mlp.activation is not Activation.SWIGLU or mlp.gate_weight is not None
                           or mlp.w13_XD.dtype != torch.float32, "a dense layer other than an fp32 SwiGLU MLP"))
            continue
        router = mlp.router.config if isinstance(mlp, MoE) and type(mlp.router) is Router else None
        checks.append((router is None or not isinstance(mlp.dispatcher, LocalDispatcher), "expert parallelism"))
        checks.append((router is None or type(mlp.experts) is not Experts or mlp.shared_expert is not None
                       or mlp.hypermoe is not None or mlp.experts.w13_E2FD.dtype != torch.float32
                       or mlp.experts.b13_E2F is not None or mlp.config.activation is not Activation.SWIGLU
                       or router.scoring is not Scoring.SOFTMAX or router.correction_bias or router.bias
                       or router.num_groups != 1 or router.routed_scaling_factor != 1.0 or router.apply_on_input,
                       "an MoE layer other than softmax top-k over fp32 SwiGLU experts without a shared expert"))
    return next((reason for failed, reason in checks if failed), None)


class FusedDecode:
    """``fused(ids_B, positions_B, slots_B, tables_BM, lens_B, sample_rows_S) -> logits_SV`` for a decode-only
    step (host int64 tensors, as ``ModelRunner.prepare`` lays them out), writing the step's K/V into ``cache``.
    Build it only where :func:`unsupported` says None; it holds the weights' addresses: ``current()`` says whether
    the MoE layers are still the ones it was built on (the caller rebuilds it, or drops it, when not)."""

    def __init__(self, model: MoEDecoder, cache: PagedKVCache) -> None:
        c = model.config
        self.model, self.cache = model, cache
        self.moe_layers = [(i, layer.mlp) for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]
        router = self.moe_layers[0][1].router.config if self.moe_layers else None
        self.E, self.K = (router.num_experts, router.top_k) if router else (1, 1)
        R = model.rope_cos.shape[-1]
        # on the host, as every argument of the C step (an fp32 CPU model)
        self.shape = torch.tensor([c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, R, self.E, self.K,
                                   c.vocab_size, c.num_layers, cache.pool.shape[3], cache.block_size, 0,
                                   int(router.renormalize) if router else 0], dtype=torch.int64)
        ptrs, ffn = [], []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q_norm, k_norm = (attn.q_norm.weight, attn.k_norm.weight) if c.qk_norm is QKNorm.HEAD else (None, None)
            if isinstance(mlp, MoE):
                w13, w2, router_w, F = mlp.experts.w13_E2FD, mlp.experts.w2_EDF, mlp.router.weight, mlp.config.ffn_size
            else:
                w13, w2, router_w, F = mlp.w13_XD, mlp.w2_DS, None, mlp.w2_DS.shape[1]
            tensors = [layer.input_layernorm.weight, attn.qkv_proj.weight, q_norm, k_norm, attn.o_proj.weight,
                       layer.post_attention_layernorm.weight, router_w, w13, w2]
            ptrs += [None if t is None else _address(t) for t in tensors]
            ffn += [F, int(isinstance(mlp, MoE))]
        self.layers = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self.ffn = torch.tensor(ffn, dtype=torch.int64)  # on the host, as above
        self.globals = [_address(t) for t in (model.embed_tokens.weight, model.norm.weight, model.lm_head.weight,
                                              model.rope_cos, model.rope_sin, cache.pool)]
        self.eps = c.rms_norm_eps
        self._built_on = self._modules()
        self._worker = None  # the C worker thread of launch(), started on its first step

    def _modules(self) -> tuple:
        """What the step read its addresses from: a layer whose experts, dispatcher or weights were replaced since
        (expert parallelism shards the model after the engine is built), or a model or cache moved (its embedding,
        first projection or pool elsewhere), makes this step stale."""
        moved = (self.model.embed_tokens.weight.data_ptr(), self.model.layers[0].self_attn.qkv_proj.weight.data_ptr(),
                 self.cache.pool.data_ptr())
        return moved + tuple((id(m), id(m.experts), id(m.dispatcher), m.experts.w13_E2FD.data_ptr())
                             for _, m in self.moe_layers)

    def current(self) -> bool:
        return self._modules() == self._built_on

    def __call__(self, ids_B: torch.Tensor, positions_B: torch.Tensor, slots_B: torch.Tensor,
                 tables_BM: torch.Tensor, lens_B: torch.Tensor, sample_rows_S: torch.Tensor) -> torch.Tensor:
        call = self._call(ids_B, positions_B, slots_B, tables_BM, lens_B, sample_rows_S)
        _library().decode_step(*call.args, None, None)
        return call.finish()

    def stage(self, ids_B: torch.Tensor, positions_B: torch.Tensor, slots_B: torch.Tensor, tables_BM: torch.Tensor,
              lens_B: torch.Tensor, sample_rows_S: torch.Tensor) -> StagedDecode:
        """The step's C call laid out, its outputs allocated, not run: ``launch(tokens_S)`` starts it on this step's
        C worker thread, its pending ids (``serve.engine.overlap``) taken from ``tokens_S``; the C step reads
        ``ids_B`` itself (contiguous: no copy)."""
        call = self._call(ids_B, positions_B, slots_B, tables_BM, lens_B, sample_rows_S)
        if call.inputs[0].data_ptr() != ids_B.data_ptr():
            raise ValueError("fused decode: stage() needs contiguous ids_B (later writes must reach the C step)")
        return StagedDecode(self, call)

    def worker(self):
        """This step's C worker thread, started on first use."""
        if self._worker is None:
            self._worker = _library().decode_worker_new()
            if not self._worker:
                raise RuntimeError("fused decode: could not start its worker thread")
        return self._worker

    def _call(self, ids_B, positions_B, slots_B, tables_BM, lens_B, sample_rows_S) -> _DecodeCall:
        B, M = tables_BM.shape
        S, L = sample_rows_S.shape[0], self.model.config.num_layers
        shape = self.shape.clone()  # a call's own: a staged call's M must not change the one computing
        shape[11] = M
        inputs = [t.contiguous() for t in (ids_B, positions_B, slots_B, tables_BM, lens_B, sample_rows_S)]
        logits_SV = torch.empty(S, self.model.config.vocab_size)  # on the host, with the fp32 CPU model
        ids_LBK = torch.empty(L, B, self.K, dtype=torch.int32)  # host, as above
        weights_LBK, logits_LBE = torch.empty(L, B, self.K), torch.empty(L, B, self.E)  # host, as above
        embed, norm, lm_head, cos, sin, pool = self.globals
        args = (shape.data_ptr(), self.eps, self.layers, self.ffn.data_ptr(), embed, norm, lm_head, cos, sin, pool,
                B, *(a.data_ptr() for a in inputs[:5]), S, inputs[5].data_ptr(), logits_SV.data_ptr(),
                ids_LBK.data_ptr(), weights_LBK.data_ptr(), logits_LBE.data_ptr(), torch.get_num_threads())
        return _DecodeCall(self, args, shape, inputs, logits_SV, ids_LBK, weights_LBK, logits_LBE)

    def __del__(self) -> None:
        if getattr(self, "_worker", None):
            _library().decode_worker_free(self._worker)


class _DecodeCall:
    """One step's C arguments and the tensors behind them (held until the step is done)."""

    def __init__(self, fused: FusedDecode, args: tuple, shape: torch.Tensor, inputs: list[torch.Tensor],
                 *outputs: torch.Tensor) -> None:
        self.fused, self.args, self.shape, self.inputs = fused, args, shape, inputs
        self.logits_SV, self.ids_LBK, self.weights_LBK, self.logits_LBE = outputs

    def finish(self) -> torch.Tensor:
        """After the C step: the routing observers see every decision, as on the torch path; the logits."""
        for i, layer in self.fused.moe_layers:
            if layer.on_routing is not None:
                layer.on_routing(Routing(self.weights_LBK[i], self.ids_LBK[i], self.logits_LBE[i], False))
        return self.logits_SV


class StagedDecode:
    """A fused step ready to start: ``launch(tokens_S)`` hands it to the C worker thread and returns at once; the C
    step reads its pending ids' tokens from ``tokens_S`` (int64; None: it has none) and leaves each sampled row's
    greedy token in ``greedy_S``."""

    def __init__(self, fused: FusedDecode, call: _DecodeCall) -> None:
        self.fused, self.call = fused, call
        self.greedy_S = torch.empty(call.logits_SV.shape[0], dtype=torch.int64)  # host, as the logits

    def launch(self, tokens_S: np.ndarray | None) -> LaunchedDecode:
        worker = self.fused.worker()
        source = None if tokens_S is None else tokens_S.ctypes.data
        _library().decode_worker_launch(worker, *self.call.args, source, self.greedy_S.data_ptr())
        return LaunchedDecode(self.call, worker, tokens_S, self.greedy_S)


class LaunchedDecode:
    """A fused step computing on its worker thread: ``wait()`` gives ``(logits_SV, seconds computed)``, and then
    ``greedy_S`` holds each sampled row's greedy token. One step at a time per worker: wait for it before
    launching the next."""

    def __init__(self, call: _DecodeCall, worker, tokens_S: np.ndarray | None, greedy_S: torch.Tensor) -> None:
        self.call, self.worker, self.tokens_S, self.greedy_S = call, worker, tokens_S, greedy_S
        self.seconds: float | None = None

    def wait(self) -> tuple[torch.Tensor, float]:
        if self.seconds is None:
            self.seconds = _library().decode_worker_wait(self.worker)  # ctypes releases the GIL while it blocks
            self.call.finish()
        return self.call.logits_SV, self.seconds

    def __del__(self) -> None:
        if self.seconds is None:  # dropped unawaited: its buffers must outlive the C step writing them
            _library().decode_worker_wait(self.worker)


def _address(t: torch.Tensor) -> int:
    if not t.is_contiguous() or t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"fused decode: tensor {tuple(t.shape)} {t.dtype} on {t.device} must be contiguous fp32 CPU")
    return t.data_ptr()
