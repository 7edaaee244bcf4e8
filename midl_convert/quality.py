"""How close the student is to the teacher: one output extraction, the distillation losses and the
held-out metrics, chosen by what the model outputs (logits, a sentence embedding, hidden states).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch

OUTPUT_KIND = {"classifier": "logits", "causal-lm": "logits", "seq2seq": "logits", "embedding": "embedding", "base": "hidden"}


def run(model: nn.Module, batch: Batch) -> object:
    return model(**batch.inputs) if isinstance(batch.inputs, dict) else model(*batch.inputs)


@torch.no_grad()
def output_kind(model: nn.Module, batch: Batch) -> str:
    """What to compare when the task is not known: ``logits`` for a classifier-like output, else ``hidden``."""
    was = model.training
    model.eval()
    try:
        out = run(model, batch)
    finally:
        model.train(was)
    if getattr(out, "logits", None) is not None or (isinstance(out, torch.Tensor) and out.dim() == 2):
        return "logits"
    return "hidden"


def _mask(batch: Batch) -> torch.Tensor | None:
    return batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None


def model_output(model: nn.Module, batch: Batch, kind: str) -> torch.Tensor:
    """The tensor compared between teacher and student: logits, a pooled normalised embedding, or hidden states."""
    out = run(model, batch)
    if isinstance(out, torch.Tensor):
        return out
    if kind == "logits" and getattr(out, "logits", None) is not None:
        return out.logits
    hidden = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out[0]
    if kind == "embedding":  # sentence-transformers mean pooling over real tokens, then L2 norm
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


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, batch: Batch, temperature: float = 2.0) -> torch.Tensor:
    """KL with temperature on logits; 1 - cosine on embeddings and hidden states."""
    s, t = positions(student, batch), positions(teacher, batch)
    if kind == "logits":
        log_p = F.log_softmax(t.float() / temperature, -1)
        log_q = F.log_softmax(s.float() / temperature, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2
    return (1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean()


@torch.no_grad()
def compare(student: nn.Module, teacher: nn.Module, batches: Iterable[Batch], kind: str, top: int = 10) -> dict[str, float]:
    """Held-out agreement of student with teacher (and accuracy when labels exist)."""
    s_all, t_all, labels, sure = [], [], [], []
    for batch in batches:
        s, t = model_output(student, batch, kind), model_output(teacher, batch, kind)
        s_all.append(positions(s, batch) if kind != "embedding" else s)
        t_all.append(positions(t, batch) if kind != "embedding" else t)
        if batch.labels is not None and kind == "logits":
            labels.append(batch.labels)
    s, t = torch.cat(s_all).float(), torch.cat(t_all).float()
    if kind == "logits":
        agree = (s.argmax(-1) == t.argmax(-1)).float()
        p_t = t.softmax(-1)
        sure = p_t.max(-1).values >= 0.5
        kl = (p_t * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
        out = {"agreement": agree.mean().item(), "kl": kl.mean().item(), "samples": float(len(agree)),
               "sure_samples": float(sure.sum()), "agreement_sure": agree[sure].mean().item() if sure.any() else float("nan")}
        if labels and sum(len(x) for x in labels) == len(agree):
            y = torch.cat(labels)
            out["accuracy"] = (s.argmax(-1) == y).float().mean().item()
            out["teacher_accuracy"] = (t.argmax(-1) == y).float().mean().item()
        return out
    cos = F.cosine_similarity(s, t, dim=-1)
    out = {"cosine": cos.mean().item(), "samples": float(len(cos))}
    if kind == "embedding" and len(s) > top + 1:
        out[f"top{top}_overlap"] = retrieval_overlap(s, t, top)
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
