"""The one interface every kind of sparse layer implements (as PEFT's ``BaseTunerLayer``).

A sparse layer holds a dense layer's ``W, b`` and, per input, computes only ``k`` of some
``width`` neurons exactly: output neurons for MID-L (``layers.py``), input neurons for input-side
MID-L (``input_layers.py``). The rest of the package reads only what is declared here:

- settings: ``select``, ``keep``, ``rank``, ``granularity``, ``adaptive``, ``threshold``, ``width``, ``k``;
- ``flops_parts(rows, groups, k)``: its FLOPs on a call shape, gate, light path and selection counted
  (``{"dense": ...}`` at keep 1, ``keeps_all``);
- ``trainable_names(train)``: the parameters distillation trains;
- ``calibrate_rows(groups, ...)``: its closed-form calibration on real input rows;
- ``mask_scores(groups)``: the scores a threshold is fitted on (adaptive masks);
- ``dense_forward``, ``merge_and_unload`` and ``disabled`` (``dense(model)``: run as the original).

``LinearRows`` and ``ConvRows`` map a Linear's or a 1x1 conv's input to rows grouped by mask
``(G, n, in)``; a kind's maths (``mix_rows``) works on those rows only.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

LINEAR_GRANULARITIES = ("token", "sequence")
CONV_GRANULARITIES = ("pixel", "sample")


def check_keep(keep: float) -> float:
    """Validate a keep fraction: the share of neurons that take the exact path."""
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}; use e.g. keep=0.5")
    return float(keep)


def check_rank(rank: int, in_features: int, out_features: int) -> int:
    """Validate a light-path rank against the layer's shape."""
    limit = min(in_features, out_features)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= limit:
        raise ValueError(
            f"rank must be an int in [0, {limit}] (min of in={in_features}, out={out_features}), got {rank!r}"
        )
    return rank


