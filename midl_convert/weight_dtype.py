"""Weights in the dtype the user runs: float32, bfloat16 end to end, or int8 weight-only.

``set_weight_dtype(model, "bfloat16")`` casts the whole model (activations follow); the input-side
kernel reads bfloat16 columns and sums in float32, and every dense ``nn.Linear`` left (but one
tied to an embedding) becomes a ``Bf16Linear``: the same kernel with every input picked, faster at
batch 1 than torch's own bfloat16 Linear. ``"int8"`` quantises, per output channel (symmetric, scale = max |W_row| / 127), the weights that a batch-1 decode step reads: each
input-side MID-L layer (its kernel widens the int8 columns in registers and applies the scales
after the sum) and every dense ``nn.Linear`` left (``lm_head``, layers the plan leaves dense), which
become ``Int8Linear`` (the same kernel with every input picked). Activations, embeddings, norms,
light paths and output-side MID-L layers stay float32 under int8.

It is the last step of a conversion: calibration and distillation train in float32 first.
"""
from __future__ import annotations

from typing import Callable, Literal, get_args

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from .kernels import KERNEL_MAX_ROWS, NO_BIAS  # importing kernels registers the midl ops
from .sparse import SparseLayer

WeightDtype = Literal["float32", "bfloat16", "int8"]
WEIGHT_DTYPES: tuple[str, ...] = get_args(WeightDtype)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of each row of ``weight (out, in)``: ``(q (out, in) int8, scale (out,) float32)``,
    ``weight ~ q * scale[:, None]``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A Linear with int8 weights and a float32 scale per output (weight-only: activations stay
    float). It runs as ``midl::input_rows`` with every input picked: for a few float32 rows the
    input-side kernel widens the int8 weights in registers, otherwise one GEMM on the widened
    weights. ``torch._weight_int8pack_mm`` measured 35x slower than a float32 Linear at one row on
    this AVX2 CPU (576x1536), and 6x with bfloat16 rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = torch.zeros(in_features, out_features, dtype=torch.int8, device=device).T  # (out, in), columns contiguous
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.register_buffer("_ones", torch.ones(in_features, device=device), persistent=False)  # every input's score
        self.register_buffer("_none", torch.zeros(0, in_features, device=device), persistent=False)  # no light path

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        """Quantise a float ``W (out, in)`` and take ``b`` as float32."""
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, weight.device)
        layer.set_int8(*quantize_rows(weight), bias)
        return layer

    @torch.no_grad()
    def set_int8(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Take ``q (out, in)`` int8, its ``scale (out,)`` and ``bias``, stored as the kernel reads them."""
        self.weight = q.T.contiguous().T
        self.weight_scale = scale.float().clone()
        if bias is not None:
            self.bias.data = bias.detach().float().clone()

    def dequantized(self) -> torch.Tensor:
        """``W (out, in)`` in float32."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return every_input(self, x, self.weight.T, self.weight_scale.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 weight-only"


def every_input(layer: nn.Module, x: torch.Tensor, wt: torch.Tensor, wt_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A dense layer (``Int8Linear``, ``Bf16Linear``) as ``midl::input_rows`` with every input picked:
    ``wt (in, out)``, no light path; the layer holds ``in_features``, ``out_features``, ``bias`` and
    the ``_ones`` (scores) and ``_none`` (empty light path) buffers."""
    bias = NO_BIAS if layer.bias is None else layer.bias
    none = layer._none.to(x.dtype)
    y = torch.ops.midl.input_rows.default(x.reshape(-1, layer.in_features), wt, bias.to(x.dtype), none, none.T,
                                          layer._ones, layer.in_features, math.nan, wt_scale)
    return y.reshape(*x.shape[:-1], layer.out_features)


class Bf16Linear(nn.Linear):
    """A bfloat16 ``nn.Linear`` whose weight is stored column-major (``(in, out)`` contiguous, seen as
    the usual ``(out, in)``), so that up to ``KERNEL_MAX_ROWS`` rows run ``midl::input_rows`` with
    every input picked: dense bfloat16 SmolLM2 decoded 1.33x as fast with them as with torch's
    Linear on this Xeon (README, ``generate.py --torch-linear``). More rows, a graph that needs
    gradients, another dtype or a weight tied back to row-major storage run ``F.linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        nn.Module.__init__(self)  # no nn.Linear init: the weights are taken over or loaded
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype).T)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("_ones", torch.ones(in_features, device=device), persistent=False)  # every input's score
        self.register_buffer("_none", torch.zeros(0, in_features, device=device, dtype=dtype), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Bf16Linear":
        """Take over ``linear``'s parameters, the weight stored column-major in place (``set_weight_dtype``
        leaves a weight tied to another module, an embedding, as it is)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                    linear.weight.dtype)
        weight = linear.weight
        with torch.no_grad():
            weight.data = weight.data.T.contiguous().T
        layer.weight, layer.bias = weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wt = self.weight.T
        rows = x.numel() // self.in_features
        if (not 0 < rows <= KERNEL_MAX_ROWS or x.dtype != wt.dtype or x.device.type != "cpu" or not wt.is_contiguous()
                or (torch.is_grad_enabled() and self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        return every_input(self, x, wt)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weight stored (in, out) for the input-side kernel"


def set_weight_dtype(model: nn.Module, name: str) -> nn.Module:
    """Put ``model``'s weights in ``name`` (``WEIGHT_DTYPES``), in place; returns the model."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {name!r}")
    if name == "float32":
        return model.to(torch.float32)
    if name == "bfloat16":
        model.to(torch.bfloat16)
        return _swap_linears(model, Bf16Linear.from_linear, skip=_tied_elsewhere(model))
    for mod in model.modules():  # each shared module once
        if isinstance(mod, SparseLayer):
            mod.quantize_int8_()  # a kind that stays float says so (False)
    return _swap_linears(model, lambda linear: Int8Linear.from_float(linear.weight, linear.bias))


def _tied_elsewhere(model: nn.Module) -> set[int]:
    """ids of the Linears whose weight another module also holds (``lm_head`` tied to the embedding).
    They stay torch Linears in bfloat16: one tensor cannot be stored both row-major for the lookup and
    column-major for the kernel, and HF's ``save_pretrained`` refuses a tied tensor that is not
    contiguous (a copy would cost SmolLM2 a fifth more memory for 2% of a decode step)."""
    holders: dict[int, set[int]] = {}
    for mod in model.modules():
        for param in mod.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(id(mod))
    return {id(m) for m in model.modules() if type(m) is nn.Linear and len(holders.get(id(m.weight), ())) > 1}


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module], skip: set[int] = frozenset()) -> nn.Module:
    """Each plain ``nn.Linear`` below the root, but those in ``skip`` (ids), replaced by ``make(linear)``
    (one new module per shared one); subclasses (e.g. ``NonDynamicallyQuantizableLinear`` in attention) stay."""
    done: dict[int, nn.Module] = {}
    for path, mod in list(model.named_modules(remove_duplicate=False)):
        if type(mod) is nn.Linear and path and id(mod) not in skip:
            if id(mod) not in done:
                done[id(mod)] = make(mod)
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, done[id(mod)])
    return model


def weight_dtype_of(model: nn.Module) -> str:
    """The ``WEIGHT_DTYPES`` entry a model's weights are in: int8 when any layer holds int8
    weights, else the dtype of its first floating parameter."""
    if any(isinstance(w := getattr(m, "weight", None), torch.Tensor) and w.dtype == torch.int8 for m in model.modules()):
        return "int8"
    first = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return "bfloat16" if first == torch.bfloat16 else "float32"
