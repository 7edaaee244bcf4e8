"""A lean batch-1 greedy decode loop: a static KV cache and one compiled decode step.

Why: at one row per Linear, Hugging Face ``generate`` spends about a third of a SmolLM2-135M step
outside the Linears (Python, the growing cache, logits processors, dispatch), and no sparsity
touches that third. A static cache gives every step the same shapes, so ``torch.compile`` can trace
the step once; inductor's ``freezing`` folds what depends only on weights (for the input kind the
centred bias ``W mu + b`` and the column scale ``g c``) into constants, and the sparse layers stay
graph nodes (``torch.ops.midl.*``). The dense and the converted model both go through it, so a
ratio compares like with like. The prompt runs uncompiled (its length varies); compiling is paid
on the first decode step and reported apart (``compile_seconds``).

Freezing bakes the weights in: build the decoder after the model is final (converted, calibrated,
distilled, cast), and a new one if the weights change.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import time

import torch
from torch import nn

logger = logging.getLogger(__name__)


def supports_static_cache(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal LM whose cache can be static (shapes fixed per step)."""
    return hasattr(model, "generate") and getattr(model, "config", None) is not None and \
        bool(getattr(model, "_can_compile_fullgraph", False) or getattr(model, "_supports_static_cache", False))


class LeanDecoder:
    """Greedy batch-1 decoding of ``model`` through a static cache of ``max_tokens`` positions and,
    with ``compile``, a compiled (frozen) decode step. ``generate`` gives the same tokens as
    ``model.generate(do_sample=False)``."""

    def __init__(self, model: nn.Module, max_tokens: int = 256, compile: bool = True) -> None:
        from transformers import StaticCache  # the Hugging Face stack is optional for the package

        if not supports_static_cache(model):
            raise ValueError(f"{type(model).__name__} does not support a static KV cache; decode it with generate()")
        self.model, self.max_tokens, self.compiled = model, max_tokens, compile
        self.cache = StaticCache(config=model.config, max_cache_len=max_tokens)
        # transformers 5 names the cache argument ``cache`` (``past_key_values`` before, deprecated since)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._step = torch.compile(self._forward, dynamic=False) if compile else self._forward
        self.compile_seconds: float | None = None  # the first compiled step's time: the compile itself
        self.compile_error: str | None = None  # why compiling failed, when it did (then decoding runs uncompiled)

    def _forward(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, cache_position=position, use_cache=True, logits_to_keep=1,
                         **{self._cache_arg: self.cache})
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The prompt ``ids`` (1, n) followed by ``new_tokens`` greedy tokens, shape (1, n + new_tokens)."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"the lean decoder runs batch 1: ids must be (1, n), got {tuple(ids.shape)}")
        n = ids.shape[1]
        if n + new_tokens > self.max_tokens:
            raise ValueError(f"{n} prompt + {new_tokens} new tokens exceed the cache's {self.max_tokens}; "
                             f"build LeanDecoder(max_tokens={n + new_tokens})")
        was_training = self.model.training
        self.model.eval()
        try:
            self.cache.reset()
            tokens = [ids]
            if new_tokens:
                nxt = self._forward(ids, torch.arange(n, device=ids.device)).argmax(-1, keepdim=True)
                tokens.append(nxt)
            for i in range(1, new_tokens):
                position = torch.tensor([n + i - 1], device=ids.device)
                if self.compile_seconds is None and self.compiled:
                    logits = self._compile(nxt, position)
                else:
                    with self._trusted():
                        logits = self._step(nxt, position)
                nxt = logits.argmax(-1, keepdim=True)
                tokens.append(nxt)
            return torch.cat(tokens, 1)
        finally:
            self.model.train(was_training)

    def _trusted(self) -> contextlib.AbstractContextManager:
        """Once compiled, the step runs without re-checking dynamo's guards: its one graph has static
        shapes and this decoder owns its cache, so nothing they check can change between steps
        (SmolLM2: the checks took 1.4 of a 16 ms int8 step, as much as all its attention). A model
        changed in place after compiling needs a new decoder."""
        if not self.compiled or not hasattr(torch.compiler, "set_stance"):
            return contextlib.nullcontext()
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)

    def _compile(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The first compiled step: compiles, timed. Where compiling fails (no C++ compiler, an op
        inductor cannot take) the decoder says why in one line and runs the step uncompiled."""
        import torch._inductor.config as inductor  # imported when compiling, not with the package

        start = time.perf_counter()
        try:
            # freezing is read while compiling: set here (an ``options`` dict measured no fold)
            with inductor.patch(freezing=True):
                logits = self._step(ids, position)
        except Exception as err:  # noqa: BLE001 - any compiler failure leaves a working, slower decoder
            self.compiled, self._step = False, self._forward
            self.compile_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
            logger.warning("torch.compile of the decode step failed (%s); decoding uncompiled", self.compile_error)
            return self._forward(ids, position)
        self.compile_seconds = time.perf_counter() - start
        logger.info("compiled %s's decode step in %.1fs", type(self.model).__name__, self.compile_seconds)
        return logits

    def warm_up(self, ids: torch.Tensor) -> float:
        """Compile (when compiling) on a 2-token decode of ``ids``; returns the seconds it took."""
        start = time.perf_counter()
        self.generate(ids, 2)
        return time.perf_counter() - start


__all__ = ["LeanDecoder", "supports_static_cache"]
