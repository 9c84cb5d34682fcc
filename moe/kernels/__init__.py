"""The kernels floor: it imports only torch and triton (and, for the C kernels, ctypes).

Native (C, CPU; compiled on first use by ``native``):

- ``native``: builds every C library of the project into a per-user cache and loads it through ctypes.
- ``cpu_gemm`` + ``csrc/``: the skinny decode GEMM, the packed block GEMM (fp32 and e4m3 weights), the two-call
  decode MoE; used by ``moe.backends``, ``quant`` and ``hypermoe``.

Triton (the ``triton`` backend; importing one of these imports triton, ``moe`` itself never does):

- ``index_shuffle``: ``topk_ids_TK`` -> expert-sorted order, counts, offsets (one launch for small N).
- ``gemm_act``: grouped GEMM 1, gathering token rows on load, gated activation in the epilogue -> ``h_NF``.
- ``gemm_combine``: grouped GEMM 2, routing weight and scatter-add (or deterministic combine) -> ``y_TD``.
- ``fp8_grouped_gemm``: both grouped GEMMs on e4m3 operands with fp32 accumulation.
- ``schedule``: the tile schedule (and why), the shared tile prologue, the default tile-config table and the
  autotune candidates.
"""
