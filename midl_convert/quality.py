"""How close the student is to the teacher: one output extraction, the distillation losses and the
held-out metrics, chosen by what the model outputs (logits, a sentence embedding, hidden states).
"""
from __future__ import annotations

import math

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch
from .running import run_model

TASK_OUTPUT = {"classifier": "logits", "causal-lm": "logits", "seq2seq": "logits", "embedding": "embedding", "base": "hidden"}


@torch.no_grad()
def output_of(model: nn.Module, batch: Batch) -> str:
    """What to compare when the task is not known: ``logits`` for a classifier-like output, else ``hidden``."""
    was = model.training
    model.eval()
    try:
        out = run_model(model, batch)
    finally:
        model.train(was)
    if getattr(out, "logits", None) is not None or (isinstance(out, torch.Tensor) and out.dim() == 2):
        return "logits"
    return "hidden"


def _mask(batch: Batch) -> torch.Tensor | None:
    return batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None


def model_output(model: nn.Module, batch: Batch, output: str) -> torch.Tensor:
    """The tensor compared between teacher and student: logits, a pooled normalised embedding, or hidden states."""
    out = run_model(model, batch)
    if isinstance(out, torch.Tensor):
        return out
    if output == "logits" and getattr(out, "logits", None) is not None:
        return out.logits
    hidden = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out[0]
    if output == "embedding":  # sentence-transformers mean pooling over real tokens, then L2 norm
        mask = _mask(batch)
        mask = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask.to(hidden.dtype)
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return F.normalize(pooled, dim=-1)
    return hidden


