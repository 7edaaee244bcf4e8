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
