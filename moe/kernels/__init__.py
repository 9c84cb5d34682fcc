"""Triton kernels for the ``triton`` backend. Importing a submodule imports triton; ``moe`` itself never does.

- ``index_shuffle``: ``topk_ids_TK`` -> expert-sorted order, counts, offsets (one launch for small N).
- ``gemm_act``: grouped GEMM 1, gathering token rows on load, gated activation in the epilogue -> ``h_NF``.
- ``gemm_combine``: grouped GEMM 2, routing weight and scatter-add (or deterministic combine) -> ``y_TD``.
- ``schedule``: the tile schedule (and why), the default tile-config table and the autotune candidates.
"""
