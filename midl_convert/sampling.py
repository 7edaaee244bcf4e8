"""Text sampled from the teacher itself: calibration and distillation data for a causal LM without a corpus.

A decoder's own samples cover what it writes about, in its own distribution (LLM-QAT's data-free distillation).
Measured on SmolLM2, input side, keep 0.6, rank 0, 60 distillation steps, King James perplexity (dense 33.18):
42.54 on its own samples against 42.00 on Python's help topics (`python benchmarks/generate.py --select input
--keep 0.6 --rank 0 --steps 60 --repeats 1 --data builtin:teacher`, and the same with builtin:text): no gain here.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import MIDLError

SAMPLES = 256  # texts; at 64 tokens, about 76 s for SmolLM2-135M on 2 cores
SAMPLE_TOKENS = 64
SAMPLE_BATCH = 32


@torch.no_grad()
def sample_texts(model: nn.Module, tokenizer, count: int = SAMPLES, tokens: int = SAMPLE_TOKENS, seed: int = 0,
                 batch: int = SAMPLE_BATCH) -> list[str]:
    """``count`` texts of ``tokens`` new tokens each, sampled (temperature 1, top-p 0.95, the model's top-k) from a start
    token alone; the same texts for the same model and seed."""
    if not hasattr(model, "generate") or tokenizer is None:
        raise MIDLError("builtin:teacher samples text from a causal language model with a tokenizer; "
                        "use builtin:text or your own text file for other models")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise MIDLError("builtin:teacher needs a tokenizer with a start (bos) or end (eos) token; pass your own text file")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for first in range(0, count, batch):
                ids = torch.full((min(batch, count - first), 1), start, device=device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95, temperature=1.0,
                                     max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=pad)
                texts += tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    texts = [t.strip() for t in texts]
    return [t for t in texts if t]
