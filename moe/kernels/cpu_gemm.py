"""The CPU GEMM kernels of the torch backend, compiled from ``csrc/`` on first use.

- ``csrc/skinny_gemm.c``: ``y_MO = x_MD @ w_OD.T`` for the few rows of decode (per expert, grouped over all
  experts, with FP8 weights), and the two-call decode MoE (:func:`decode_moe`). BLAS sgemm repacks the whole
  weight on every call, which for an expert holding a handful of token rows costs more than the multiply
  (MKL: 25-35 GFLOP/s on 2 Zen 4 cores at M=8); the kernel streams each weight row once, prefetching the next
  block into L2, and reaches 60-75 (AVX2 tiles, or AVX-512 ones where the CPU has them), near the memory
  bandwidth at 1-4 rows. One C driver for both weight formats; every call passes the ISA: AVX-512 where the CPU
  has it, AVX2 inside :func:`skinny_gemm_avx2_tiles`.
- ``csrc/block_gemm.c``: the grouped GEMM for prefill-sized expert blocks (tens to thousands of rows each):
  both operands packed, 12 x 32 AVX-512 register tiles where the CPU has AVX-512F (checked at run time), else
  6 x 16 AVX2 tiles; 1.1-1.5x MKL's sgemm per expert on the layer benchmark's shapes (Zen 4, 2 threads).

Each is compiled on first use by :mod:`moe.kernels.native` and needs an AVX2+FMA CPU and a C compiler; where
either is missing ``*_available()`` is False and callers use torch's GEMM instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from moe.kernels.native import INT, LONG, PTR, load_library

_CSRC = Path(__file__).parent / "csrc"
L, P = LONG, PTR
_SKINNY_SIGNATURES = {
    "skinny_gemm_grouped_nt": ([P, L, L, L, L, L, P, P, L, P, L, INT, INT], None),
    "skinny_gemm_grouped_fp8_nt": ([P, L, L, L, L, L, P, L, L, INT, P, P, L, P, L, INT, INT], None),
    "skinny_gemm_has_avx512": ([], INT),
    "moe_decode_up": ([P, L, L, L, P, L, P, L, L, L, L, L, P, P, P, P, INT, INT], INT),
    "moe_decode_down": ([P, L, P, L, L, L, P, L, P, P, L, L, P, P, P, INT, INT], None),
    "dequantize_fp8": ([P, L, L, L, P, L, INT, P, L, INT], None),
}
_BLOCK_SIGNATURES = {
    "block_gemm_grouped_nt": ([P, L, L, L, L, L, P, P, L, P, L, INT, INT], INT),
    "block_gemm_grouped_fp8_nt": ([P, L, L, L, L, L, P, L, L, INT, P, P, L, P, L, INT, INT], INT),
    "block_gemm_has_avx512": ([], INT),
}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return load_library(_CSRC / "skinny_gemm.c", _SKINNY_SIGNATURES)


def skinny_gemm_available() -> bool:
    return _library() is not None


# Whether the skinny kernels may run their AVX-512 tiles (where the CPU has them), read by every wrapper and
# passed on per call; False only within skinny_gemm_avx2_tiles(). A context variable, not a global of the C
# library: per thread / asyncio task, and nothing to restore if a with-block is left by an exception.
_SKINNY_AVX512: contextvars.ContextVar[bool] = contextvars.ContextVar("skinny_avx512", default=True)


@contextlib.contextmanager
def skinny_gemm_avx2_tiles() -> Iterator[bool]:
    """Within (this thread or task): the skinny kernels run their AVX2 tiles even where the CPU has AVX-512, also
    when called from the layer (tests cover both). Yields whether that changed anything (False: the CPU has no
    AVX-512, or an enclosing block already asked for AVX2; the AVX2 tiles run anyway)."""
    lib = _library()
    changed = _SKINNY_AVX512.get() and lib is not None and bool(lib.skinny_gemm_has_avx512())
    token = _SKINNY_AVX512.set(False)
    try:
        yield changed
    finally:
        _SKINNY_AVX512.reset(token)


@functools.lru_cache(maxsize=1)
def _block_library() -> ctypes.CDLL | None:
    return load_library(_CSRC / "block_gemm.c", _BLOCK_SIGNATURES)


def block_gemm_available() -> bool:
    return _block_library() is not None


def block_gemm_has_avx512() -> bool:
    """Whether the block GEMM runs its AVX-512 micro-kernel here (else the AVX2 one)."""
    lib = _block_library()
    return lib is not None and bool(lib.block_gemm_has_avx512())


def block_gemm_grouped(x_RD: torch.Tensor, w_LOD: torch.Tensor, counts_L: torch.Tensor,
                       out_RO: torch.Tensor | None = None, avx512: bool = True) -> torch.Tensor:
    """:func:`skinny_gemm_grouped` for many rows per expert (prefill): ``csrc/block_gemm.c``'s register-tiled
    kernel, threads splitting each expert's output features. Same contract: rows sorted by expert, fp32, CPU.
    ``avx512=False`` runs the AVX2 micro-kernel even where the CPU has AVX-512 (tests cover both)."""
    lib = _block_library()
    if lib is None:
        raise RuntimeError("block GEMM unavailable (needs an AVX2+FMA CPU and a C compiler); check "
                           "block_gemm_available()")
    counts, y_RO = _grouped_checks(x_RD, w_LOD, counts_L, out_RO)
    L, O, D = w_LOD.shape
    status = lib.block_gemm_grouped_nt(w_LOD.data_ptr(), L, O, D, w_LOD.stride(1), w_LOD.stride(0), x_RD.data_ptr(),
                                       counts.data_ptr(), x_RD.stride(0), y_RO.data_ptr(), y_RO.stride(0),
                                       torch.get_num_threads(), int(avx512))
    if status:
        raise MemoryError(f"block_gemm_grouped: no memory for the packing buffers of x_RD {tuple(x_RD.shape)}")
    return y_RO


def block_gemm_grouped_fp8(x_RD: torch.Tensor, q_LOD: torch.Tensor, scale: torch.Tensor, block: int,
                           counts_L: torch.Tensor, out_RO: torch.Tensor | None = None,
                           avx512: bool = True) -> torch.Tensor:
    """:func:`block_gemm_grouped` with e4m3fn weights ``q_LOD``, converted to fp32 as the kernel packs them (each
    weight byte read once). ``scale``: per expert what :func:`skinny_gemm_fp8` takes, ``[L, O]`` (``block ==
    0``) or ``[L, ceil(O/block), ceil(D/block)]``; views are fine as long as the last dim is unit-stride."""
    lib = _block_library()
    if lib is None:
        raise RuntimeError("block GEMM unavailable (needs an AVX2+FMA CPU and a C compiler); check "
                           "block_gemm_available()")
    counts, y_RO = _grouped_checks(x_RD, q_LOD, counts_L, out_RO, torch.float8_e4m3fn)
    L, O, D = q_LOD.shape
    _check_grouped_scale(q_LOD, scale, block)
    status = lib.block_gemm_grouped_fp8_nt(q_LOD.data_ptr(), L, O, D, q_LOD.stride(1), q_LOD.stride(0),
                                           scale.data_ptr(), scale.stride(0), scale.stride(1) if block else 0, block,
                                           x_RD.data_ptr(), counts.data_ptr(), x_RD.stride(0), y_RO.data_ptr(),
                                           y_RO.stride(0), torch.get_num_threads(), int(avx512))
    if status:
        raise MemoryError(f"block_gemm_grouped_fp8: no memory for the packing buffers of x_RD {tuple(x_RD.shape)}")
    return y_RO


def skinny_gemm(x_MD: torch.Tensor, w_OD: torch.Tensor, out_MO: torch.Tensor | None = None) -> torch.Tensor:
    """``x_MD @ w_OD.T`` in fp32 on the CPU. Rows of ``x``, ``w`` and ``out`` must be unit-stride."""
    lib, out_MO = _prepare(x_MD, w_OD, out_MO, torch.float32)
    (M, D), O = x_MD.shape, w_OD.shape[0]
    lib.skinny_gemm_grouped_nt(w_OD.data_ptr(), 1, O, D, w_OD.stride(0), 0, x_MD.data_ptr(),
                               ctypes.byref(ctypes.c_long(M)), x_MD.stride(0), out_MO.data_ptr(), out_MO.stride(0),
                               *_threads_isa())
    return out_MO


def skinny_gemm_grouped(x_RD: torch.Tensor, w_LOD: torch.Tensor, counts_L: torch.Tensor,
                        out_RO: torch.Tensor | None = None) -> torch.Tensor:
    """``y_RO``: each expert's rows ``x_RD[start_e : start_e + counts_L[e]] @ w_LOD[e].T`` in one call (rows
    sorted by expert; fp32, CPU), into ``out_RO`` if given. Rows past ``counts_L.sum()`` are left unwritten.

    Example: ``counts_L = [2, 0, 1]`` -> rows 0-1 through ``w_LOD[0]``, row 2 through ``w_LOD[2]``.
    """
    counts, y_RO = _grouped_checks(x_RD, w_LOD, counts_L, out_RO)
    L, O, D = w_LOD.shape
    _skinny_library().skinny_gemm_grouped_nt(w_LOD.data_ptr(), L, O, D, w_LOD.stride(1), w_LOD.stride(0),
                                             x_RD.data_ptr(), counts.data_ptr(), x_RD.stride(0), y_RO.data_ptr(),
                                             y_RO.stride(0), *_threads_isa())
    return y_RO


def _threads_isa() -> tuple[int, int]:
    """The last two arguments of every skinny kernel: the thread count and whether to use AVX-512 tiles (the C
    side also checks that the CPU has them)."""
    return torch.get_num_threads(), int(_SKINNY_AVX512.get())


def _grouped_checks(x_RD: torch.Tensor, w_LOD: torch.Tensor, counts_L: torch.Tensor, out_RO: torch.Tensor | None,
                    w_dtype: torch.dtype = torch.float32):
    """int64 ``counts`` and ``out_RO`` (or a fresh ``y_RO``) after the shape, dtype, stride and count checks of
    the grouped kernels."""
    L, O, D = w_LOD.shape
    counts = counts_L.to(torch.int64).contiguous()
    if counts.shape != (L,) or w_LOD.stride(1) < D:
        raise ValueError(f"counts_L {tuple(counts_L.shape)} must be [{L}] for w_LOD {tuple(w_LOD.shape)} with "
                         f"unit-stride rows, got strides {w_LOD.stride()}")
    if bool((counts < 0).any()) or int(counts.sum()) > x_RD.shape[0]:  # NOTE: host sync (CPU kernels only)
        raise ValueError(f"counts_L ({counts.tolist()}) must be >= 0 and sum to at most the {x_RD.shape[0]} rows "
                         "of x_RD")
    _, y_RO = _prepare(x_RD, w_LOD[0] if L else w_LOD.new_empty(O, D), out_RO, w_dtype)
    return counts, y_RO


def decode_moe(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, w13_EXD: torch.Tensor,
               w2_EDF: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor],
               max_rows: int) -> torch.Tensor | None:
    """A whole routed-expert pass for few rows per expert: ``y_TD = sum_k w_tk * expert_{id_tk}(x_t)`` in fp32,
    as two C calls around ``activation`` (``h_NX -> a_NF``, row-wise). None (nothing computed) when an expert
    gets more than ``max_rows`` rows. The same math, summation order and rounding as shuffle -> ``loop_ffn`` ->
    ``weighted_sum``; no biases.

    Example: ``ids_TK = [[1, 0], [1, 2]]`` (T=2, K=2) -> sorted pairs ``[1, 0, 2, 3]`` (expert 0 row: pair 1;
    expert 1: pairs 0, 2; expert 2: pair 3); ``y_0 = w_00 * e1(x_0) + w_01 * e0(x_0)``.
    """
    lib = _library()
    T, D = x_TD.shape
    (E, X, Dw), (_, Dy, F) = w13_EXD.shape, w2_EDF.shape
    K = ids_TK.shape[1]
    ok = (lib is not None and x_TD.dtype == w13_EXD.dtype == w2_EDF.dtype == weights_TK.dtype == torch.float32
          and ids_TK.dtype == torch.int32 and Dw == D == Dy and tuple(weights_TK.shape) == (T, K)
          and all(t.device.type == "cpu" and t.is_contiguous() for t in (x_TD, ids_TK, weights_TK, w13_EXD, w2_EDF)))
    if lib is None or not ok:
        raise ValueError(f"decode_moe: contiguous CPU fp32 x_TD {tuple(x_TD.shape)}, w13 {tuple(w13_EXD.shape)}, "
                         f"w2 {tuple(w2_EDF.shape)}, weights {tuple(weights_TK.shape)} and int32 ids "
                         f"{tuple(ids_TK.shape)} expected (and the C library: see skinny_gemm_available)")
    N = T * K
    order_N, counts_E = torch.empty(N, dtype=torch.int64), torch.empty(E, dtype=torch.int64)
    xs_ND, h_NX = torch.empty(N, D), torch.empty(N, X)
    status = lib.moe_decode_up(x_TD.data_ptr(), T, D, x_TD.stride(0), ids_TK.data_ptr(), K, w13_EXD.data_ptr(), E, X,
                               w13_EXD.stride(1), w13_EXD.stride(0), max_rows, order_N.data_ptr(),
                               counts_E.data_ptr(), xs_ND.data_ptr(), h_NX.data_ptr(), *_threads_isa())
    if status == -2:
        raise ValueError(f"decode_moe: expert ids must be in [0, {E}), got "
                         f"{ids_TK.min().item()}..{ids_TK.max().item()}")  # NOTE: host sync (error path, CPU)
    if status:
        return None
    a_NF = activation(h_NX).contiguous()
    if tuple(a_NF.shape) != (N, F) or a_NF.dtype != torch.float32:
        raise ValueError(f"decode_moe: activation gave {tuple(a_NF.shape)} {a_NF.dtype}, expected ({N}, {F}) fp32")
    y_TD, ys_ND, pos_N = torch.empty(T, D), torch.empty(N, D), torch.empty(N, dtype=torch.int64)
    lib.moe_decode_down(a_NF.data_ptr(), F, w2_EDF.data_ptr(), D, w2_EDF.stride(1), w2_EDF.stride(0),
                        counts_E.data_ptr(), E, order_N.data_ptr(), weights_TK.data_ptr(), T, K, pos_N.data_ptr(),
                        ys_ND.data_ptr(), y_TD.data_ptr(), *_threads_isa())
    return y_TD


def skinny_gemm_fp8(
    x_MD: torch.Tensor, q_OD: torch.Tensor, scale: torch.Tensor, block: int, out_MO: torch.Tensor | None = None
) -> torch.Tensor:
    """``x_MD @ dequant(q_OD).T`` with e4m3fn weights dequantised in registers.

    ``block == 0``: ``scale`` is ``[O]`` (per output channel). Else ``scale`` is ``[ceil(O/block),
    ceil(D/block)]`` (DeepSeek-V3 ``weight_scale_inv``) and ``block`` a multiple of 8.
    """
    lib, out_MO = _prepare(x_MD, q_OD, out_MO, torch.float8_e4m3fn)
    O, D = q_OD.shape
    _check_scale(q_OD, scale, block)
    lib.skinny_gemm_grouped_fp8_nt(q_OD.data_ptr(), 1, O, D, q_OD.stride(0), 0, scale.data_ptr(), 0,
                                   scale.shape[-1] if block else 0, block, x_MD.data_ptr(),
                                   ctypes.byref(ctypes.c_long(x_MD.shape[0])), x_MD.stride(0), out_MO.data_ptr(),
                                   out_MO.stride(0), *_threads_isa())
    return out_MO


def skinny_gemm_grouped_fp8(x_RD: torch.Tensor, q_LOD: torch.Tensor, scale: torch.Tensor, block: int,
                            counts_L: torch.Tensor, out_RO: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`skinny_gemm_grouped` with e4m3fn weights (dequantised in registers) and per-expert scales in
    :func:`block_gemm_grouped_fp8`'s layout: one call over all experts for decode-sized blocks."""
    counts, y_RO = _grouped_checks(x_RD, q_LOD, counts_L, out_RO, torch.float8_e4m3fn)
    L, O, D = q_LOD.shape
    _check_grouped_scale(q_LOD, scale, block)
    _skinny_library().skinny_gemm_grouped_fp8_nt(q_LOD.data_ptr(), L, O, D, q_LOD.stride(1), q_LOD.stride(0),
                                          scale.data_ptr(), scale.stride(0), scale.stride(1) if block else 0, block,
                                          x_RD.data_ptr(), counts.data_ptr(), x_RD.stride(0), y_RO.data_ptr(),
                                          y_RO.stride(0), *_threads_isa())
    return y_RO


