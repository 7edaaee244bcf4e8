"""The optional fused C++ kernels for MID-L rows with their own masks (batch 1, a few tokens),
as torch ops that ``torch.compile``, ``torch.export`` and ``FlopCounterMode`` can see.

The kernels are built with ``torch.utils.cpp_extension.load`` on first use (about 10 s, once) and
cached in torch's extension directory under a name keyed on the source version and the CPU's
instruction set, so importing the package stays light, installing it needs no compiler, and a
home directory shared between machines never loads a build this CPU cannot run. When the build
fails (no compiler, no ninja) or ``MIDL_NO_KERNEL=1`` is set, ``fused_kernel()`` returns None, the
layers run their pure-torch paths (with one debug log line saying why), and the ops run their
pure-torch references, so exported and compiled graphs stay valid. Loading the build registers the
ops' C++ CPU kernels for the rest of the process, so set ``MIDL_NO_KERNEL`` before the first call.

The ops (``torch.ops.midl``), each with a fake implementation, an autocast rule (float32 inside)
and a FLOP formula that counts what runs:

- ``output_rows(x, weight, bias, down, up, gate, gate_bias, gate_abs, k, threshold, kernel_rows)``:
  output-side MID-L on rows ``x (R, in)``; the kernel for 1 to ``kernel_rows`` rows (at most
  ``KERNEL_ROW_LIMIT``), dense compute plus masking for any other count, so a graph with a
  dynamic batch never branches on it.
- ``input_rows(x, wt, bias, v, u, scale, k, threshold, wt_scale=None, centre=None)``: input-side MID-L
  (see ``input_rows_reference``) on ``x - centre``; the kernel for 1 to ``KERNEL_MAX_ROWS`` rows, a
  masked GEMM otherwise. ``wt`` is float32, bfloat16 (with bfloat16 rows) or int8 with ``wt_scale``,
  its scale per output (float32 rows): the kernel widens the weights it reads in registers and sums in float32
  (with AVX-512 BF16 / VNNI, pairs of picked rows by one dot-product instruction; int8 then rounds
  the picked inputs to int16, one scale per row: an error near 1e-5 of the output's scale).
- ``top_k_rows(scores, k)``: ascending indices of each row's k largest scores.

``threshold`` NaN means exactly ``k`` per row; otherwise each row's scores above it (at least one).
An empty ``bias`` means none.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import platform
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "midl_kernel.cpp"
# Part of the extension's name and of the latency cache's key: bump it with any change to the source,
# so neither a stale build nor its timings are reused.
KERNEL_VERSION = 40
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
# Rows per call the output-side kernel accepts (kMaxRows in the source).
KERNEL_ROW_LIMIT = 64
# Rows with their own masks up to which the kernels serve a call: up to 8 the output side beat
# dense compute plus masking on the ViT-S and BERT-base MLP shapes (1 thread; at 16 they tie).
KERNEL_MAX_ROWS = 8


# Stands in for a missing bias in the ops' arguments.
NO_BIAS = torch.empty(0)


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
            name=extension_name(KERNEL_VERSION, cpu_isa()),
            sources=[str(SOURCE)],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # any build or load failure means "run without it"
        first_line = " ".join(str(err).strip().splitlines()[:1])
        _log_once(f"could not be built ({type(err).__name__}: {first_line})")
        return None


def cpu_isa() -> str:
    """What a ``-march=native`` build may use here: the machine, torch's CPU capability and the
    CPU's feature flags (``flags`` on x86, ``Features`` on ARM)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1] for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return " ".join([platform.machine(), torch.backends.cpu.get_cpu_capability(),
                     *(sorted(flags.split()) or [platform.processor()])])


def extension_name(version: int, isa: str) -> str:
    """The build's name: the source version and a short hash of the instruction set and flags it
    was compiled for, so each CPU kind gets its own build in a shared extension directory."""
    digest = hashlib.sha1(" ".join([isa, *_CFLAGS]).encode()).hexdigest()[:12]
    return f"midl_kernel_v{version}_{digest}"


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


def kernel_takes(x: torch.Tensor) -> bool:
    """Rows the ops compute on: float32 on the CPU, or CPU autocast's dtype while it is on (the
    ops' autocast rule casts them to float32, as the kernels compute)."""
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.float32 or (
        torch.is_autocast_enabled("cpu") and x.dtype == torch.get_autocast_dtype("cpu"))


