"""Held-out comparison: the same numbers as the whole-set formulas, with one batch's outputs in memory at a time."""
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from midl_convert import quality
from midl_convert.data import Batch


class Logits(nn.Module):
    """A tiny LM head over token ids that remembers which of its outputs are still alive."""

    def __init__(self, seed: int, vocab: int = 50):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)
        self.outputs: list[weakref.ref] = []
        self.alive_at_call: list[int] = []

    def forward(self, input_ids, attention_mask=None):
        self.alive_at_call.append(sum(r() is not None for r in self.outputs))
        y = self.head(self.embed(input_ids))
        self.outputs.append(weakref.ref(y))
        return y


def _batches(labelled: bool = False) -> list[Batch]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[0, 5:] = 0
        out.append(Batch({"input_ids": torch.randint(0, 50, (3, 7), generator=gen), "attention_mask": mask}))
    return out


def test_logits_are_reduced_batch_by_batch_with_the_whole_set_numbers(monkeypatch):
    """SmolLM2's report once held every held-out token's logits of both models, joined and soft-maxed
    (past 12 GB): each batch's outputs are now let go before the next batch runs."""
    student, teacher, batches = Logits(0), Logits(1), _batches()
    monkeypatch.setattr(quality, "ROWS_AT_ONCE", 4)  # rows in chunks too
    got = quality.compare(student, teacher, batches, "logits")
    assert max(student.alive_at_call) == 0 and max(teacher.alive_at_call) <= 1  # this batch's student output only
    with torch.no_grad():
        s = torch.cat([quality.positions(student(**b.inputs), b) for b in batches])
        t = torch.cat([quality.positions(teacher(**b.inputs), b) for b in batches])
    p_t = t.softmax(-1)
    sure = p_t.max(-1).values >= 0.5
    agree = (s.argmax(-1) == t.argmax(-1)).float()
    assert got["samples"] == len(s) == 4 * 19
    assert got["agreement"] == pytest.approx(agree.mean().item())
    assert got["kl"] == pytest.approx((p_t * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean().item(), rel=1e-5)
    assert got["sure_samples"] == sure.sum().item()
    if sure.any():
        assert got["agreement_sure"] == pytest.approx(agree[sure].mean().item())


def test_hidden_states_and_labels():
    torch.manual_seed(2)
    a, b = nn.Linear(6, 4), nn.Linear(6, 4)
    batches = [Batch((torch.randn(5, 6),), torch.randint(0, 4, (5,))) for _ in range(3)]
    got = quality.compare(a, b, batches, "logits")
    with torch.no_grad():
        s, t = torch.cat([a(x.inputs[0]) for x in batches]), torch.cat([b(x.inputs[0]) for x in batches])
    y = torch.cat([x.labels for x in batches])
    assert got["accuracy"] == pytest.approx((s.argmax(-1) == y).float().mean().item())
    assert got["teacher_accuracy"] == pytest.approx((t.argmax(-1) == y).float().mean().item())
    hidden = quality.compare(a, b, batches, "hidden")
    assert hidden["cosine"] == pytest.approx(F.cosine_similarity(s, t, dim=-1).mean().item(), rel=1e-5)


def test_causal_lm_perplexity_is_the_models_own_next_token_loss(monkeypatch):
    """A causal LM's report gives each model's perplexity on the held-out ids: exp of the loss HF
    computes with those ids as labels (padding ignored), whatever the rows per softmax."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    teacher, student = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: the last three of the second row are not text
    batches = [Batch({"input_ids": ids, "attention_mask": mask})]
    monkeypatch.setattr(quality, "ROWS_AT_ONCE", 5)
    got = quality.compare(student, teacher, batches, "logits", next_token=True)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        for model, key in ((student, "perplexity"), (teacher, "teacher_perplexity")):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            assert got[key] == pytest.approx(float(loss.exp()), rel=1e-5)
    assert got["next_tokens"] == 8 + 5
    assert got["perplexity"] != pytest.approx(got["teacher_perplexity"])
    assert "perplexity" not in quality.compare(student, teacher, batches, "logits")  # a classifier's logits: none


def test_a_causal_lm_report_shows_both_perplexities():
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    import midl_convert as mc
    from midl_convert.report import build_report

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    teacher = LlamaForCausalLM(config).eval()
    held = [Batch({"input_ids": torch.randint(1, 50, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)})]
    student, plan = mc.convert(copy.deepcopy(teacher), mc.MIDLConfig(keep=0.5, rank=0, select="input"), held[0].inputs)
    report = build_report(student, teacher, held, "causal-lm", plan=plan, repeats=1, example_inputs=held[0].inputs)
    metrics = report.quality["metrics"]
    assert metrics["next_tokens"] == 16 and metrics["perplexity"] > 1 and metrics["teacher_perplexity"] > 1
    line = next(line for line in report.markdown().splitlines() if "Perplexity on held-out text" in line)
    assert f"{metrics['teacher_perplexity']:.2f} / {metrics['perplexity']:.2f}" in line
