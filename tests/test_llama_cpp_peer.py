"""llama.cpp as the peer runtime: a faulting build reported in one line, the child's failures raised
as one error, the decode timing's fields, and (slow) the real SmolLM2 GGUF against its HF model."""
from __future__ import annotations

import time

import pytest
import torch

from midl_convert import latency, llama_cpp_peer
from midl_convert.llama_cpp_peer import LlamaCpp, gguf_format, probe


@pytest.mark.parametrize("name,expected", [("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"), ("m.q8_0.gguf", "Q8_0"),
                                           ("model-f16.gguf", "F16"), ("a.Q4_K_M.gguf", "Q4_K_M"), ("plain.gguf", "GGUF")])
def test_the_block_format_comes_from_the_file_name(name, expected):
    assert gguf_format(name) == expected


def test_a_build_that_faults_is_one_line_naming_the_signal_and_the_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr(llama_cpp_peer, "available", lambda: True)
    why = probe(tmp_path / "m.gguf", code="import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert why is not None and "\n" not in why
    assert "SIGSEGV" in why and "GGML_AMX_TILE=OFF" in why


def test_a_child_that_fails_is_reported_with_its_last_line(monkeypatch, tmp_path):
    monkeypatch.setattr(llama_cpp_peer, "available", lambda: True)
    why = probe(tmp_path / "m.gguf", code="import sys; sys.exit('no model at ' + sys.argv[1])")
    assert why == f"llama.cpp failed in a child process (exit 1): no model at {tmp_path / 'm.gguf'}"
    assert probe(tmp_path / "m.gguf", code="pass") is None


def test_a_child_that_dies_raises_one_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"llama.cpp's process died \(exit 1\) on ready"):
        LlamaCpp(tmp_path / "missing.gguf", 1)


class FakePeer:
    """Decodes in 20 ms, whatever it is asked."""

    closed = False

    def generate_seconds(self, prompt: list[int], new_tokens: int) -> float:
        time.sleep(0.02)
        return 0.02

    def close(self) -> None:
        FakePeer.closed = True


def test_decode_timing_puts_llama_cpp_in_the_same_rounds_or_says_why_not(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 64, (1, 8))
    monkeypatch.setattr(latency, "start_peer", lambda gguf, threads: (FakePeer(), None))
    out = latency._decode_speed(model, model, ids, 3, 2, "hf", gguf="/m/SmolLM2.Q8_0.gguf")
    assert out["llama_cpp"] == "Q8_0" and FakePeer.closed
    assert 3 / 0.03 < out["llama_cpp_tokens_per_s"] < 3 / 0.02  # the wall-clock of a 20 ms call
    assert out["converted_per_llama_cpp"] == pytest.approx(out["converted_tokens_per_s"] / out["llama_cpp_tokens_per_s"])
    class DyingPeer(FakePeer):
        def generate_seconds(self, prompt: list[int], new_tokens: int) -> float:
            raise RuntimeError("llama.cpp's process died (signal SIGSEGV) on generate")

    monkeypatch.setattr(latency, "start_peer", lambda gguf, threads: (DyingPeer(), None))
    out = latency._decode_speed(model, model, ids, 3, 2, "hf", gguf="/m/x.gguf")
    assert out["llama_cpp_missing"] == "llama.cpp's process died (signal SIGSEGV) on generate"
    assert "llama_cpp_tokens_per_s" not in out and out["converted_tokens_per_s"] > 0
    monkeypatch.setattr(latency, "start_peer", lambda gguf, threads: (None, "llama.cpp died with SIGSEGV"))
    out = latency._decode_speed(model, model, ids, 3, 2, "hf", gguf="/m/x.gguf")
    assert out["llama_cpp_missing"] == "llama.cpp died with SIGSEGV" and "llama_cpp_tokens_per_s" not in out


@pytest.mark.slow
def test_llama_cpp_on_the_shipped_gguf_judges_as_the_hf_model_read_from_it():
    """The same Q4_1 file: llama.cpp's perplexity within 3% of the HF model's (dequantised float32)
    on the same Bible tokens, and a decode timed. A build that faults here skips with its one line."""
    import midl_convert as mc

    loaded = mc.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    peer, why = llama_cpp_peer.start_peer(loaded.gguf, 2)
    if peer is None:
        assert "\n" not in why and "llama.cpp" in why
        pytest.skip(why)
    from midl_convert.data import kjv_sentences

    ids = loaded.tokenizer(" ".join(kjv_sentences()[4096:4160]), add_special_tokens=False)["input_ids"][:256]
    with peer, torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, :-1]
        hf = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).exp().item()
        assert peer.perplexity(ids, 256) == pytest.approx(hf, rel=0.03)
        assert peer.generate_seconds(ids[:16], 4) > 0
