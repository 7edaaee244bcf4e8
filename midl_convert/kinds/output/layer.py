"""The output kind's MID-L layers (the paper's): a dense layer whose output neurons are chosen per
input between the exact weights and a cheap rank-r path.

    y = m * (W x + b) + (1 - m) * (U V x + b),    m = TopK(sigma(score(V x)), k = ceil(keep * out))

``W, b`` are the original weights; ``U V`` is the truncated SVD of ``W`` (``U = U_s sqrt(S)``,
``V = sqrt(S) V_s^T``); the gate reads the light path's projection ``h = V x``, so it costs
``r * out`` extra, not ``in * out``.

Gate initialisation (``gate_mode="abs"``, ``G = U``, ``c = 0``): the score of neuron ``i`` is
``|U_i h + c_i|`` = ``|U_i h|``, the light path's own estimate of ``|W_i x|``; the neurons that
carry the largest outputs take the exact path. Calibration (``calibrate.py``) refits ``G, c`` to
predict the light path's error, either signed (``gate_mode="abs"``: score ``|G h + c|``) or its
magnitude (``gate_mode="linear"``: score ``G h + c``).
With ``rank == 0`` there is no ``h``; the score is ``c``, initialised to the row norms of ``W``
(static magnitude selection), and unselected neurons output ``b`` alone.

Forward: a hard Top-k mask; in training its gradient is that of ``sigma(score)`` (straight
through), so the gate learns. The compute paths give the same numbers: ``reference`` (full
output, then masked), ``sparse`` (only the selected rows of ``W`` per shared mask) and
``kernel`` (the fused C++ kernel of ``kernels.py`` for a few rows with their own masks, e.g.
batch-1 decoding). ``route="auto"`` picks, in eval, the kernel for up to ``KERNEL_MAX_ROWS``
rows with their own masks (when autograd is off), ``sparse`` for shared masks, and ``masked``
(``reference`` without the training-only blend) otherwise; in training, ``reference``. The
choices are measured by ``benchmarks/layer_speed.py``.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...deprecation import renamed_attributes
from ...fitting import fit_threshold, linalg_threads, svd_factors
from ...kernels import KERNEL_MAX_ROWS, KERNEL_ROW_LIMIT, fused_kernel, kernel_applies, kernel_takes, tracing
from ...kernels import NO_BIAS as _NO_BIAS
from ...sparse import CONV_GRANULARITIES, LINEAR_GRANULARITIES, ConvRows, LinearRows, SparseLayer, check_keep, check_rank
from .fit import calibrate_output_layer
from ...flops import dense_flops
from .flops import midl_flops_parts

Granularity = Literal["token", "sequence", "pixel", "sample"]
GateMode = Literal["abs", "linear"]
Route = Literal["auto", "reference", "sparse", "kernel"]
# Rows of W gathered at once by the sparse path (elements), so a long batch of per-token
# masks does not materialise a (tokens, k, in) copy of W in one go.
_GATHER_CHUNK = 1 << 24


def _channels_first(x: torch.Tensor) -> bool:
    """Rows (G, n, in) that are the pixels of channels-first images: each group is a contiguous (in, n) block."""
    return x.shape[1] > 1 and x.transpose(1, 2).is_contiguous()


class OutputMIDLBase(SparseLayer):
    """The maths of output-side MID-L layers on rows ``(G, n, in)``; subclasses map their input to rows."""

    select = "output"
    default_rank = 32

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        keep: float,
        rank: int,
        granularity: str,
        allowed: tuple[str, ...],
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_settings(in_features, out_features, keep, rank, granularity, allowed, device)
        # Gate form, kept in the state dict so a saved calibrated layer reloads as it was: 1 = abs, 0 = linear.
        self.register_buffer("gate_abs", torch.ones((), dtype=torch.uint8, device=device))
        self.route: Route = "auto"  # the compute route forced, or "auto"
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.light_down = nn.Parameter(torch.zeros(rank, in_features, **factory))  # V
        self.light_up = nn.Parameter(torch.zeros(out_features, rank, **factory))  # U
        self.gate_weight = nn.Parameter(torch.zeros(out_features, rank, **factory))  # G
        self.gate_bias = nn.Parameter(torch.zeros(out_features, **factory))  # c

    # ----- set-up -------------------------------------------------------------------------
    @property
    def gate_mode(self) -> GateMode:
        return "abs" if bool(self.gate_abs) else "linear"

    @gate_mode.setter
    def gate_mode(self, mode: GateMode) -> None:
        if mode not in ("abs", "linear"):
            raise ValueError(f"gate_mode must be 'abs' or 'linear', got {mode!r}")
        self.gate_abs.fill_(1 if mode == "abs" else 0)

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Copy ``W, b`` and initialise the light path (truncated SVD) and the gate (``G = U``)."""
        self.weight.copy_(weight)
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias)
        u, v = svd_factors(self.weight, self.rank)
        self.light_up.copy_(u)
        self.light_down.copy_(v)
        self.gate_weight.copy_(u)
        self.gate_mode = "abs"
        if self.rank == 0:
            self.gate_bias.copy_(self.weight.float().norm(dim=1))
        else:
            self.gate_bias.zero_()

    # ----- maths on rows (..., in) --------------------------------------------------------
    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Gate scores (..., out) from the light path's projection ``h = V x``; higher = exact path."""
        if self.rank == 0:
            s = self.gate_bias.expand(*h.shape[:-1], self.out_features)
        else:
            s = F.linear(h, self.gate_weight, self.gate_bias)
        return torch.where(self.gate_abs.bool(), s.abs(), s)  # no Python branch on a buffer: export-safe

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _light(self, h: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            out = h.new_zeros(*h.shape[:-1], self.out_features)
            return out + self.bias if self.bias is not None else out
        return F.linear(h, self.light_up, self.bias)

    def mix_rows(self, x: torch.Tensor) -> torch.Tensor:
        """MID-L on grouped rows ``x (G, n, in)``, one mask per group from the mean of its ``V x``."""
        if self.exact:
            return self._dense(x)
        route = self.compute_route(x)
        if route == "kernel":
            return self._fused(x)
        h = F.linear(x, self.light_down)
        s = self.scores(h.mean(dim=1, keepdim=True) if x.shape[1] > 1 else h)  # (G, 1, out)
        idx = self._pick(s)
        self._record(self.counts if self.counts is not None else idx.shape[-1])
        if route == "sparse":
            return self._sparse(x, h, idx)
        return self._masked(x, h, idx) if route == "masked" else self._reference(x, h, s, idx)

    def compute_route(self, x: torch.Tensor) -> str:
        """The route ``mix_rows`` takes for grouped rows ``x``: "kernel", "sparse", "masked" (eval's
        dense compute plus masking) or "reference". ``route="kernel"`` raises when the kernel
        cannot serve ``x``, rather than fall back unseen."""
        if self.route in ("auto", "kernel"):
            blocker = self._kernel_blocker(x, self._kernel_rows)
            if blocker is None:
                return "kernel"
            if self.route == "kernel":
                raise RuntimeError(f"path='kernel' cannot run this call: {blocker}; use path='auto' to fall back")
        if self.route == "sparse" or (self.route == "auto" and not self.training and self._sparse_pays(x)):
            return "sparse"
        return "masked" if self.route == "auto" and not self.training else "reference"

    @property
    def _kernel_rows(self) -> int:
        """Rows with their own masks the kernel serves: up to where it pays (auto), or all it can (forced)."""
        return KERNEL_MAX_ROWS if self.route == "auto" else KERNEL_ROW_LIMIT

    @staticmethod
    def _sparse_pays(x: torch.Tensor) -> bool:
        """Gathering rows of W pays when one mask serves many rows (sequence / sample masks). A
        mask per row copies k rows of W per row: slower than dense compute plus masking even at
        batch 1 (2.8x slower at 768x3072), which the fused kernel serves instead."""
        return x.shape[1] > 1

    def _kernel_blocker(self, x: torch.Tensor, max_rows: int) -> str | None:
        """Why the fused kernel's op cannot serve ``x`` (None if it can). It has no autograd and reads
        raw float32 CPU memory, and it is built (seconds, once) only when every other check passes.
        Under compile or export the op itself chooses, per call, between the kernel and dense
        compute plus masking, so the graph never branches on the (maybe dynamic) row count."""
        if self.training:
            return "the layer is in training mode"
        if x.shape[1] != 1:
            return "rows share a mask (sequence / sample granularity); the sparse path serves them"
        traced = tracing()
        if not traced and x.shape[0] > max_rows:
            return f"{x.shape[0]} rows with their own masks, more than {max_rows}"
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return "autograd is recording (run under torch.no_grad() or torch.inference_mode())"
        if not (kernel_takes(x) and kernel_applies(self.weight) and self.weight.is_contiguous()):
            return "it needs float32 CPU tensors and a contiguous weight (it never copies W)"
        if not traced and fused_kernel() is None:
            return "the C++ kernel is disabled (MIDL_NO_KERNEL=1) or could not be built"
        return None

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """Rows with their own masks (G, 1, in) through the fused kernel: reads only the k picked
        rows of W per row, with no copies of W."""
        p = self._parameters  # one lookup, not seven nn.Module.__getattr__ calls (4 µs of a 60 µs call)
        bias = p.get("bias")  # absent when the layer has no bias
        bias = _NO_BIAS if bias is None else bias
        rows = x.reshape(x.shape[0], self.in_features)
        threshold = math.nan if self._threshold is None else self._threshold
        y = torch.ops.midl.output_rows.default(
            rows, p["weight"], bias, p["light_down"], p["light_up"], p["gate_weight"], p["gate_bias"],
            self.gate_abs, self.k, threshold, self._kernel_rows,
        )
        if self.track_stats:  # adaptive: each row's count above the threshold (the op counts its own)
            self._record(self.k if self._threshold is None
                         else self.mask_counts(self.scores(F.linear(rows, self.light_down)), self._threshold))
        return y.unsqueeze(1)

    def _pick(self, s: torch.Tensor) -> torch.Tensor:
        """Indices (G, 1, k) of the exact neurons: the kernel's O(out) selection where it can run
        (torch.topk took 1.0 ms on 32 x 3072 scores, the kernel 0.36 ms), else ``torch.topk``.
        Indices carry no gradient, so this holds in training too.

        Adaptive masks pick each group's ``k_g`` neurons above the threshold (at least one; in
        training the batch's own ``1 - keep`` quantile, so the gates cannot learn to buy more): the
        indices are (G, 1, max k_g), a group's surplus slots repeating its best neuron, which every
        path computes twice and writes once; ``self.counts`` keeps each ``k_g``."""
        self.counts = None
        if self._threshold is None:
            return self._top(s, self.k)
        threshold = self._threshold
        if self.training:  # the batch's own quantile: training cannot buy exact neurons by raising every score
            threshold = fit_threshold(s.detach(), self.keep)
        counts = self.mask_counts(s.detach(), threshold).reshape(-1)  # (G,)
        idx = self._top(s, int(counts.max()))
        ranked = torch.gather(s.detach(), -1, idx).argsort(dim=-1, descending=True, stable=True)
        idx = torch.gather(idx, -1, ranked)  # best first
        slot = torch.arange(idx.shape[-1], device=idx.device)
        idx = torch.where(slot < counts[:, None, None], idx, idx[..., :1])
        self.counts = counts
        return idx

    def _top(self, s: torch.Tensor, k: int) -> torch.Tensor:
        if kernel_applies(s) and (tracing() or fused_kernel() is not None):  # traced: the op decides at run time
            return torch.ops.midl.top_k_rows.default(s.detach().reshape(s.shape[0], -1), k).unsqueeze(1)
        return s.topk(k, dim=-1, sorted=False).indices

    def _masked(self, x: torch.Tensor, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Eval with a mask per row: the light output with the picked neurons' dense outputs written
        over it; one gather and scatter, where ``_reference`` builds and blends full masks."""
        return self._light(h).scatter_(-1, idx, self._dense(x).gather(-1, idx))

    def _reference(self, x: torch.Tensor, h: torch.Tensor, s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        hard = torch.zeros_like(s).scatter_(-1, idx, 1.0)
        if self.training and torch.is_grad_enabled():
            soft = torch.sigmoid(s)
            hard = hard + soft - soft.detach()  # straight-through: d mask = d sigma(score)
        light = self._light(h)
        return light + hard * (self._dense(x) - light)

    def _sparse(self, x: torch.Tensor, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Compute only the k selected rows of W per mask, and the light path elsewhere."""
        idx = idx[:, 0]  # (G, k): one mask per group
        if x.shape[1] == 1:
            return self._sparse_rows(x, h, idx)
        if _channels_first(x):
            return self._sparse_columns(x, h, idx)
        out = self._light(h)
        for g in range(x.shape[0]):  # per group: a plain GEMM on the k rows (1.2-2.8x faster than bmm)
            sel = idx[g] if self.counts is None else idx[g, : int(self.counts[g])]
            out[g].index_copy_(1, sel, F.linear(x[g], self.weight.index_select(0, sel), self._bias_at(sel)))
        return out

    def _sparse_columns(self, x: torch.Tensor, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Shared masks on the pixels of channels-first images: ``W_sel @ X`` per image gives
        (k, pixels) blocks, so the result is laid out like a dense conv's output (NCHW) with no
        transposing copy (rows, then NCHW, measured 3-5x slower for the light path alone)."""
        groups, n = x.shape[:2]
        cols, h_cols = x.transpose(1, 2), h.transpose(1, 2)  # (G, in, n) contiguous, (G, r, n)
        bias = self.bias[None, :, None] if self.bias is not None else x.new_zeros(())
        if self.rank == 0:
            out = bias.expand(groups, self.out_features, n).clone()
        else:
            out = torch.baddbmm(bias, self.light_up.expand(groups, -1, -1), h_cols)  # (G, out, n)
        for g in range(groups):
            sel = idx[g] if self.counts is None else idx[g, : int(self.counts[g])]
            w = self.weight.index_select(0, sel)
            exact = w @ cols[g] if self.bias is None else torch.addmm(self._bias_at(sel)[:, None], w, cols[g])
            out[g].index_copy_(0, sel, exact)
        return out.transpose(1, 2)

    def _sparse_rows(self, x: torch.Tensor, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """A mask per row (``route="sparse"`` forced): rows of W gathered for all rows at once,
        in chunks, so a long batch does not copy a (rows, k, in) block of W in one go."""
        out = self._light(h)
        groups = idx.shape[0]
        step = max(1, _GATHER_CHUNK // max(1, self.k * self.in_features))
        for lo in range(0, groups, step):
            sel = idx[lo : lo + step]
            exact = torch.bmm(x[lo : lo + step], self.weight[sel].transpose(1, 2))  # (g, 1, k)
            if self.bias is not None:
                exact = exact + self.bias[sel][:, None, :]
            out[lo : lo + step].scatter_(-1, sel[:, None, :].expand_as(exact), exact)
        return out

    def _bias_at(self, sel: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.index_select(0, sel)

    # ----- the interface (sparse.py) -------------------------------------------------------
    @property
    def width(self) -> int:
        return self.out_features  # a mask picks output neurons

    def flops_parts(self, rows: int, groups: int, k: float | None = None) -> dict[str, int]:
        if self.keeps_all:
            return {"dense": dense_flops(self.in_features, self.out_features, rows)}
        return midl_flops_parts(self.in_features, self.out_features, self.rank, rows, groups,
                                self.k if k is None else k)

    def trainable_names(self, train: str) -> tuple[str, ...]:
        return ("gate_weight", "gate_bias") if train == "gates" else ("gate_weight", "gate_bias", "light_up", "light_down")

    def mask_scores(self, groups: torch.Tensor) -> torch.Tensor:
        return self.scores(F.linear(groups, self.light_down).mean(1))

    def calibrate_rows(self, groups: torch.Tensor, **kwargs: Any) -> Any:
        return calibrate_output_layer(self, groups, **kwargs)

    def takes_output_weights(self, post: Any) -> bool:
        return post is None and self.rank > 0


class OutputMIDLinear(LinearRows, OutputMIDLBase):
    """Output-side MID-L replacement for ``nn.Linear`` (and Hugging Face ``Conv1D``), features last.

    ``granularity="token"``: a mask per row of the input; ``"sequence"``: one mask per sample
    from the gate applied to ``V x`` averaged over the middle (sequence) axes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        keep: float = 0.5,
        rank: int = 0,
        granularity: str = "token",
        bias: bool = True,
        transposed: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, keep, rank, granularity, LINEAR_GRANULARITIES, bias, device, dtype)
        # True when the original was an HF Conv1D (weight stored (in, out)); used to unload it.
        self.transposed = transposed


class OutputMIDLConv2d(ConvRows, OutputMIDLBase):
    """Output-side MID-L replacement for a 1x1 ``nn.Conv2d`` (groups 1, any stride and zero padding).

    ``granularity="pixel"``: a mask per spatial position; ``"sample"``: one mask per sample
    from the gate applied to the spatially pooled ``V x``, so whole filters are skipped.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        keep: float = 0.5,
        rank: int = 0,
        granularity: str = "pixel",
        bias: bool = True,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, keep, rank, granularity, CONV_GRANULARITIES, bias, device, dtype)
        self.stride, self.padding = tuple(stride), tuple(padding)


# The output kind's classes were called MIDLBase, MIDLinear and MIDLConv2d: "MID-L" names the whole family.
OLD_NAMES = {"MIDLBase": "OutputMIDLBase", "MIDLinear": "OutputMIDLinear", "MIDLConv2d": "OutputMIDLConv2d"}
__getattr__ = renamed_attributes(__name__, OLD_NAMES, globals())
