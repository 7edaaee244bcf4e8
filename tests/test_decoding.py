"""The lean decoder (static KV cache, compiled frozen step) gives the tokens HF ``generate`` gives,
for dense and converted decoders, and refuses what it cannot run."""
import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import midl_convert as mc
from midl_convert.decoding import LeanDecoder, supports_static_cache

VOCAB, PROMPT, NEW = 96, 5, 10


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             initializer_range=0.2, eos_token_id=None, bos_token_id=None, pad_token_id=0)
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                        eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                          min_new_tokens=NEW, pad_token_id=0)


def converted(name: str, select: str) -> torch.nn.Module:
    model = tiny(name)
    mc.convert(model, mc.MIDLConfig(select=select, keep=0.5, rank=0 if select == "input" else 4), {"input_ids": prompt()})
    assert mc.midl_layers(model)
    return model.eval()


@pytest.mark.parametrize("select", ["dense", "input", "output"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_lean_decoder_gives_generates_tokens(name, select):
    model = tiny(name) if select == "dense" else converted(name, select)
    ids = prompt()
    lean = LeanDecoder(model, max_tokens=32, compile=False)
    out = lean.generate(ids, NEW)
    assert out.shape == (1, PROMPT + NEW)
    assert torch.equal(out, hf_greedy(model, ids))
    assert torch.equal(lean.generate(ids, NEW), out)  # the cache is reset between calls
    assert lean.compile_seconds is None


@pytest.mark.slow
@pytest.mark.parametrize("select", ["dense", "input"])
def test_compiled_lean_decoder_gives_generates_tokens(select):
    model = tiny("llama") if select == "dense" else converted("llama", select)
    ids = prompt()
    lean = LeanDecoder(model, max_tokens=32, compile=True)
    assert torch.equal(lean.generate(ids, NEW), hf_greedy(model, ids))
    assert lean.compile_seconds is not None and lean.compile_seconds > 0


@pytest.mark.slow
def test_two_compiled_decoders_in_turn_each_run_their_own_graph():
    """Compiled steps skip dynamo's guards once compiled; two decoders (one code object, two
    graphs) called in turn, as the benchmarks interleave them, still each decode their own model."""
    ids = prompt()
    models = {"dense": tiny("llama"), "input": converted("llama", "input")}
    expected = {name: hf_greedy(m, ids) for name, m in models.items()}
    assert not torch.equal(expected["dense"], expected["input"])  # else the test could not tell them apart
    leans = {name: LeanDecoder(m, max_tokens=32, compile=True) for name, m in models.items()}
    for _ in range(2):
        for name, lean in leans.items():
            assert torch.equal(lean.generate(ids, NEW), expected[name]), name


def test_lean_decoder_refuses_what_it_cannot_run():
    model = tiny("llama")
    lean = LeanDecoder(model, max_tokens=8, compile=False)
    with pytest.raises(ValueError, match="exceed the cache"):
        lean.generate(prompt(), 4)
    with pytest.raises(ValueError, match="batch 1"):
        lean.generate(prompt().repeat(2, 1), 2)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    assert not supports_static_cache(bert)
    with pytest.raises(ValueError, match="static KV cache"):
        LeanDecoder(bert)


def test_a_failed_compile_decodes_uncompiled(monkeypatch):
    model = tiny("llama")
    lean = LeanDecoder(model, max_tokens=32, compile=True)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nmore lines")

    monkeypatch.setattr(lean, "_step", broken)
    ids = prompt()
    assert torch.equal(lean.generate(ids, NEW), hf_greedy(model, ids))
    assert not lean.compiled and lean.compile_seconds is None
    assert lean.compile_error == "RuntimeError: no C++ compiler"
