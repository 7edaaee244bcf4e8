"""The optional fused C++ kernel for MID-L rows with their own masks (batch 1, a few tokens).

Built with ``torch.utils.cpp_extension.load`` on first use (about 10 s, once) and cached in
torch's extension directory, so importing the package stays light and installing it needs no
compiler. When the build fails (no compiler, no ninja) or ``MIDL_NO_KERNEL=1`` is set,
``fused_kernel()`` returns None and the layers run their pure-torch paths, with one debug log
line saying why.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "midl_kernel.cpp"
# Part of the extension's name: bump it with any change to the source so a stale build is not reused.
_VERSION = 15
# Rows per call the kernel accepts (kMaxRows in the source).
KERNEL_ROW_LIMIT = 64


def kernel_disabled() -> bool:
    """True when the user opted out of the compiled kernel with ``MIDL_NO_KERNEL=1``."""
    return os.environ.get("MIDL_NO_KERNEL", "").strip().lower() in ("1", "true", "yes")


def fused_kernel() -> ModuleType | None:
    """The compiled kernel module, or None when it is disabled or cannot be built here."""
    if kernel_disabled():
        _log_once("disabled by MIDL_NO_KERNEL")
        return None
    return _build()


@functools.lru_cache(maxsize=None)
def _build() -> ModuleType | None:
    """Compile (or load the cached build of) the kernel once per process; None if that fails."""
    try:
        cpp_extension = _quiet_import_cpp_extension()
        return cpp_extension.load(
            name=f"midl_kernel_v{_VERSION}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # any build or load failure means "run without it"
        first_line = " ".join(str(err).strip().splitlines()[:1])
        _log_once(f"could not be built ({type(err).__name__}: {first_line})")
        return None


def _quiet_import_cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, without the CUDA_HOME warning it logs on import of a CPU-only run."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


@functools.lru_cache(maxsize=None)
def _log_once(reason: str) -> None:
    log.debug("MID-L fused kernel %s; layers use their torch paths", reason)


def kernel_applies(*tensors: torch.Tensor) -> bool:
    """The kernel computes in float32 on the CPU (it makes small strided inputs contiguous itself)."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def tracing() -> bool:
    """True when something records the ops it cannot see inside the kernel: torch.compile,
    torch.export, jit tracing, or a dispatch mode such as ``FlopCounterMode``."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5
    return (torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing()
            or torch._C._len_torch_dispatch_stack() > 0)
