"""Native (C) kernels: compiled from source with the system C compiler on first use, loaded through ctypes.

Every C library of the project goes through :func:`load_library`: ``moe.kernels.cpu_gemm`` (the MoE layer's
CPU GEMMs, also used by ``quant`` and ``hypermoe``) and ``serve.models.cpu_attention`` (paged decode
attention). A library is built once per source, headers and flags into a per-user cache
(``$XDG_CACHE_HOME/moe-serve``, about a second) and needs an AVX2+FMA CPU; without one, or without a working
compiler, :func:`load_library` returns None and callers use torch instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

# -ffp-contract=off: a * b + c written as two operations stays two roundings (as torch computes it); the kernels
# ask for their FMAs explicitly.
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")

# ctypes shorthands for the signature tables of the loaders
LONG, PTR, INT, FLOAT = ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_float

Signatures = dict[str, tuple[list[Any], Any]]  # function name -> (argtypes, restype)


def build_library(source_path: Path, flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL | None:
    """Compile a C file with the system compiler into the per-user cache (once per source, headers and flags)
    and load it; None without an AVX2 CPU or a working compiler (callers then use torch)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not source_path.exists():
        return None
    source = source_path.read_bytes()
    # the headers next to it too, and the sources it includes: an edited one must rebuild every library using it
    included = {source_path.parent / name.decode() for name in re.findall(rb'#include "([^"]+)"', source)}
    headers = b"".join(h.read_bytes() for h in sorted({*source_path.parent.glob("*.h"), *included}))
    digest = hashlib.sha256(source + headers + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe-serve"
    target = cache / f"{source_path.stem}-{digest}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, str(source_path), "-o", str(built)], capture_output=True)
            if result.returncode != 0:
                return None
            os.replace(built, target)  # atomic: concurrent first uses never see a half-written library
    return ctypes.CDLL(str(target))


def load_library(source_path: Path, signatures: Signatures, flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL | None:
    """:func:`build_library`, with ``argtypes`` / ``restype`` set for every function in ``signatures``."""
    lib = build_library(source_path, flags)
    if lib is None:
        return None
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib
