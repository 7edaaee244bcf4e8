"""Input-side MID-L: per input, the exact path reads only the ``k`` input neurons that matter most,
and a rank-r light path takes the rest (as TEAL / WINA at rank 0, R-Sparse with r > 0).

    y = W (m * x) + U V ((1 - m) * x) + b,    m = TopK(s, k = ceil(keep * in)),   s_j = g_j |x_j| c_j

Centred (``centring`` "mean", "median" or "auto"), every ``x`` above is ``x - mu`` for a per-input
centre ``mu`` fitted in calibration, and the bias is ``b + W mu``: what the centre carries goes
through ``W`` exactly, once, and the mask picks the inputs that stray furthest from their usual
value rather than the largest (SCAP's mode-centring; R-Sparse notes that the left-out inputs act
like a few bias terms). ``bias`` stays the original ``b``, so ``merge_and_unload`` gives it back.

``c_j`` is the norm of column j of what the exact path adds beyond the light path (``W - U V``;
``W`` at rank 0) and ``g`` a learned gate over input neurons (starts at 1, trains straight
through). The output-side gate reads only ``V x`` and, on layers that read or write a
transformer's residual stream, chooses no better than a fixed set of neurons; the magnitude
``|x_j|`` is what makes the choice visible here.

``W`` is stored transposed in memory (``weight`` is an ``(out, in)`` view of a contiguous
``(in, out)`` block), so each input neuron's column is one contiguous row that the exact path
reads with no copy.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...fitting import fit_threshold, svd_factors
from ...kernels import NO_BIAS  # importing kernels registers the midl ops
from ...sparse import CONV_GRANULARITIES, LINEAR_GRANULARITIES, ConvRows, LinearRows, SparseLayer
from ...weight_dtype import Bf16Linear, Int8Linear, quantize_rows
from .fit import calibrate_input_layer
from ...flops import dense_flops
from .flops import input_flops_parts

# How an input-side layer centres its inputs: not at all, on each input's calibration mean or median,
# or (auto) on whichever of the two leaves the lower output error on the calibration rows, per layer.
CENTRINGS = ("none", "mean", "median", "auto")


def check_centring(centring: str) -> str:
    if centring not in CENTRINGS:
        raise ValueError(f"centring must be one of {', '.join(CENTRINGS)}, got {centring!r}")
    return centring


class InputMIDLBase(SparseLayer):
    """The maths of input-side layers on rows ``(G, n, in)``; subclasses map their input to rows."""

    select = "input"
    default_rank = 0

    def __init__(self, in_features: int, out_features: int, keep: float, rank: int, granularity: str,
                 allowed: tuple[str, ...], bias: bool = True, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._init_settings(in_features, out_features, keep, rank, granularity, allowed, device)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(in_features, out_features, **factory).T)  # columns contiguous
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.light_down = nn.Parameter(torch.zeros(rank, in_features, **factory))  # V
        self.light_up = nn.Parameter(torch.zeros(out_features, rank, **factory))  # U
        self.gate = nn.Parameter(torch.ones(in_features, **factory))  # g
        self.register_buffer("column_norm", torch.ones(in_features, **factory))  # c
        self.register_buffer("centre", torch.zeros(in_features, **factory))  # mu (zero until calibrated)
        self.centring = "none"

    @property
    def centring(self) -> str:
        """How the inputs are centred: "none", "mean", "median" or "auto" (``CENTRINGS``)."""
        return self._centring

    @centring.setter
    def centring(self, value: str) -> None:
        self._centring = check_centring(value)

    @property
    def centred(self) -> bool:
        """True when the layer subtracts ``centre`` from its inputs (and pays for it)."""
        return self._centring != "none"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001 - torch's signature
        state_dict.setdefault(prefix + "centre", torch.zeros_like(self.centre))  # saved before centring
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def folded_bias(self) -> torch.Tensor | None:
        """The bias the layer adds: ``b + W mu`` when centred, else ``b``. Remembered in eval while
        ``W, mu, b`` keep their versions: computing it is one dense row, as much as a decode step saves."""
        b = self._parameters.get("bias")
        if not self.centred:
            return b
        # self.weight, not the stored tensor: a LoRA delta (recovery) parametrizes it until it is merged
        w, mu, scale = self.weight, self._buffers["centre"], self._buffers.get("weight_scale")
        tensors = tuple(t for t in (w, mu, b, scale) if t is not None)
        if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or torch.compiler.is_compiling() \
                or any(t.is_inference() for t in tensors):
            return F.linear(mu.to(w.dtype) if scale is None else mu, self.dense_weight(), b)
        key = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
        memo = self.__dict__.get("_fold_memo")  # (key, folded bias, the keyed tensors: their ids stay theirs)
        if memo is None or memo[0] != key:
            with torch.no_grad():
                memo = (key, F.linear(mu.to(w.dtype) if scale is None else mu, self.dense_weight(), b), tensors)
            self.__dict__["_fold_memo"] = memo
        return memo[1]

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.centre if self.centred else x

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Copy ``W, b``; the light path starts as the SVD of ``W`` and ``c`` as the columns of ``W - U V``."""
        self.weight.copy_(weight)
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias)
        self.set_light_path(*svd_factors(self.weight, self.rank))

    @torch.no_grad()
    def set_light_path(self, u: torch.Tensor, v: torch.Tensor, out_scale: torch.Tensor | None = None) -> None:
        """Take ``U, V`` and rescale the selection by the columns of what the exact path adds beyond them
        (each output row weighted by ``out_scale``, when given: its reach to the model's output)."""
        self.light_up.copy_(u)
        self.light_down.copy_(v)
        rest = self.weight.float() - (u.float() @ v.float() if self.rank else 0.0)
        if out_scale is not None:
            rest = rest * out_scale.float()[:, None]
        self.column_norm.copy_(rest.norm(dim=0))

    @torch.no_grad()
    def quantize_int8_(self) -> bool:
        """int8 weights with a float32 scale per output (weight-only, ``weight_dtype.py``): the
        kernel widens the picked columns in registers and scales the sum; bias, light path and gate
        stay as they are. The last step of a conversion: nothing trains the int8 weights."""
        q, scale = quantize_rows(self.weight)
        self.weight = nn.Parameter(q.T.contiguous().T, requires_grad=False)  # columns contiguous, as before
        self.register_buffer("weight_scale", scale)
        return True

    # ----- maths on rows (G, n, in) --------------------------------------------------------
    def mask_scores(self, groups: torch.Tensor) -> torch.Tensor:
        """Scores (G, in) of input groups: a group's mean |x_j - mu_j| times ``g_j c_j``; only the gate
        carries a gradient."""
        return self._scores(self._centre(groups.detach()))

    def _scores(self, xc: torch.Tensor) -> torch.Tensor:
        """``mask_scores`` of groups already centred."""
        size = xc.detach().abs().mean(1) if xc.shape[1] > 1 else xc.detach().abs()[:, 0]
        return size * (self.gate * self.column_norm)

    def _pick(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices (G, k_max) of each group's exact inputs, and each group's count with adaptive
        masks (None: exactly k); a group's surplus slots repeat its best input (a mask sets it once)."""
        s = s.detach()
        if self._threshold is None:
            self.counts = None
            return s.topk(self.k, dim=-1, sorted=False).indices, None
        threshold = fit_threshold(s, self.keep) if self.training else self._threshold
        counts = self.mask_counts(s, threshold)
        idx = s.topk(int(counts.max()), dim=-1, sorted=True).indices  # best first
        slot = torch.arange(idx.shape[-1], device=idx.device)
        self.counts = counts  # kept for inspection only: the last call's mask sizes
        return torch.where(slot < counts[:, None], idx, idx[:, :1]), counts

    def selection(self, groups: torch.Tensor) -> torch.Tensor:
        """The hard mask (G, n, in) of the exact inputs, 1 where exact."""
        idx, _ = self._pick(self.mask_scores(groups))
        mask = groups.new_zeros(groups.shape[0], self.in_features).scatter_(-1, idx, 1.0)
        return mask[:, None, :].expand_as(groups)

    def _light(self, rest: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(rest, self.light_down), self.light_up) if self.rank else 0.0

    def rows_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The layer by its definition: full-size masks, dense products (also the training path)."""
        x = self._centre(x)
        s = self._scores(x)
        idx, counts = self._pick(s)
        self._record(counts if counts is not None else idx.shape[-1])
        mask = torch.zeros_like(s).scatter_(-1, idx, 1.0)
        if self.training and torch.is_grad_enabled():
            kth = s.detach().gather(-1, idx).min(-1, keepdim=True).values.clamp_min(1e-12)
            soft = torch.sigmoid(s / kth - 1.0)  # straight-through: d mask = d sigma(score / k-th score - 1)
            mask = mask + soft - soft.detach()
        exact = x * mask[:, None, :]
        return F.linear(exact, self.dense_weight(), self.folded_bias()) + self._light(x - exact)

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        """A mask per group of many rows (sequence / sample): gather the k columns of x and the k
        contiguous rows of ``W^T``, one small GEMM per group, no scatter."""
        x = self._centre(x)
        idx, counts = self._pick(self._scores(x))
        self._record(counts if counts is not None else idx.shape[-1])
        wt, bias = self.dense_weight().T, self.folded_bias()
        outs = []
        for g in range(x.shape[0]):
            sel = idx[g] if counts is None else idx[g, : int(counts[g])]
            xs = x[g].index_select(-1, sel)  # (n, k)
            y = xs @ wt.index_select(0, sel)
            if bias is not None:
                y = y + bias
            if self.rank:
                h = F.linear(x[g], self.light_down) - xs @ self.light_down.T.index_select(0, sel)
                y = y + F.linear(h, self.light_up)
            outs.append(y)
        return torch.stack(outs)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """A mask per row in eval, through ``midl::input_rows``: the fused kernel for a few rows (it
        reads only the k picked rows of ``W^T``, no copy), one masked GEMM for many, and a graph
        node that torch.compile and export keep whatever the row count."""
        y = torch.ops.midl.input_rows.default(x.reshape(x.shape[0], self.in_features), *self._kernel_args())
        if self.track_stats:
            self._record(self.k if self._threshold is None else self.mask_counts(self.mask_scores(x), self._threshold))
        return y.unsqueeze(1)

    def _kernel_args(self) -> tuple:
        """The op's arguments after ``x``: ``W^T``, bias (``b + W mu`` when centred), ``V``, ``U``, ``g * c``
        (at least float32), ``k``, the threshold and the centre (None when uncentred). Remembered
        while they stay the same tensors with the same storage and ``g, c, mu, b`` keep their versions:
        at one row per call (decoding) rebuilding them costs as much as the kernel's own work on a
        small layer."""
        p, c, mu = self._parameters, self._buffers["column_norm"], self._buffers["centre"]
        w, b, v, u, g = p["weight"], p.get("bias"), p["light_down"], p["light_up"], p["gate"]
        if (torch.compiler.is_compiling() or g.is_inference() or c.is_inference()
                or (self.centred and (mu.is_inference() or w.is_inference()))):  # no version counter to trust
            return self._make_kernel_args(w, b, v, u, g, c)
        key = (id(w), w.data_ptr(), id(b), id(v), v.data_ptr(), id(u), u.data_ptr(), id(g), g._version, id(c),
               c._version, self.keep, self._threshold, self.centred,
               (id(mu), mu._version, w._version, None if b is None else b._version) if self.centred else None)
        memo = self.__dict__.get("_kernel_memo")  # (key, args, the keyed tensors: their ids stay theirs)
        if memo is None or memo[0] != key:
            memo = (key, self._make_kernel_args(w, b, v, u, g, c), (w, b, v, u, g, c, mu))
            self.__dict__["_kernel_memo"] = memo
        return memo[1]

    def _make_kernel_args(self, w, b, v, u, g, c) -> tuple:  # noqa: ANN001 - the layer's own tensors
        threshold = math.nan if self._threshold is None else self._threshold
        scale = (g * c).to(torch.promote_types(w.dtype, torch.float32)).detach()  # float32, or float64 for a float64 layer
        if self.centred:
            b = self.folded_bias()
        return (w.T, NO_BIAS if b is None else b, v, u, scale, self.k, threshold, self._buffers.get("weight_scale"),
                self.centre if self.centred else None)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """One row in eval with gradients off (a decoding step): straight to the op, skipping the
        general path's reshapes and checks (3.5 µs around the op instead of 9-10 µs, on layers that
        take 10-150 µs at SmolLM2's sizes)."""
        y = torch.ops.midl.input_rows.default(x.reshape(1, self.in_features), *self._kernel_args())
        return y.view(*x.shape[:-1], self.out_features)

    def mix_rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return F.linear(x, self.dense_weight(), self.bias)
        if self.training and torch.is_grad_enabled():
            return self.rows_reference(x)
        if x.shape[1] > 1:
            return self._sparse(x)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return self.rows_reference(x)  # the op has no autograd
        return self._rows(x)

    # ----- the interface (sparse.py) -------------------------------------------------------
    @property
    def width(self) -> int:
        return self.in_features  # a mask picks input neurons

    def flops_parts(self, rows: int, groups: int, k: float | None = None) -> dict[str, int]:
        if self.keeps_all:
            return {"dense": dense_flops(self.in_features, self.out_features, rows)}
        return input_flops_parts(self.in_features, self.out_features, self.rank, rows, groups,
                                 self.k if k is None else k, self.centred)

    def trainable_names(self, train: str) -> tuple[str, ...]:
        return ("gate",) if train == "gates" else ("gate", "light_up", "light_down")

    def calibrate_rows(self, groups: torch.Tensor, **kwargs: Any) -> Any:
        return calibrate_input_layer(self, groups, **kwargs)

    def configure(self, lp: Any) -> None:
        super().configure(lp)
        self.centring = lp.centre

    def takes_output_weights(self, post: Any) -> bool:
        return True


class InputMIDLinear(LinearRows, InputMIDLBase):
    """Input-side MID-L replacement for ``nn.Linear`` and HF ``Conv1D``: ``token`` picks inputs per
    row, ``sequence`` one set per sample from the mean |x| over its tokens."""

    def __init__(self, in_features: int, out_features: int, keep: float = 0.5, rank: int = 0, granularity: str = "token",
                 bias: bool = True, transposed: bool = False, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, keep, rank, granularity, LINEAR_GRANULARITIES, bias, device, dtype)
        self.transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.shape[-1] == self.in_features == x.numel() and not (self.training or self.track_stats or self.exact)
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            return self._decode(x)
        return super().forward(x)

    def merge_and_unload(self) -> nn.Module:
        """The original dense module as ``set_weight_dtype`` leaves a dense layer in this dtype: an
        ``Int8Linear`` for int8 weights (``quantize_int8_``), a ``Bf16Linear`` for bfloat16."""
        scale = self._buffers.get("weight_scale")
        if scale is None or self.transposed:
            dense = super().merge_and_unload()
            return Bf16Linear.from_linear(dense) if type(dense) is nn.Linear and dense.weight.dtype == torch.bfloat16 else dense
        dense = Int8Linear(self.in_features, self.out_features, self.bias is not None, self.weight.device)
        dense.set_int8(self.weight.detach(), scale, self.bias)
        return dense


class InputMIDLConv2d(ConvRows, InputMIDLBase):
    """Input-side MID-L replacement for a 1x1 ``nn.Conv2d``: ``pixel`` picks input channels per
    pixel, ``sample`` one set of channel planes per image."""

    def __init__(self, in_channels: int, out_channels: int, keep: float = 0.5, rank: int = 0, granularity: str = "pixel",
                 bias: bool = True, stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_channels, out_channels, keep, rank, granularity, CONV_GRANULARITIES, bias, device, dtype)
        self.stride, self.padding = tuple(stride), tuple(padding)