class SparseLayer(nn.Module):
    """Settings, statistics and thresholds shared by every kind; the maths is the subclass's."""

    select: ClassVar[str]  # the registered kind's name (``kinds/``): "output", "input", "prune", ...
    default_rank: ClassVar[int]  # the light path's rank when a builder is given none
    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_settings(self, in_features: int, out_features: int, keep: float, rank: int, granularity: str,
                       allowed: tuple[str, ...], device: Any = None) -> None:
        if granularity not in allowed:
            raise ValueError(f"granularity must be one of {allowed} for {type(self).__name__}, got {granularity!r}")
        self.in_features, self.out_features = in_features, out_features
        self.keep = check_keep(keep)
        self.rank = check_rank(rank, in_features, out_features)
        self.granularity = granularity
        # Adaptive masks: neurons whose score passes this threshold take the exact path, so the mask's
        # size follows the input (NaN: exactly k per mask). ``calibrate`` sets it where ``adaptive``.
        self.register_buffer("gate_threshold", torch.full((), float("nan"), device=device))
        self._threshold: float | None = None
        self.adaptive = False
        self.disabled = False  # ``dense(model)``: run as the original layer
        self.counts: torch.Tensor | None = None  # each mask's exact neurons in the last adaptive call
        self.track_stats = False
        # (BatchNorm path, activation) applied to this layer's output in the model, from the plan.
        self.downstream: tuple[str | None, str | None] = (None, None)
        self.reset_stats()

    # ----- settings --------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Neurons a mask chooses among (each kind says which)."""
        raise NotImplementedError

    @property
    def k(self) -> int:
        """Neurons per mask that take the exact path (on average, with adaptive masks)."""
        return min(self.width, math.ceil(self.keep * self.width - 1e-9))

    @property
    def exact(self) -> bool:
        """True when this layer runs as the original (keep 1, or disabled by ``dense``)."""
        return self.disabled or self.keeps_all

    @property
    def keeps_all(self) -> bool:
        """keep 1: every neuron takes the exact path, so the layer runs, and costs, as the original."""
        return self.keep >= 1.0

    @property
    def threshold(self) -> float | None:
        """The calibrated score threshold of adaptive masks, or None for exactly ``k`` per mask."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self.gate_threshold.fill_(float("nan") if value is None else value)
        self._threshold = value

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001 - torch's signature
        state_dict.setdefault(prefix + "gate_threshold", torch.full((), float("nan")))  # saved before adaptive masks
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        value = float(self.gate_threshold)
        self._threshold = None if math.isnan(value) else value

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, select={self.select}, keep={self.keep}, "
            f"rank={self.rank}, granularity={self.granularity}, bias={self.bias is not None}"
        )

    # ----- statistics ------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Forget the measured share of neurons on the exact path."""
        self.last_active_fraction: float | None = None
        self._active_sum = 0.0
        self._active_calls = 0

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Track statistics inside the block, then put back the statistics and the setting from before
        (a measurement that leaves the layer as it found it)."""
        saved = (self.track_stats, self.last_active_fraction, self._active_sum, self._active_calls)
        self.track_stats = True
        try:
            yield
        finally:
            self.track_stats, self.last_active_fraction, self._active_sum, self._active_calls = saved

    @property
    def active_fraction(self) -> float | None:
        """Running mean, over calls since ``reset_stats``, of the share of neurons on the exact path."""
        return self._active_sum / self._active_calls if self._active_calls else None

    def _record(self, picked: int | torch.Tensor) -> None:
        """Count the exact neurons of one call: ``k`` per mask, or each mask's count (adaptive)."""
        if self.track_stats:
            picked = picked.float().mean().item() if isinstance(picked, torch.Tensor) else picked
            frac = picked / self.width
            self.last_active_fraction = frac
            self._active_sum += frac
            self._active_calls += 1

    @staticmethod
    def mask_counts(s: torch.Tensor, threshold: float) -> torch.Tensor:
        """Exact neurons of each adaptive mask: the scores above the threshold, at least one."""
        return (s > threshold).sum(-1).clamp_min(1)

    # ----- what each kind declares -----------------------------------------------------------
    def mix_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on rows grouped by mask ``(G, n, in)`` -> ``(G, n, out)``."""
        raise NotImplementedError

    def flops_parts(self, rows: int, groups: int, k: float | None = None) -> dict[str, int]:
        """FLOPs of each step over ``rows`` rows in ``groups`` masks, ``k`` exact neurons per mask."""
        raise NotImplementedError

    def trainable_names(self, train: str) -> tuple[str, ...]:
        """Names of the parameters distillation trains (``train``: "gates" or "midl")."""
        raise NotImplementedError

    def mask_scores(self, groups: torch.Tensor) -> torch.Tensor:
        """Scores ``(G, width)`` of each mask group's neurons, higher = exact path."""
        raise NotImplementedError

    def calibrate_rows(self, groups: torch.Tensor, **kwargs: Any) -> Any:
        """Fit the light path and the gate in closed form on real input rows; returns a ``LayerCalibration``
        (``report=False``: its errors may be NaN, for callers such as the layer budget that do not read them)."""
        raise NotImplementedError

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """``W (out, in)`` as the layer computes with it: int8 weights (``weight_dtype.py``) widened
        and scaled per output."""
        scale = self._buffers.get("weight_scale")
        return self.weight if scale is None else self.weight.to(scale.dtype) * scale[:, None]

    def merge_and_unload(self) -> nn.Module:
        raise NotImplementedError

    # ----- what each kind may declare (defaults) ---------------------------------------------
    def configure(self, lp: Any) -> None:
        """Take a plan's settings beyond the constructor's (``LayerPlan``: what follows the layer in the
        model, adaptive masks); a kind with settings of its own extends this."""
        self.downstream = (lp.norm, lp.activation)
        self.adaptive = lp.adaptive

    def takes_output_weights(self, post: Any) -> bool:
        """True when ``calibrate_rows(weight=...)`` uses per-output weights (``sensitivity.py``) with
        ``post`` (the norm and activation after the layer) as given; ``calibrate`` measures them only then."""
        return False

    def quantize_int8_(self) -> bool:
        """Hold the weights in int8 (weight-only, ``weight_dtype.py``); False where the kind stays float."""
        return False


