"""Converted decoders generate: greedy tokens with the KV cache equal those without it, and at keep 1.0
equal the original model's. With the cache each decode step is one row per layer (the fused kernel's
case); without it every step recomputes the whole prefix (the masked path), so the two agree only if
per-token masks depend on nothing but their own token."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import midl_convert as mc
from midl_convert.kernels import fused_kernel
from midl_convert.kinds.output.layer import OutputMIDLBase

VOCAB, PROMPT, NEW = 96, 6, 12


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        initializer_range=0.2, eos_token_id=None, bos_token_id=None, pad_token_id=0))


def tiny_gpt2() -> GPT2LMHeadModel:  # HF Conv1D layers (transposed weights) and a fused qkv projection
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      initializer_range=0.2, eos_token_id=None, bos_token_id=None, pad_token_id=0))


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
SELECTS = ["output"] + (["input"] if "select" in mc.MIDLConfig.model_fields else [])  # the input side, where it exists


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=use_cache,
                         max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
    return out[:, prompt.shape[1]:]


def convert(model: torch.nn.Module, keep: float, select: str) -> torch.nn.Module:
    extra = {"select": select} if select != "output" else {}
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    mc.convert(model, mc.MIDLConfig(keep=keep, rank=4, **extra), {"input_ids": prompt})
    assert mc.midl_layers(model), "nothing was converted"
    return model


def paths_taken(monkeypatch) -> list[str]:
    """Record the compute path of every output-side MID-L call."""
    seen: list[str] = []
    original = OutputMIDLBase.compute_route

    def spy(self, x):
        seen.append(original(self, x))
        return seen[-1]

    monkeypatch.setattr(OutputMIDLBase, "compute_route", spy)
    return seen


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("name", MODELS)
def test_generate_with_and_without_kv_cache_agree(name, select, monkeypatch):
    model = convert(build(name), keep=0.5, select=select)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    seen = paths_taken(monkeypatch)
    cached = greedy(model, prompt, True)
    if select == "output" and fused_kernel() is not None:  # decode steps are one row: the output side's kernel
        assert seen.count("kernel") >= (NEW - 1) * len(mc.midl_layers(model))
    uncached = greedy(model, prompt, False)
    assert cached.shape == (1, NEW)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("name", MODELS)
def test_keep_one_generates_the_original_tokens(name, select):
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    original = greedy(build(name), prompt, True)
    model = convert(build(name), keep=1.0, select=select)
    assert torch.equal(greedy(model, prompt, True), original)
    assert torch.equal(greedy(model, prompt, False), original)
    assert len(set(original[0].tolist())) > 2  # a real sequence, not one token repeated
