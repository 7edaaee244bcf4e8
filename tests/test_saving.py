"""Save and load: outputs equal after reload, HF save_pretrained, custom models, no pickles, atomic writes."""
import json

import pytest
import torch

import midl_convert as mc
from midl_convert.saving import load, save
from helpers import TinyNet


def test_timm_round_trip_equals(tmp_path):
    lm = mc.load_model("resnet18", random_init=True, num_classes=3)
    x = (torch.randn(2, 3, 64, 64),)
    mc.convert(lm.model, mc.MIDLConfig(keep=0.5, rank=4, granularity="sample"), x)
    lm.model.layer2[0].downsample[0].gate_mode = "linear"  # calibrated state must survive too
    ref = lm.model(*x)
    folder = save(lm.model, tmp_path / "out", build=lm.build)
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "midl_config.json"}
    meta = json.loads((folder / "midl_config.json").read_text())
    assert meta["build"]["name"] == "resnet18" and meta["plan"]["layers"]
    again = load(folder)
    assert again.layer2[0].downsample[0].gate_mode == "linear"
    assert torch.equal(again(*x), ref)


def test_hf_save_pretrained_and_load(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    ids = {"input_ids": torch.randint(0, 60, (2, 7))}
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=4), ids)
    ref = model(**ids).last_hidden_state
    model.save_pretrained(tmp_path / "hf")  # the user's own call: the plan travels in config.json
    assert "midl_plan" in json.loads((tmp_path / "hf" / "config.json").read_text())
    torch.testing.assert_close(load(tmp_path / "hf")(**ids).last_hidden_state, ref)
    save(model, tmp_path / "mc")
    torch.testing.assert_close(load(tmp_path / "mc")(**ids).last_hidden_state, ref)


def test_custom_model_needs_its_base(tmp_path):
    torch.manual_seed(1)
    model = TinyNet().eval()
    x = torch.randn(4, 16)
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=2), x)
    ref = model(x)
    save(model, tmp_path / "c")
    with pytest.raises(mc.MIDLError, match=r"holds a custom model: pass the base model"):
        load(tmp_path / "c")
    assert torch.equal(load(tmp_path / "c", model=TinyNet())(x), ref)


def test_failed_save_leaves_nothing_and_keeps_old(tmp_path):
    model = TinyNet()
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=2), torch.randn(1, 16))
    save(model, tmp_path / "o")
    before = (tmp_path / "o" / "model.safetensors").read_bytes()

    def boom(_tmp):
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        save(model, tmp_path / "o", extra=boom)
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp folder left behind
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == before


def test_bad_folders(tmp_path):
    with pytest.raises(mc.MIDLError, match=r"is not a saved midl-convert model"):
        load(tmp_path)
    with pytest.raises(mc.MIDLError, match=r"has no MID-L layers to save"):
        save(TinyNet(), tmp_path / "x")


def _tiny_lm(name: str):
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                           bos_token_id=1, eos_token_id=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2))
    model.generation_config = GenerationConfig(max_new_tokens=7, do_sample=False, bos_token_id=1, eos_token_id=2)
    ids = {"input_ids": torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))}
    mc.convert(model.eval(), mc.MIDLConfig(keep=0.5, rank=4), ids)
    return model, ids


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("writer", ["save_pretrained", "mc.save"])
def test_dense_from_pretrained_of_a_converted_model_fails_loudly(tmp_path, name, writer):
    """A dense load used to fail on transposed shapes (GPT-2) or load silently with other outputs (Llama)."""
    from transformers import AutoModelForCausalLM

    model, ids = _tiny_lm(name)
    folder = tmp_path / "m"
    model.save_pretrained(folder) if writer == "save_pretrained" else save(model, folder)
    for cls in (AutoModelForCausalLM, type(model)):
        with pytest.raises(ValueError, match="quantization config"):
            cls.from_pretrained(folder)
    assert "midl_convert.load" in json.loads((folder / "config.json").read_text())["quantization_config"]["midl_convert"]
    with pytest.raises(mc.MIDLError, match=r"converted MID-L model: load it with midl_convert.load"):
        mc.load_model(str(folder))
    again = load(folder)
    torch.testing.assert_close(again(**ids).logits, model(**ids).logits)
    assert again.generation_config.max_new_tokens == 7
    assert mc.merge_and_unload(again).config.to_dict().get("quantization_config") is None  # dense again, loads again