def dequantize_fp8(q_OD: torch.Tensor, scale: torch.Tensor, block: int,
                   out_OD: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[O, D]`` from e4m3fn weights and scales (same layouts as :func:`skinny_gemm_fp8`)."""
    O, D = q_OD.shape
    out_OD = torch.empty(O, D) if out_OD is None else out_OD
    lib, out_OD = _prepare(torch.empty(0, D), q_OD, out_OD, torch.float8_e4m3fn, out_shape=(O, D))
    _check_scale(q_OD, scale, block)
    lib.dequantize_fp8(q_OD.data_ptr(), O, D, q_OD.stride(0), scale.data_ptr(), scale.shape[-1], block,
                       out_OD.data_ptr(), out_OD.stride(0), torch.get_num_threads())
    return out_OD


def _check_grouped_scale(q_LOD: torch.Tensor, scale: torch.Tensor, block: int) -> None:
    L, O, D = q_LOD.shape
    expected = (L, O) if block == 0 else (L, -(-O // block), -(-D // block))
    if (block % 8 or tuple(scale.shape) != expected or scale.dtype != torch.float32 or scale.device.type != "cpu"
            or scale.stride(-1) != 1):
        raise ValueError(f"scale {tuple(scale.shape)} {scale.dtype} strides {scale.stride()} / block {block}: expected "
                         f"a CPU fp32 {expected} with a unit last stride and block 0 or a multiple of 8")


def _check_scale(q_OD: torch.Tensor, scale: torch.Tensor, block: int) -> None:
    O, D = q_OD.shape
    expected = (O,) if block == 0 else (-(-O // block), -(-D // block))
    if block % 8 or tuple(scale.shape) != expected or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(f"scale {tuple(scale.shape)} {scale.dtype} / block {block}: expected a contiguous fp32 "
                         f"{expected} and block 0 or a multiple of 8")


def _skinny_library() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("skinny GEMM unavailable (needs an AVX2+FMA CPU and a C compiler); check "
                           "skinny_gemm_available()")
    return lib


def _prepare(x_MD, w_OD, out_MO, w_dtype, out_shape=None):
    lib = _skinny_library()
    M, D = x_MD.shape
    O, Dw = w_OD.shape
    if D != Dw:
        raise ValueError(f"x_MD {tuple(x_MD.shape)} and w_OD {tuple(w_OD.shape)} disagree on D")
    if out_MO is None:
        out_MO = torch.empty(M, O, dtype=torch.float32)
    for name, t, dtype in (("x_MD", x_MD, torch.float32), ("w_OD", w_OD, w_dtype), ("out_MO", out_MO, torch.float32)):
        if t.dtype != dtype or t.device.type != "cpu" or t.stride(-1) != 1:
            raise ValueError(f"{name} must be a CPU {dtype} tensor with unit-stride rows, got {t.dtype} {t.device} "
                             f"strides {t.stride()}")
    if out_MO.shape != (out_shape or (M, O)):
        raise ValueError(f"out_MO shape {tuple(out_MO.shape)} must be {out_shape or (M, O)}")
    return lib, out_MO
