"""Running a model on an input, and watching its layers while it runs: written once for FLOPs, quality,
calibration, latency and the layer budget."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn


def run_model(model: nn.Module, inputs: Any) -> Any:
    """``model`` on ``inputs``: a ``Batch`` (its ``inputs``), a dict of keyword inputs, a tuple or list of
    positional inputs, or one tensor."""
    inputs = getattr(inputs, "inputs", inputs)  # a Batch carries its inputs; tensors and dicts have no such field
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _pre_hook(before: Callable[[str, nn.Module, torch.Tensor], Any], path: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple) -> None:  # returns None: a pre-hook's value would replace the inputs
        before(path, module, args[0] if args else None)
    return hook


@contextlib.contextmanager
def watching(modules: Mapping[str, nn.Module], before: Callable[[str, nn.Module, torch.Tensor], Any] | None = None,
             after: Callable[[str, nn.Module, torch.Tensor, Any], Any] | None = None) -> Iterator[None]:
    """Inside the block, call ``before(path, module, x)`` ahead of each module's forward and
    ``after(path, module, x, y)`` behind it (``x`` its first positional input, None when it has none;
    ``y`` its output, which a value ``after`` returns replaces, as torch's hooks do); the hooks are removed on leaving, errors included."""
    handles = []
    try:
        for path, module in modules.items():
            if before is not None:
                handles.append(module.register_forward_pre_hook(_pre_hook(before, path)))
            if after is not None:
                handles.append(module.register_forward_hook(lambda m, a, y, p=path: after(p, m, a[0] if a else None, y)))
        yield
    finally:
        for h in handles:
            h.remove()