def test_load_in_a_fresh_process_keeps_outputs_and_generation_config(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import save_file

    model, ids = _tiny_lm("gpt2")
    save(model, tmp_path / "m")
    assert (tmp_path / "m" / "generation_config.json").is_file()
    save_file({"ids": ids["input_ids"], "logits": model(**ids).logits.detach().contiguous()}, str(tmp_path / "ref.safetensors"))
    code = ("import sys, torch, midl_convert as mc; from safetensors.torch import load_file; "
            "ref = load_file(sys.argv[2]); m = mc.load(sys.argv[1]); "
            "torch.testing.assert_close(m(input_ids=ref['ids']).logits, ref['logits']); "
            "out = m.generate(ref['ids'][:1], attention_mask=torch.ones_like(ref['ids'][:1])); "
            "print(type(m).__name__, m.generation_config.max_new_tokens, out.shape[1] - ref['ids'].shape[1])")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "ref.safetensors")],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["GPT2LMHeadModel", "7", "7"]


def test_load_by_hub_id_uses_the_hub_cache_and_fails_fast_offline(tmp_path, monkeypatch):
    import time

    import huggingface_hub

    from midl_convert import models

    model, ids = _tiny_lm("llama")
    save(model, tmp_path / "m")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.hub_reachable.cache_clear()
    start = time.perf_counter()
    with pytest.raises(mc.MIDLError, match=r"cannot download 'someone/midl-llama': the Hugging Face hub is unreachable") as err:
        load("someone/midl-llama")
    assert time.perf_counter() - start < 10 and "\n" not in str(err.value)
    calls = []

    def snapshot(repo_id, local_files_only=False, **_):
        calls.append((repo_id, local_files_only))
        return str(tmp_path / "m")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    torch.testing.assert_close(load("someone/midl-llama")(**ids).logits, model(**ids).logits)
    assert calls == [("someone/midl-llama", True)]
    models.hub_reachable.cache_clear()


def test_timm_loaders_refuse_a_converted_file_and_mc_load_rebuilds_it(tmp_path):
    import timm

    lm = mc.load_model("resnet18", random_init=True, num_classes=3)
    x = (torch.randn(2, 3, 64, 64),)
    mc.convert(lm.model, mc.MIDLConfig(keep=0.5, rank=4, granularity="sample"), x)
    ref = lm.model(*x)
    weights = save(lm.model, tmp_path / "o", build=lm.build) / "model.safetensors"
    with pytest.raises(RuntimeError, match="size mismatch"):
        timm.create_model("resnet18", num_classes=3, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        timm.create_model("resnet18", num_classes=3, checkpoint_path=str(weights))
    assert torch.equal(load(tmp_path / "o")(*x), ref)


def test_trust_remote_code_needs_the_explicit_argument(tmp_path):
    lm = mc.load_model("resnet18", random_init=True, num_classes=3)
    mc.convert(lm.model, mc.MIDLConfig(keep=0.5, rank=4), (torch.randn(1, 3, 32, 32),))
    folder = save(lm.model, tmp_path / "o", build={**lm.build, "kwargs": {**lm.build["kwargs"], "trust_remote_code": True}})
    with pytest.raises(mc.MIDLError, match=r"trust_remote_code.*--trust-remote-code"):
        load(folder)
    assert isinstance(load(folder, trust_remote_code=True), torch.nn.Module)


@pytest.mark.slow
def test_real_minilm_round_trip_in_a_fresh_process(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from transformers import AutoModel

    from midl_convert import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.hub_reachable.cache_clear()
    lm = mc.load_model("sentence-transformers/all-MiniLM-L6-v2")
    mc.convert(lm.model, mc.MIDLConfig(keep=0.5, rank=16), lm.example_inputs)
    ref = lm.model(**lm.example_inputs).last_hidden_state
    folder = save(lm.model, tmp_path / "m", build=lm.build, tokenizer=lm.tokenizer)
    with pytest.raises(ValueError, match="quantization config"):
        AutoModel.from_pretrained(folder)
    torch.save({"ids": lm.example_inputs["input_ids"], "ref": ref.detach()}, tmp_path / "ref.pt")
    code = ("import sys, torch, midl_convert as mc; r = torch.load(sys.argv[2]); m = mc.load(sys.argv[1]); "
            "torch.testing.assert_close(m(input_ids=r['ids']).last_hidden_state, r['ref']); print(len(mc.midl_layers(m)))")
    res = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "ref.pt")], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) == len(mc.midl_layers(lm.model))
    models.hub_reachable.cache_clear()