class LinearRows:
    """A Linear's (and HF ``Conv1D``'s) input as rows, features last: ``token`` gives a mask per row,
    ``sequence`` one per sample from the middle (sequence) axes together."""

    in_features: int
    out_features: int
    granularity: str
    transposed: bool

    @property
    def module_type(self) -> str:
        """The type of module this layer replaced, as the graph pass names it."""
        return "conv1d" if self.transposed else "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_features} input features, got {x.shape[-1]} (input shape {tuple(x.shape)})"
            )
        if self.exact:
            return self.dense_forward(x)
        return self.mix_rows(self.groups_of(x)).reshape(*x.shape[:-1], self.out_features)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original layer's output (every neuron exact)."""
        return F.linear(x, self.dense_weight(), self.bias)

    def groups_of(self, x: torch.Tensor) -> torch.Tensor:
        """Input rows grouped by mask (G, n, in): one group per token, or per sample for ``sequence``."""
        if self.granularity == "sequence" and x.dim() >= 3:
            return x.reshape(x.shape[0], -1, self.in_features)
        return x.reshape(-1, 1, self.in_features)

    def merge_and_unload(self) -> nn.Module:
        """The original dense module (``nn.Linear`` or HF ``Conv1D``) with the current ``W, b``, in
        the layer's dtype (an int8 layer's dequantised float32 weight; a kind that holds int8 weights
        gives back its own int8 module instead)."""
        if self.transposed:
            return new_conv1d(self.in_features, self.out_features, self.dense_weight().detach(),
                              None if self.bias is None else self.bias.detach())
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    @classmethod
    def from_linear(cls, linear: nn.Module, keep: float = 0.5, rank: int | None = None, granularity: str = "token"):
        """Build from an ``nn.Linear`` or an HF ``Conv1D`` (a Linear with its weight transposed); ``rank``
        defaults to the kind's ``default_rank``."""
        weight, bias, transposed = cls.dense_of(linear)
        out_f, in_f = weight.shape
        rank = cls.default_rank if rank is None else rank
        layer = cls(in_f, out_f, keep, check_rank(rank, in_f, out_f),
                    granularity, bias is not None, transposed, weight.device, weight.dtype)
        layer.init_from_dense(weight, bias)
        return layer

    @staticmethod
    def dense_of(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """``(W (out, in), b, transposed)`` of an ``nn.Linear`` or an HF ``Conv1D`` (a Linear stored transposed)."""
        transposed = is_conv1d(linear)
        return (linear.weight.T if transposed else linear.weight), linear.bias, transposed


class ConvRows:
    """A 1x1 conv's input as rows, one per pixel: ``pixel`` gives a mask per pixel, ``sample`` one per image."""

    in_features: int
    out_features: int
    granularity: str
    stride: tuple[int, int]
    padding: tuple[int, int]

    module_type = "conv2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects (B, {self.in_features}, H, W) input, got shape {tuple(x.shape)}")
        if self.exact:  # every neuron exact: the original conv, bit for bit
            return self.dense_forward(x)
        unbatched = x.dim() == 3
        x = x[None] if unbatched else x
        b, hh, ww = x.shape[0], *self.out_size(x)
        y = self.mix_rows(self.groups_of(x)).reshape(b, hh, ww, self.out_features).permute(0, 3, 1, 2)
        return y[0] if unbatched else y

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original 1x1 conv's output (every filter exact)."""
        return F.conv2d(x, self.dense_weight()[:, :, None, None], self.bias, self.stride, self.padding)

    def out_size(self, x: torch.Tensor) -> tuple[int, int]:
        (h, w), (sh, sw), (ph, pw) = x.shape[-2:], self.stride, self.padding
        return (h + 2 * ph - 1) // sh + 1, (w + 2 * pw - 1) // sw + 1

    def groups_of(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels as rows grouped by mask (G, n, in): one group per pixel, or per sample for ``sample``."""
        x = x[None] if x.dim() == 3 else x
        if self.padding != (0, 0):
            x = F.pad(x, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        rows = x.permute(0, 2, 3, 1)  # channels last: each pixel is a row
        if self.granularity == "sample":
            return rows.reshape(x.shape[0], -1, self.in_features)
        return rows.reshape(-1, 1, self.in_features)

    def merge_and_unload(self) -> nn.Module:
        """The original 1x1 ``nn.Conv2d`` with the current ``W, b`` (int8: dequantised, in float32)."""
        weight = self.dense_weight()
        dense = nn.Conv2d(self.in_features, self.out_features, 1, self.stride, self.padding,
                          bias=self.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight.reshape(self.out_features, self.in_features, 1, 1))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, keep: float = 0.5, rank: int | None = None, granularity: str = "pixel"):
        """Build from a 1x1 ``nn.Conv2d`` with groups 1 and zero padding mode; ``rank`` defaults to the
        kind's ``default_rank``."""
        cls.check_conv(conv)
        out_c, in_c = conv.out_channels, conv.in_channels
        rank = cls.default_rank if rank is None else rank
        layer = cls(in_c, out_c, keep, check_rank(rank, in_c, out_c), granularity, conv.bias is not None,
                    conv.stride, conv.padding, conv.weight.device, conv.weight.dtype)
        layer.init_from_dense(conv.weight.reshape(out_c, in_c), conv.bias)
        return layer

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stride={self.stride}, padding={self.padding}"

    @staticmethod
    def check_conv(conv: nn.Conv2d) -> None:
        if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"a sparse 1x1 conv needs a 1x1 conv with groups=1 and numeric zero padding, got kernel_size="
                f"{conv.kernel_size}, groups={conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )


def is_conv1d(module: nn.Module) -> bool:
    """True for a Hugging Face ``Conv1D`` (GPT-2's Linear, its weight stored ``(in, out)``): recognised by
    name, so that transformers need not be imported to ask."""
    return (type(module).__name__ == "Conv1D" and not isinstance(module, nn.Linear)
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def new_conv1d(in_features: int, out_features: int, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """An HF ``Conv1D`` with ``W (out, in)`` and ``b`` copied in (stored transposed, as it keeps them)."""
    from transformers.pytorch_utils import Conv1D  # only models that have Conv1D layers get here

    layer = Conv1D(out_features, in_features)
    layer.weight = nn.Parameter(weight.T.contiguous())
    layer.bias = nn.Parameter(bias.clone()) if bias is not None else None
    return layer.to(weight.device)


def weight_matrix(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W (out, in), b)`` of an ``nn.Linear``, an HF ``Conv1D`` (a Linear stored transposed) or a 1x1
    ``nn.Conv2d``: the one place that tells them apart."""
    if isinstance(module, nn.Conv2d):
        return module.weight.reshape(module.weight.shape[0], -1), module.bias
    weight, bias, _ = LinearRows.dense_of(module)
    return weight, bias


def sparse_layers(model: nn.Module) -> dict[str, SparseLayer]:
    """The sparse layers of a converted model by path (each shared layer once)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, SparseLayer)}


@contextlib.contextmanager
def dense(model: nn.Module) -> Iterator[nn.Module]:
    """Run every sparse layer as the original dense layer inside the block, like PEFT's
    ``disable_adapter()``: a converted model is its own teacher with no deep copy."""
    layers = [m for m in model.modules() if isinstance(m, SparseLayer)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.disabled = b
