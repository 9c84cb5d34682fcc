"""Benchmarks, run as ``python -m benchmarks.<name>``; each prints ratios measured in one run.

OpenMP threads wait passively unless ``OMP_WAIT_POLICY`` is set, as in ``moe-serve`` (see ``serve/__init__.py``):
set here because the benchmarks import torch before ``serve``, and the runtime reads it when torch loads it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
