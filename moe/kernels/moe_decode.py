"""An MoE layer's router and routed experts for a few rows in one C call (``csrc/moe_decode.c``), fp32 CPU.

The serving engine's whole-model decode step (``serve/models/csrc/decode_step.c``) includes this C code for its
MoE layers: softmax top-k routing (renormalised or not), each chosen expert's rows together through its SwiGLU
MLP (each weight row read once for all of them), the weighted sum. :func:`moe_decode` is its Python entry (the
tests check the kernel through it against ``moe.MoE``). ``moe.MoE`` itself keeps the two-call expert pass at decode
sizes: that one is bit-identical to the step-by-step path, which token-split expert parallelism relies on to equal
the single-process layer exactly; this kernel sums in another order (within ~1e-6).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from moe.kernels.native import INT, LONG, PTR, load_library

_SOURCE = Path(__file__).parent / "csrc" / "moe_decode.c"
_SIGNATURES = {"moe_decode": ([PTR, LONG, LONG, PTR, LONG, LONG, INT, PTR, PTR, LONG, PTR, PTR, PTR, PTR, INT], None)}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return load_library(_SOURCE, _SIGNATURES)


def moe_decode_available() -> bool:
    return _library() is not None


def moe_decode(x_TD: torch.Tensor, router_weight_ED: torch.Tensor, w13_EXD: torch.Tensor, w2_EDF: torch.Tensor,
               top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y_TD, ids_TK, weights_TK, logits_TE)``: ``y_t = sum_k w_tk * expert_{id_tk}(x_t)`` and the router's
    decision (int32 ids in descending-logit order, fp32 weights and logits), as ``routing.Router`` (softmax top-k)
    and the expert pass compute them; fp32 CPU tensors, ``w13_EXD`` gate rows then up rows."""
    T, D = x_TD.shape
    E, X, _ = w13_EXD.shape
    x, router_w, w13, w2 = (t.contiguous() for t in (x_TD, router_weight_ED, w13_EXD, w2_EDF))
    y_TD = torch.empty(T, D)  # on the host, with the fp32 CPU rows
    ids_TK = torch.empty(T, top_k, dtype=torch.int32)  # host, as above
    weights_TK, logits_TE = torch.empty(T, top_k), torch.empty(T, E)  # host, as above
    lib = _library()
    if lib is None:
        raise RuntimeError("moe_decode: no C compiler or no AVX2 CPU (check moe_decode_available() first)")
    lib.moe_decode(x.data_ptr(), T, D, router_w.data_ptr(), E, top_k, int(renormalize), w13.data_ptr(),
                          w2.data_ptr(), X // 2, y_TD.data_ptr(), ids_TK.data_ptr(), weights_TK.data_ptr(),
                          logits_TE.data_ptr(), torch.get_num_threads())
    return y_TD, ids_TK, weights_TK, logits_TE