def tracing() -> bool:
    """True under torch.compile, torch.export or jit tracing: shapes may be symbolic, so the
    layers leave the choice between kernel and dense compute to the op, at run time."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5
    return torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing()


# ----- pure-torch references: the ops' fallbacks, and what the kernels are tested against -------------
def top_mask(s: torch.Tensor, k: int, threshold: float) -> torch.Tensor:
    """Boolean mask (R, n) of each row's ``k`` largest scores, or with a threshold (not NaN) of its
    scores above it (at least one): the kernels' selection (NaN scores rank first, as in topk)."""
    if s.shape[0] == 0:
        return torch.zeros_like(s, dtype=torch.bool)
    if math.isnan(threshold):
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k, dim=-1, sorted=False).indices, True)
    # The scores above the threshold are each row's top count: one compare, not a sort (a sorted
    # top-k of the largest count took 0.6 ms per SmolLM2 layer on a 32-token prompt).
    # Each row's largest score is above it whenever any is, so marking it gives "at least one".
    return ((s > threshold) | s.isnan()).scatter_(-1, s.argmax(-1, keepdim=True), True)


def output_scores(x: torch.Tensor, down: torch.Tensor, gate: torch.Tensor, gate_bias: torch.Tensor,
                  gate_abs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output-side light projection ``h = V x`` and gate scores (R, out) of rows ``x``."""
    h = F.linear(x, down)
    s = F.linear(h, gate, gate_bias) if down.shape[0] else gate_bias.expand(x.shape[0], -1)
    return h, torch.where(gate_abs.bool(), s.abs(), s)


def output_rows_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, down: torch.Tensor,
                          up: torch.Tensor, gate: torch.Tensor, gate_bias: torch.Tensor, gate_abs: torch.Tensor,
                          k: int, threshold: float) -> torch.Tensor:
    """Output-side MID-L on rows ``x (R, in)`` by dense compute plus masking (``midl::output_rows``' fallback)."""
    b = bias if bias.numel() else None
    h, s = output_scores(x, down, gate, gate_bias, gate_abs)
    if down.shape[0]:
        light = F.linear(h, up, b)
    else:
        light = x.new_zeros(x.shape[0], weight.shape[0]) + (b if b is not None else 0)
    return torch.where(top_mask(s, k, threshold), F.linear(x, weight, b), light)


def input_scores(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Input-side scores ``|x_j| scale_j`` (R, in)."""
    return x.abs() * scale


def input_rows_reference(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                         scale: torch.Tensor, k: int, threshold: float, wt_scale: torch.Tensor | None = None,
                         centre: torch.Tensor | None = None) -> torch.Tensor:
    """Input-side MID-L on rows ``x (R, in)``: the selected inputs through ``W`` (stored transposed,
    ``wt (in, out)``; int8 with ``wt_scale`` per output), the rest through the light path
    ``u (v x_rest)``, plus ``bias`` (empty: none). With ``centre`` the rows are ``x - centre`` (the
    caller folds ``W centre`` into ``bias``). ``midl::input_rows``' fallback: a masked GEMM, which is
    also the fast way for many rows."""
    if centre is not None:
        x = x - centre
    mask = top_mask(input_scores(x, scale), k, threshold)
    exact = torch.where(mask, x, 0.0)
    if wt_scale is not None:  # a scale per output commutes with the sum over inputs
        y = (exact @ wt.to(x.dtype)) * wt_scale
        y = y + bias if bias.numel() else y
    else:
        y = exact @ wt if bias.numel() == 0 else torch.addmm(bias, exact, wt)
    if v.shape[0]:
        y = y + F.linear(F.linear(x - exact, v), u)
    return y


def top_k_rows_reference(s: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices (B, k) of each row's k largest scores (``midl::top_k_rows``' fallback)."""
    return s.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


# ----- the ops -------------------------------------------------------------------------------------
# Their CPU kernels are C++, registered by loading the build (no Python per call); the pure-torch
# implementations below serve every other case: before the first load (they trigger it), without
# a build (no compiler, MIDL_NO_KERNEL=1), and on other devices.
torch.library.define(
    "midl::output_rows",
    "(Tensor x, Tensor weight, Tensor bias, Tensor down, Tensor up, Tensor gate, Tensor gate_bias, "
    "Tensor gate_abs, int k, float threshold, int kernel_rows) -> Tensor",
)
torch.library.define(
    "midl::input_rows",
    "(Tensor x, Tensor wt, Tensor bias, Tensor v, Tensor u, Tensor scale, int k, float threshold, "
    "Tensor? wt_scale=None, Tensor? centre=None) -> Tensor",
)
torch.library.define("midl::top_k_rows", "(Tensor scores, int k) -> Tensor")


def _compiled(name: str, x: torch.Tensor) -> bool:
    """True when op ``name`` has its C++ CPU kernel for ``x``; loads the build on first use."""
    return (x.device.type == "cpu" and fused_kernel() is not None
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"midl::{name}", "CPU"))


def _output_rows(x, weight, bias, down, up, gate, gate_bias, gate_abs, k, threshold, kernel_rows):  # noqa: ANN001
    if _compiled("output_rows", x):
        return torch.ops.midl.output_rows.default(x, weight, bias, down, up, gate, gate_bias, gate_abs, k,
                                                  threshold, kernel_rows)
    return output_rows_reference(x, weight, bias, down, up, gate, gate_bias, gate_abs, k, threshold)


def _input_rows(x, wt, bias, v, u, scale, k, threshold, wt_scale=None, centre=None):  # noqa: ANN001
    if _compiled("input_rows", x):
        return torch.ops.midl.input_rows.default(x, wt, bias, v, u, scale, k, threshold, wt_scale, centre)
    return input_rows_reference(x, wt, bias, v, u, scale, k, threshold, wt_scale, centre)


def _top_k_rows(scores, k):  # noqa: ANN001
    if _compiled("top_k_rows", scores):
        return torch.ops.midl.top_k_rows.default(scores, k)
    return top_k_rows_reference(scores, k)


for _name, _impl in (("output_rows", _output_rows), ("input_rows", _input_rows), ("top_k_rows", _top_k_rows)):
    torch.library.impl(f"midl::{_name}", "CompositeExplicitAutograd", _impl)


def input_kernel_applies(x: torch.Tensor, wt: torch.Tensor) -> bool:
    """The input side's storage combinations the kernel serves: float32 throughout, bfloat16
    throughout, or int8 weights with float32 rows (the C++ ``input_dtypes``)."""
    pairs = {(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.int8)}
    return x.device.type == wt.device.type == "cpu" and (x.dtype, wt.dtype) in pairs


def kernel_runs(name: str, x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    """Whether the C++ kernel (not the dense fallback) serves this call of op ``name``."""
    applies = input_kernel_applies(x, weight) if name == "input_rows" else kernel_applies(x, weight)
    return (0 < x.shape[0] <= max_rows and applies
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"midl::{name}", "CPU"))


@torch.library.register_fake("midl::output_rows")
def _output_rows_fake(x, weight, *args):  # noqa: ANN001
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("midl::input_rows")
def _input_rows_fake(x, wt, *args):  # noqa: ANN001
    return x.new_empty(x.shape[0], wt.shape[1])


@torch.library.register_fake("midl::top_k_rows")
def _top_k_rows_fake(scores, k):  # noqa: ANN001
    return scores.new_empty(scores.shape[0], k, dtype=torch.long)


for _name in ("output_rows", "input_rows"):  # the kernels compute in float32: autocast's inputs are cast back
    torch.library.register_autocast(f"midl::{_name}", "cpu", torch.float32)


def mean_picks(scores: torch.Tensor, k: int, threshold: float) -> float:
    """Mean picks per row: ``k``, or the rows' counts above the threshold (fake tensors: ``k``)."""
    if math.isnan(threshold) or scores.shape[0] == 0 or torch._subclasses.fake_tensor.is_fake(scores):
        return k
    return float((scores > threshold).sum(-1).clamp_min(1).float().mean())


@register_flop_formula(torch.ops.midl.top_k_rows)
def _top_k_rows_flops(scores_shape, k, out_shape=None) -> int:  # noqa: ANN001
    """One compare per score, as the kinds' FLOPs formulas count the selection."""
    return scores_shape[0] * scores_shape[1]
