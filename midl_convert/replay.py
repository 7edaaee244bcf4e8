"""Replay the blocks before a layer instead of running them again.

The layer budget judges each option of each layer by the model's output on a few batches, with
that layer alone converted. Everything before the layer's block computes exactly what the dense
model computed, so those blocks' outputs are recorded once per batch (on the dense run that gives
the targets) and played back while the options of later layers are judged. A layer in block ``i``
of ``n`` then costs the rest of the model plus ``n - i`` blocks: about half the forward on
average for a decoder or an encoder.

Any stack whose blocks run once each, in index order, qualifies: HF decoder and encoder layers, timm
stages. Recording checks that order, and ``BlockReplay.check`` proves replay on the data: the
dense model with its first half replayed must give the recorded output, or replay is switched off.
Played-back tensors are copies, so a block that writes its input in place cannot spoil the record.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .log import logger


def block_stack(model: nn.Module, paths: Sequence[str]) -> tuple[str, list[nn.Module]] | None:
    """The ``nn.ModuleList`` or ``nn.Sequential`` of at least two blocks that holds the most of
    ``paths`` (the deeper one on a tie), as (its path, its blocks); None when no stack holds two."""
    best: tuple[int, int, str, list[nn.Module]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        prefix = f"{name}." if name else ""
        held = sum(1 for p in paths if p.startswith(prefix))
        if held < 2:
            continue
        rank = (held, name.count(".") + bool(name))
        if best is None or rank > best[:2]:
            best = (*rank, name, list(module))
    return None if best is None else (best[2], best[3])


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple takes its fields as arguments
        return type(value)(*(_copy(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v) for v in value)
    return value


class BlockReplay:
    """Records each block's output per batch, then plays the first blocks back (``skipping``)."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        found = block_stack(model, paths)
        self.name, self.blocks = found if found is not None else ("", [])
        self.outputs: list[list[Any]] = []  # [batch][block]
        self.batch = 0  # which batch the next forward is
        self.enabled = bool(self.blocks)

    def block_of(self, path: str) -> int:
        """The index of the block holding ``path``; 0 (nothing to replay) outside the stack."""
        prefix = f"{self.name}." if self.name else ""
        if not self.enabled or not path.startswith(prefix):
            return 0
        head = path[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < len(self.blocks) else 0

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Keep every block's output of each forward run inside, one list per forward (batch)."""
        if not self.enabled:
            yield
            return
        calls: list[tuple[int, Any]] = []

        def keep(i: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                calls.append((i, _copy(out)))  # a copy: a later in-place write cannot change the record
            return hook

        handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        n = len(self.blocks)
        if [i for i, _ in calls] != list(range(n)) * (len(calls) // n) or not calls:
            self.enabled = False  # not one pass through the blocks in order per forward: nothing to replay
            self.outputs = []
            return
        self.outputs = [[out for _, out in calls[j : j + n]] for j in range(0, len(calls), n)]

    @contextmanager
    def skipping(self, upto: int) -> Iterator[None]:
        """Blocks ``0 .. upto - 1`` return what they returned for batch ``self.batch`` without running."""
        upto = upto if self.enabled else 0
        for i in range(upto):
            self.blocks[i].forward = self._played(i)  # an instance attribute: nn.Module.__call__ calls it
        try:
            yield
        finally:
            for i in range(upto):
                del self.blocks[i].forward

    def _played(self, i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return _copy(self.outputs[self.batch][i])
        return forward

    def check(self, run: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor]) -> bool:
        """Switch replay off unless ``run(batch)`` with the first half of the blocks played back gives
        ``targets[batch]`` for the first batch; returns whether replay stays on."""
        if not self.enabled or not targets:
            return False
        self.batch = 0
        with self.skipping(len(self.blocks) // 2):
            out = run(0)
        ok = out.shape == targets[0].shape and torch.allclose(out, targets[0], rtol=1e-4, atol=1e-5)
        if not ok:
            logger.debug("block replay off: replaying %s changed the dense model's output", self.name)
            self.enabled, self.outputs = False, []
        return ok


__all__ = ["BlockReplay", "block_stack"]