def positions(t: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Rows of (..., C) outputs that count: every sample, or every real token of a sequence."""
    mask = _mask(batch)
    if t.dim() == 3 and mask is not None and mask.shape == t.shape[:2]:
        return t[mask.bool()]
    return t.reshape(-1, t.shape[-1])


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, output: str, batch: Batch, temperature: float = 2.0) -> torch.Tensor:
    """KL with temperature on logits; 1 - cosine on embeddings and hidden states."""
    s, t = positions(student, batch), positions(teacher, batch)
    if output == "logits":
        log_p = F.log_softmax(t.float() / temperature, -1)
        log_q = F.log_softmax(s.float() / temperature, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2
    return (1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean()


ROWS_AT_ONCE = 1024  # output rows whose softmaxes are taken together: an LLM's row is its whole vocabulary


@torch.no_grad()
def compare(student: nn.Module, teacher: nn.Module, batches: Iterable[Batch], output: str, top: int = 10,
            next_token: bool = False) -> dict[str, float]:
    """Held-out agreement of student with teacher (and accuracy when labels exist). With
    ``next_token`` (a causal LM's logits), also each model's perplexity on the batches' own next
    tokens: the figure a decoder's user reads, where agreement with the teacher is only a proxy.

    Logits and hidden states are reduced batch by batch, ``ROWS_AT_ONCE`` rows at a time: holding every
    token's logits of 256 SmolLM2 samples (49152 each, teacher and student, then joined and soft-maxed)
    passed 12 GB of process memory (the whole conversion now peaks at 3.8 GB). Embeddings are kept whole: retrieval overlap compares each with all the others."""
    sums: dict[str, float] = {}
    emb_s, emb_t = [], []
    labelled = True
    for batch in batches:
        s, t = model_output(student, batch, output), model_output(teacher, batch, output)
        if output == "embedding":
            emb_s.append(s.float())
            emb_t.append(t.float())
            continue
        if next_token and output == "logits":
            for key, value in _next_token_sums(s, t, batch).items():
                sums[key] = sums.get(key, 0.0) + value
        s, t = positions(s, batch), positions(t, batch)
        labels = batch.labels if output == "logits" and batch.labels is not None and len(batch.labels) == len(s) else None
        labelled = labelled and labels is not None
        for lo in range(0, len(s), ROWS_AT_ONCE):
            rows = slice(lo, lo + ROWS_AT_ONCE)
            part = _logit_sums(s[rows].float(), t[rows].float(), None if labels is None else labels[rows]) \
                if output == "logits" else {"cosine": F.cosine_similarity(s[rows].float(), t[rows].float(), dim=-1).sum().item(),
                                          "samples": float(len(s[rows]))}
            for key, value in part.items():
                sums[key] = sums.get(key, 0.0) + value
    if output == "embedding":
        s, t = torch.cat(emb_s), torch.cat(emb_t)
        out = {"cosine": F.cosine_similarity(s, t, dim=-1).mean().item(), "samples": float(len(s))}
        if len(s) > top + 1:
            out[f"top{top}_overlap"] = retrieval_overlap(s, t, top)
        return out
    n = sums.get("samples", 0.0)
    mean = lambda key: sums[key] / n if n else float("nan")  # noqa: E731
    if output != "logits":
        return {"cosine": mean("cosine"), "samples": n}
    out = {"agreement": mean("agree"), "kl": mean("kl"), "samples": n, "sure_samples": sums.get("sure", 0.0),
           "agreement_sure": sums["agree_sure"] / sums["sure"] if sums.get("sure") else float("nan")}
    if labelled and n:
        out["accuracy"], out["teacher_accuracy"] = mean("correct"), mean("teacher_correct")
    if sums.get("next_tokens"):
        out["perplexity"] = math.exp(sums["nll"] / sums["next_tokens"])
        out["teacher_perplexity"] = math.exp(sums["teacher_nll"] / sums["next_tokens"])
        out["next_tokens"] = sums["next_tokens"]
    return out


def _next_token_sums(s: torch.Tensor, t: torch.Tensor, batch: Batch) -> dict[str, float]:
    """Summed next-token losses of student and teacher logits (B, L, V) on the batch's own
    ``input_ids``, over positions whose token and next token are both real; empty when the batch
    has no ids to predict."""
    ids = batch.inputs.get("input_ids") if isinstance(batch.inputs, dict) else None
    if ids is None or s.dim() != 3 or ids.shape != s.shape[:2] or ids.shape[1] < 2:
        return {}
    mask = _mask(batch)
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else (mask[:, 1:] * mask[:, :-1]).bool()
    target = ids[:, 1:][keep]
    sums = {"nll": 0.0, "teacher_nll": 0.0, "next_tokens": float(len(target))}
    for name, logits in (("nll", s), ("teacher_nll", t)):
        rows = logits[:, :-1][keep]
        for lo in range(0, len(rows), ROWS_AT_ONCE):  # a row is the whole vocabulary
            sums[name] += F.cross_entropy(rows[lo : lo + ROWS_AT_ONCE].float(), target[lo : lo + ROWS_AT_ONCE],
                                          reduction="sum").item()
    return sums


def _logit_sums(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    """Sums over rows of (R, classes) logits: agreement, KL(teacher || student), rows the teacher is sure of
    (p >= 0.5) and agreement on them, and correct answers when labelled."""
    agree = s.argmax(-1) == t.argmax(-1)
    log_t = t.log_softmax(-1)
    p_t = log_t.exp()
    sure = p_t.max(-1).values >= 0.5
    out = {"agree": agree.sum().item(), "kl": (p_t * (log_t - s.log_softmax(-1))).sum().item(), "samples": float(len(s)),
           "sure": sure.sum().item(), "agree_sure": (agree & sure).sum().item()}
    if labels is not None:
        out["correct"] = (s.argmax(-1) == labels).sum().item()
        out["teacher_correct"] = (t.argmax(-1) == labels).sum().item()
    return out


def retrieval_overlap(student: torch.Tensor, teacher: torch.Tensor, top: int = 10) -> float:
    """Mean share of each item's ``top`` nearest neighbours (cosine, itself excluded) that the student keeps."""
    def neighbours(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(top, dim=-1).indices

    ns, nt = neighbours(student), neighbours(teacher)
    hits = (ns[:, :, None] == nt[:, None, :]).any(-1).float().sum(-1)
    return (hits / top).mean().item()


def headline(metrics: dict[str, float]) -> tuple[str, float]:
    """The one figure to show first: agreement for logits, cosine otherwise."""
    key = "agreement" if "agreement" in metrics else "cosine"
    return key, metrics[key]
