"""TEAL's greedy walk (``benchmarks/teal_greedy.py``, a row of ``benchmarks/peers.py``) on a tiny random
Llama: thresholds give the asked sparsity on the calibration data, each greedy step adds one step of
effective sparsity and takes the projection that moves the block least, reusing outputs changes no
choice, and the plain masks and their FLOPs count agree with the package's input kind set to the
walked thresholds."""
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import midl_convert as mc
from midl_convert.flops import model_flops

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import teal_greedy as tg  # noqa: E402

VOCAB = 96


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        initializer_range=0.2, eos_token_id=None, bos_token_id=None,
                                        pad_token_id=0)).eval()


def batches(padded: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(1, VOCAB, (4, 24), generator=g)
        mask = torch.ones_like(ids)
        if padded:
            mask[0, 16:] = 0
            mask[1, 20:] = 0
            ids = ids * mask
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def projections(model: torch.nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and p.startswith("model.layers.")]


@pytest.fixture(scope="module")
def walked() -> tuple[LlamaForCausalLM, tg.Walk, list]:
    model, data = tiny_llama(), batches(padded=True)
    return model, tg.greedy_walk(model, projections(model), data, until=0.5, log=False), data


@torch.no_grad()
def test_thresholds_give_the_asked_sparsity_on_calibration_tokens(walked) -> None:
    model, walk, data = walked
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in projections(model)}
    handles = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: seen[p].append(a[0])) for p in seen]
    for b in data:
        model(**b)
    for h in handles:
        h.remove()
    for p, xs in seen.items():
        real = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(xs, data)])  # pad tokens do not count
        for s in (0.2, 0.5, 0.8):
            below = (real.abs() <= walk.threshold(p, s)).float().mean().item()
            assert below == pytest.approx(s, abs=0.01), (p, s)
    assert walk.threshold(p, 0.0) is None  # sparsity 0 stays dense


def test_each_step_adds_one_step_of_effective_sparsity_up_to_the_target(walked) -> None:
    model, walk, _ = walked
    assert [len(b) for b in walk.blocks] == [7, 7]
    for block, path in zip(walk.blocks, walk.paths):
        w = tg.weights(model, block)
        one = tg.STEP * w[block[0]] / sum(w.values())  # the query's step, in effective sparsity
        eff = [e for e, _ in path]
        assert eff[0] == 0 and eff[-1] >= 0.5 > eff[-2]
        assert all(b - a == pytest.approx(one) for a, b in zip(eff, eff[1:]))
        for e, s in path:
            assert tg.effective(s, w) == pytest.approx(e) and max(s.values()) < 1
        assert len({p for (_, a), (_, b) in zip(path, path[1:]) for p in block if a[p] != b[p]}) > 1  # not one projection
    level = walk.at_level(0.3)
    for block, path in zip(walk.blocks, walk.paths):
        got = tg.effective({p: level[p] for p in block}, tg.weights(model, block))
        assert abs(got - 0.3) <= (path[1][0] - path[0][0]) / 2 + 1e-9  # the closest recorded point


@torch.no_grad()
def test_the_step_that_moves_the_block_least_is_taken() -> None:
    model, data = tiny_llama(), batches(padded=False)
    model.model.layers[0].self_attn.v_proj.weight.zero_()  # attention adds nothing: its four inputs are free to drop
    walk = tg.greedy_walk(model, projections(model), data, until=0.3, log=False)  # attention is a third of the weights
    mlp = [p for p in walk.blocks[0] if ".mlp." in p]
    assert all(s[p] == 0 for _, s in walk.paths[0] for p in mlp)  # block 0 drops only what costs nothing
    assert max(walk.paths[0][-1][1].values()) > 0.5
    assert any(s[p.replace("layers.0", "layers.1")] > 0 for _, s in walk.paths[1] for p in mlp)  # block 1 does not


def test_reusing_outputs_changes_no_choice() -> None:
    model, data = tiny_llama(), batches(padded=True)
    fast = tg.greedy_walk(model, projections(model), data, until=0.3, log=False)
    slow = tg.greedy_walk(model, projections(model), data, until=0.3, reuse=False, log=False)
    assert fast.paths == slow.paths


def package_teal(model: torch.nn.Module, walk: tg.Walk, sparsity: dict[str, float], example) -> torch.nn.Module:
    """The package's input kind at rank 0 on the walked Linears, scoring |x| alone (gate and column
    scale 1, no centre), with adaptive masks at TEAL's thresholds: what TEAL computes, as the package's layers."""
    import copy

    student = copy.deepcopy(model)
    mc.convert(student, mc.MIDLConfig(keep=0.5, rank=0, select="input", adaptive=True, centre="none"), example)
    for path, s in sparsity.items():
        layer = student.get_submodule(path)
        layer.gate.data.fill_(1.0)
        layer.column_norm.fill_(1.0)
        t = walk.threshold(path, s)
        layer.keep = 1.0 if t is None else 1.0 - s
        layer.threshold = t
    return student


@torch.no_grad()
def test_plain_masks_and_their_flops_agree_with_the_package_layers(walked) -> None:
    model, walk, _ = walked
    data = batches(padded=False)[0]
    sparsity = walk.at_level(0.4)
    student = package_teal(model, walk, sparsity, {"input_ids": data["input_ids"][:1, :8]})
    assert set(mc.midl_layers(student)) == set(projections(model))
    with tg.thresholded(model, walk, sparsity):
        plain = model(**data).logits
    torch.testing.assert_close(student(**data).logits, plain, rtol=1e-4, atol=1e-4)
    ours, theirs = tg.teal_flops(model, walk, sparsity, [data]), model_flops(student, model, data)
    assert ours.dense == theirs.dense
    for p, f in ours.layers.items():
        mine = f.midl - (0 if sparsity[p] == 0 else 2 * model.get_submodule(p).in_features * 4 * 24)  # less |x| > t
        assert mine == pytest.approx(theirs.layers[p].parts.get("exact", theirs.layers[p].midl), rel=1e-6), p
    saved = tg.effective(sparsity, {p: model.get_submodule(p).weight.numel() for p in sparsity})
    assert 0.9 / (1 - saved) < ours.converted_ratio < 1.1 / (1 - saved)
    assert ours.ratio < ours.converted_ratio  # embeddings, attention and the head stay dense


@torch.no_grad()
def test_uniform_thresholds_keep_their_share_where_the_inputs_are_the_dense_ones() -> None:
    model, data = tiny_llama(), batches(padded=False)
    walk = tg.greedy_walk(model, projections(model), data, until=0.05, log=False)
    for s in (0.3, 0.6):
        f = tg.teal_flops(model, walk, walk.uniform(s), data)
        first = f.layers["model.layers.0.self_attn.q_proj"]  # nothing masked before it: its inputs are the dense ones
        rows = 2 * 4 * 24
        kept = (first.midl - 2 * 64 * rows) / (2 * 64 * rows)  # mean kept inputs per row, out = 64
        assert kept / 64 == pytest.approx(1 - s, abs=0.01)
