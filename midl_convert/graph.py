"""The graph pass: find every Linear, HF Conv1D and 1x1 Conv2d a model actually runs, with the
input shape each one sees and its dense FLOPs.

Tracing order: ``torch.export`` (non-strict), then ``torch.fx.symbolic_trace``, then a plain
module walk with forward hooks; the tracer used and why the others failed are recorded, never
hidden.
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .downstream import follow
from .flops import dense_flops
from .running import watching
from .sparse import is_conv1d

# Ordered (regex on the module path, role); first match wins. Data, not branches.
ROLE_RULES: list[tuple[str, str]] = [
    (r"(^|\.)(qkv|c_attn|in_proj|query_key_value|qkv_proj|Wqkv)$", "attention.qkv"),
    (r"(^|\.)(q|query|q_proj|q_lin)$", "attention.q"),
    (r"(^|\.)(k|key|k_proj|k_lin)$", "attention.k"),
    (r"(^|\.)(v|value|v_proj|v_lin)$", "attention.v"),
    (r"(attn|attention|self_attn|SelfAttention|EncDecAttention)[^.]*\.(proj|o|o_proj|out_proj|out_lin|c_proj|output\.dense|dense)$", "attention.out"),
    (r"(^|\.)(o_proj|out_proj)$", "attention.out"),
    (r"(^|\.)(fc1|c_fc|up_proj|gate_proj|wi|wi_0|wi_1|lin1|w1|w3|intermediate\.dense|fc_in|dense_h_to_4h)$", "mlp.fc1"),
    (r"(^|\.)(fc2|down_proj|wo|lin2|w2|fc_out|dense_4h_to_h)$", "mlp.fc2"),
    (r"(mlp|ffn|feed_forward)[^.]*\.c_proj$", "mlp.fc2"),
    (r"(^|\.)layer\.\d+\.output\.dense$", "mlp.fc2"),
    (r"(^|\.)(downsample|shortcut|skip)(\.\d+|\.conv)?$", "conv.downsample"),
    (r"(^|\.)(conv_pw|conv_pwl|conv_dw_pw)$", "conv.pointwise"),
    (r"(^|\.)(se|attn|gate)\.(conv_reduce|conv_expand|fc1|fc2)$", "conv.squeeze_excite"),
]
HEAD_PATHS = re.compile(r"^(fc|head|classifier|score|lm_head|proj_out|last_linear|head\.fc|classifier\.fc|head\.l)$")


@dataclass
class Target:
    """One convertible layer as the model runs it."""

    path: str
    module_type: str  # "linear" | "conv1d" (HF Conv1D) | "conv2d" (1x1)
    in_features: int
    out_features: int
    input_shape: tuple[int, ...] | None  # as seen on the example input (first call)
    rows: int  # tokens or output pixels per forward, summed over calls
    flops: int  # dense FLOPs per forward on the example input
    calls: int = 1
    role: str | None = None
    is_head: bool = False
    aliases: list[str] = field(default_factory=list)  # other paths of the same shared module
    norm: str | None = None  # eval BatchNorm applied right after (export graph only; downstream.py)
    activation: str | None = None  # elementwise activation applied right after, e.g. "gelu"

    @property
    def weights(self) -> int:
        return self.in_features * self.out_features

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape) if self.input_shape is not None else None
        return d


@dataclass
class TargetTable:
    """All targets of a model, and how they were found."""

    targets: list[Target]
    trace: str  # "export" | "fx" | "walk"
    notes: list[str] = field(default_factory=list)  # why earlier tracers were not used

    @property
    def total_flops(self) -> int:
        return sum(t.flops for t in self.targets)

    def __getitem__(self, path: str) -> Target:
        for t in self.targets:
            if t.path == path or path in t.aliases:
                return t
        raise KeyError(path)

    def to_dict(self) -> dict[str, Any]:
        return {"trace": self.trace, "notes": self.notes, "targets": [t.to_dict() for t in self.targets]}


# Subclasses that override forward but still compute exactly F.linear / F.conv2d with their weight.
SAME_FORWARD = {"timm.layers.linear.Linear", "midl_convert.weight_dtype.Bf16Linear"}  # their weight is used as stored


def _plain_forward(module: nn.Module, base: type) -> bool:
    """False for subclasses whose forward transforms the weight first (timm's StdConv2d and
    ScaledStdConv2d standardise it; quantised or LoRA-wrapped layers add to it): replacing those by a
    plain MID-L layer would change the model."""
    cls = type(module)
    return cls.forward is base.forward or f"{cls.__module__}.{cls.__qualname__}" in SAME_FORWARD


def module_type_of(module: nn.Module) -> str | None:
    """The module type of a target ("linear", "conv1d", "conv2d"), or None if MID-L does not apply to it."""
    if isinstance(module, nn.Linear) and _plain_forward(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    if (
        isinstance(module, nn.Conv2d)
        and _plain_forward(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.dilation == (1, 1)
    ):
        return "conv2d"
    return None


def in_out(module: nn.Module, module_type: str) -> tuple[int, int]:
    if module_type == "linear":
        return module.in_features, module.out_features
    if module_type == "conv1d":
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_channels, module.out_channels


def role_of(path: str, is_head: bool) -> str | None:
    if is_head:
        return "head"
    for pattern, role in ROLE_RULES:
        if re.search(pattern, path):
            return role
    return None


def head_modules(model: nn.Module) -> set[int]:
    """ids of the modules that produce the model's output classes or tokens."""
    heads: set[int] = set()
    for getter in ("get_classifier", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                mod = fn()
            except Exception:  # noqa: BLE001 - optional API, absent or not applicable
                mod = None
            if isinstance(mod, nn.Module):
                heads.add(id(mod))
    return heads


def _rows(module_type: str, shape: tuple[int, ...], module: nn.Module) -> int:
    """Positions a layer computes for an input of ``shape`` (tokens, or output pixels)."""
    if module_type == "conv2d":
        b = shape[0] if len(shape) == 4 else 1
        h, w = shape[-2:]
        (sh, sw), (ph, pw) = module.stride, module.padding
        return b * ((h + 2 * ph - 1) // sh + 1) * ((w + 2 * pw - 1) // sw + 1)
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows


def _call_path(node: torch.fx.Node) -> tuple[str, str] | None:
    """(module path, call key) of the innermost module a graph node runs in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (path, _) = list(stack.items())[-1]
    return path.removeprefix("L['self']."), key


def _shapes_by_export(model: nn.Module, args: tuple, kwargs: dict, paths: set[str],
                      downstream: dict[str, tuple[str | None, str | None]] | None = None) -> dict[str, list[tuple]]:
    """Input shape of every call of each candidate path, read off a non-strict ``torch.export`` graph;
    ``downstream`` is filled with what each path's first call output goes through next."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, args, kwargs, strict=False)
    seen: dict[str, dict[str, tuple]] = {}
    last: dict[str, dict[str, torch.fx.Node]] = {}
    for node in ep.graph.nodes:
        where = _call_path(node) if node.op == "call_function" else None
        if where is None or where[0] not in paths:
            continue
        path, key = where
        last.setdefault(path, {})[key] = node
        if key in seen.get(path, {}):
            continue
        arg = node.args[0] if node.args else None
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        if isinstance(val, torch.Tensor):  # first op of this call: its input is the layer's input
            seen.setdefault(path, {})[key] = tuple(int(d) for d in val.shape)
    if downstream is not None:
        for path, calls in last.items():
            downstream[path] = follow(next(iter(calls.values())), lambda n: (_call_path(n) or (None,))[0])
    return {p: list(calls.values()) for p, calls in seen.items()}


def _shapes_by_fx(model: nn.Module, args: tuple, kwargs: dict, paths: set[str]) -> dict[str, list[tuple]]:
    from torch.fx.passes.shape_prop import ShapeProp

    if kwargs:
        raise TypeError("torch.fx.symbolic_trace takes positional inputs only")
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(*args)
    out: dict[str, list[tuple]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in paths:
            meta = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], torch.fx.Node) else None
            if meta is not None:
                out.setdefault(node.target, []).append(tuple(int(d) for d in meta.shape))
    return out


def _shapes_by_hooks(model: nn.Module, args: tuple, kwargs: dict, paths: set[str]) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}

    def shape(path: str, _m: nn.Module, x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out.setdefault(path, []).append(tuple(x.shape))

    with watching({p: m for p, m in model.named_modules() if p in paths}, shape), torch.no_grad():
        model(*args, **kwargs)
    return out


def find_targets(
    model: nn.Module,
    example_inputs: tuple | dict | torch.Tensor | None = None,
    trace: str = "auto",
) -> TargetTable:
    """Every convertible layer of ``model`` with the shape it sees on ``example_inputs``.

    ``trace``: "auto" (export, then fx, then hooks), or one of "export", "fx", "walk".
    Without example inputs only the module walk is possible and shapes are unknown.
    """
    by_path: dict[str, nn.Module] = {}
    aliases: dict[int, list[str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        if path and module_type_of(mod) is not None:
            aliases.setdefault(id(mod), []).append(path)
            by_path.setdefault(path, mod)
    primary = {paths[0] for paths in aliases.values()}
    args, kwargs = _split_inputs(example_inputs)
    notes: list[str] = []
    shapes: dict[str, list[tuple]] = {}
    downstream: dict[str, tuple[str | None, str | None]] = {}
    used = "walk"
    if example_inputs is not None:
        tracers = {"export": functools.partial(_shapes_by_export, downstream=downstream), "fx": _shapes_by_fx,
                   "walk": _shapes_by_hooks}
        order = list(tracers) if trace == "auto" else [trace]
        was_training = model.training
        model.eval()
        try:
            for name in order:
                try:
                    shapes = tracers[name](model, args, kwargs, set(by_path))
                    used = name
                    break
                except Exception as exc:  # noqa: BLE001 - a tracer's failure is recorded, then the next one runs
                    notes.append(f"{name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            else:
                used = "walk"
        finally:
            model.train(was_training)
    else:
        notes.append("no example inputs: shapes and FLOPs unknown")
    heads = head_modules(model)
    targets = []
    for path in sorted(primary, key=list(by_path).index):
        mod = by_path[path]
        module_type = module_type_of(mod)
        fin, fout = in_out(mod, module_type)
        all_paths = aliases[id(mod)]
        calls = [s for p in all_paths for s in shapes.get(p, [])]
        if shapes and not calls:
            continue  # never runs on this input (e.g. an unused branch): nothing to convert
        rows = sum(_rows(module_type, s, mod) for s in calls)
        is_head = id(mod) in heads or any(HEAD_PATHS.match(p) for p in all_paths)
        targets.append(Target(
            path=path, module_type=module_type, in_features=fin, out_features=fout,
            input_shape=calls[0] if calls else None, rows=rows, flops=dense_flops(fin, fout, rows),
            calls=max(1, len(calls)), role=role_of(path, is_head), is_head=is_head, aliases=all_paths[1:],
            norm=downstream.get(path, (None, None))[0], activation=downstream.get(path, (None, None))[1],
        ))
    return TargetTable(targets=targets, trace=used, notes=notes)


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}
