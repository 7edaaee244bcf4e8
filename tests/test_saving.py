"""Save and load: outputs equal after reload, HF save_pretrained, custom models, no pickles, atomic writes."""
import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import midl_convert as mc
from midl_convert import migrate
from midl_convert.saving import load, previous_run, save
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


def converted_tiny(seed: int = 0, rank: int = 2) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=rank), torch.randn(1, 16))
    return model.eval()


def test_a_folder_of_the_users_files_is_refused_unless_overwrite(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(mc.MIDLError, match=r"exists and is not an earlier midl-convert run .*; .* or --overwrite"):
        save(converted_tiny(), mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and [p.name for p in tmp_path.iterdir()] == ["mine"]
    save(converted_tiny(), mine, overwrite=True)  # asked for: the run's files go in, the user's file stays
    assert (mine / "thesis.tex").read_text() == "years of work" and (mine / "model.safetensors").is_file()
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(mc.MIDLError, match=r"is a file, not a folder"):
        save(converted_tiny(), tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_an_earlier_run_is_replaced_and_its_spent_files_go(tmp_path):
    def extra(folder):
        (folder / "report.md").write_text("first")

    save(converted_tiny(0), tmp_path / "o", extra=extra)
    assert (tmp_path / "o" / "report.md").is_file()
    model = converted_tiny(1)
    save(model, tmp_path / "o")  # an earlier run of this tool: replaced without asking
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["midl_config.json", "model.safetensors"]
    assert json.loads((tmp_path / "o" / "midl_config.json").read_text())["files"] == ["model.safetensors", "midl_config.json"]
    x = torch.randn(3, 16)
    assert torch.equal(load(tmp_path / "o", model=TinyNet())(x), model(x))


def test_out_dot_writes_into_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save(converted_tiny(0), ".")
    model = converted_tiny(1)
    save(model, ".")  # the current folder cannot be renamed: its files are replaced one by one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["midl_config.json", "model.safetensors"]
    x = torch.randn(3, 16)
    assert torch.equal(load(".", model=TinyNet())(x), model(x))


def test_temp_folders_of_dead_runs_are_cleaned(tmp_path):
    from midl_convert.files import MARKER_FILE

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout.strip())
    stale, live = tmp_path / f".o.tmp-{pid}-aa", tmp_path / f".o.tmp-{os.getppid()}-bb"
    for folder, owner in ((stale, pid), (live, os.getppid())):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
        (folder / MARKER_FILE).write_text(json.dumps({"tool": "midl-convert", "for": "temp:o", "pid": owner}))
    save(converted_tiny(), tmp_path / "o")
    assert not stale.exists() and live.exists()  # a running process's temp folder is left alone


def _snapshot(root):
    """Every path under ``root`` with its bytes (None for folders): what a run must leave as it was."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("listed", ["../victim.txt", "../victimdir", "ABSOLUTE", "thesis.txt", "model.safetensors"])
def test_a_run_deletes_only_what_it_provably_wrote(tmp_path, listed):
    """An earlier run's file list names files outside the folder, a user's file, or a file the user has
    since replaced: none of them is deleted (each was deleted before)."""
    (tmp_path / "victim.txt").write_text("victim")
    (tmp_path / "victimdir").mkdir()
    (tmp_path / "victimdir" / "data.bin").write_bytes(b"data")
    out = tmp_path / "out"
    save(converted_tiny(0), out)
    meta = json.loads((out / "midl_config.json").read_text())
    name = str(tmp_path / "victim.txt") if listed == "ABSOLUTE" else listed
    (out / "thesis.txt").write_text("years of work") if listed == "thesis.txt" else None
    if listed == "model.safetensors":  # the user put their own file where the run's was
        (out / "model.safetensors").write_bytes(b"the user's own bytes")
        name = "report.md"  # and the list claims a file the user wrote
        (out / "report.md").write_text("the user's notes")
    meta["files"].append(name)
    meta["written"][name] = {"size": 6, "mtime_ns": 0}
    (out / "midl_config.json").write_text(json.dumps(meta))
    before = _snapshot(tmp_path)
    if listed in ("thesis.txt", "model.safetensors"):
        with pytest.raises(mc.MIDLError, match="is not an earlier midl-convert run"):
            save(converted_tiny(1), out)  # the folder holds files the run cannot prove it wrote
        assert _snapshot(tmp_path) == before
    save(converted_tiny(1), out, overwrite=listed in ("thesis.txt", "model.safetensors"))
    assert (tmp_path / "victim.txt").read_text() == "victim" and (tmp_path / "victimdir" / "data.bin").read_bytes() == b"data"
    if listed == "thesis.txt":
        assert (out / "thesis.txt").read_text() == "years of work"
    if listed == "model.safetensors":
        assert (out / "report.md").read_text() == "the user's notes"  # not the run's: stays


def test_an_earlier_runs_file_is_removed_only_while_unchanged(tmp_path):
    def extra(folder):
        (folder / "report.md").write_text("first")

    out = save(converted_tiny(0), tmp_path / "o", extra=extra)
    save(converted_tiny(1), out)  # report.md is the earlier run's, unchanged: it goes
    assert not (out / "report.md").exists()
    save(converted_tiny(0), out, extra=extra)
    (out / "report.md").write_text("edited by the user")
    with pytest.raises(mc.MIDLError, match="not an earlier midl-convert run"):
        save(converted_tiny(1), out)
    save(converted_tiny(1), out, overwrite=True)
    assert (out / "report.md").read_text() == "edited by the user"


def test_users_hidden_folders_beside_out_are_left_alone(tmp_path):
    """``.out.tmp-*`` and ``.out.distill`` of the user's own (no marker) were deleted before."""
    (tmp_path / ".o.tmp-999999").write_text("mine")
    (tmp_path / ".o.tmp-999998").mkdir()
    (tmp_path / ".o.tmp-999998" / "mine.txt").write_text("mine")
    before = _snapshot(tmp_path)
    save(converted_tiny(), tmp_path / "o")
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("o")} == before


def test_a_folder_where_the_run_writes_a_file_is_refused_before_anything_changes(tmp_path):
    user = tmp_path / "user"
    (user / "model.safetensors").mkdir(parents=True)
    (user / "model.safetensors" / "shard.bin").write_bytes(b"shard")
    (user / "midl_config.json").write_text("the user's own config")
    before = _snapshot(tmp_path)
    with pytest.raises(mc.MIDLError, match=r"holds a folder named 'model.safetensors', where the run writes a file"):
        save(converted_tiny(), user, overwrite=True)
    assert _snapshot(tmp_path) == before


def test_a_failed_move_puts_the_old_config_back(tmp_path, monkeypatch):
    import midl_convert.saving as saving

    out = save(converted_tiny(0), tmp_path / "o")
    config = (out / "midl_config.json").read_text()
    real = saving._move

    def fail_on_weights(entry, target):
        if entry.name == "model.safetensors":
            raise OSError(28, "No space left on device")
        real(entry, target)

    monkeypatch.setattr(saving, "_move", fail_on_weights)
    with pytest.raises(OSError):
        save(converted_tiny(1), out)
    assert (out / "midl_config.json").read_text() == config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # the temporary folder is gone


def test_a_dangling_link_as_out_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(mc.MIDLError, match=r"is a link to .*nowhere', which does not exist"):
        save(converted_tiny(), tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and not (tmp_path / "nowhere").exists()


def test_files_get_the_users_umask(tmp_path):
    from midl_convert.files import write_atomic

    old = os.umask(0o022)
    try:
        folder = save(converted_tiny(), tmp_path / "o", extra=lambda f: write_atomic(f / "report.json", "{}"))
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    finally:
        os.umask(old)
    assert modes == {"model.safetensors": 0o644, "midl_config.json": 0o644, "report.json": 0o644}


@pytest.mark.parametrize("damage,message", [
    ("truncate_weights", r"cannot read '.*model.safetensors' as safetensors .*truncated or not safetensors"),
    ("garbage_weights", r"cannot read '.*model.safetensors' as safetensors"),
    ("bad_json", r"midl_config.json' is not valid JSON \(.*\); save the model again"),
    ("json_list", r"midl_config.json' holds a JSON list, not an object"),
    ("no_layers", r"midl_config.json' holds no valid plan \(KeyError: 'layers'\)"),
    ("other_plan", r"do not fit the plan in midl_config.json: 'fc1.gate_weight' has shape \(64, 2\) in the file, "
                   r"\(64, 3\) in the model; the folder mixes two runs"),
])
def test_a_damaged_folder_is_one_clear_error(tmp_path, damage, message):
    folder = save(converted_tiny(), tmp_path / "o")
    weights, meta = folder / "model.safetensors", folder / "midl_config.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage_weights":
        weights.write_bytes(os.urandom(300))
    elif damage == "bad_json":
        meta.write_text(meta.read_text()[:-20])
    elif damage == "json_list":
        meta.write_text("[1, 2]")
    elif damage == "no_layers":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "plan": {"method": "fx"}}))
    else:  # the config of a rank-3 run beside the weights of a rank-2 run
        other = save(converted_tiny(rank=3), tmp_path / "p")
        meta.write_text((other / "midl_config.json").read_text())
    with pytest.raises(mc.MIDLError, match=message):
        load(folder, model=TinyNet())


EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "tf_efficientnet_lite0-1.2x"  # written by format version 1


def as_version_1(meta: dict) -> dict:
    """``midl_config.json`` as format version 1 wrote it: the tracer 'method', a layer's 'side' and 'kind'."""
    old = copy.deepcopy(meta)
    old["format_version"] = 1
    old["plan"]["method"] = old["plan"].pop("trace")
    for layer in old["plan"]["layers"]:
        layer["side"], layer["kind"] = layer.pop("select"), layer.pop("module_type")
    return old


def test_a_version_1_folder_loads_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=2, select="input"), torch.randn(1, 16))  # not the default kind
    x = torch.randn(4, 16)
    ref = model.eval()(x)
    folder = save(model, tmp_path / "o", recipe={"midl": {"select": "input"}})
    meta = json.loads((folder / "midl_config.json").read_text())
    assert meta["format_version"] == 2 and {"select", "module_type"} <= set(meta["plan"]["layers"][0])
    old = as_version_1(meta)
    old["recipe"] = {"midl": {"select": None, "flops_ratio": 1.3}}
    (folder / "midl_config.json").write_text(json.dumps(old))
    again = load(folder, model=TinyNet())
    assert all(isinstance(m, mc.InputMIDLinear) for m in mc.midl_layers(again).values())
    assert torch.equal(again(x), ref)
    assert migrate.config_file(old, "old")["recipe"]["midl"]["select"] == "auto"  # null meant auto under a budget
    assert previous_run(folder) is not None  # still an earlier run of this tool: --out may be written again


def test_the_shipped_version_1_example_replays_its_plan():
    """The example folder's midl_config.json was written by format version 1 (method, kind, side, select: null)."""
    import timm

    meta = json.loads((EXAMPLE / "midl_config.json").read_text())
    assert meta["format_version"] == 1 and "side" in meta["plan"]["layers"][0]
    new = migrate.config_file(meta, "example")
    assert new["format_version"] == 2 and new["recipe"]["midl"]["select"] == "auto"
    plan = mc.Plan.from_dict(new["plan"])
    assert plan.trace == meta["plan"]["method"]
    model = mc.apply_plan(timm.create_model(meta["build"]["name"], pretrained=False), plan, init=False)
    layers = mc.midl_layers(model)
    assert len(layers) == len(plan.converted) and {lp.module_type for lp in plan.converted} == {"conv2d"}
    for old in meta["plan"]["layers"]:
        if old["convert"]:
            assert type(layers[old["path"]]).__name__ == f"{old['side'].capitalize()}MIDLConv2d"
            assert layers[old["path"]].keep == old["keep"]


def test_a_hugging_face_config_with_a_version_1_plan_loads(tmp_path):
    """``save_pretrained`` keeps the plan in config.json without a version: its old keys are renamed too."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    ids = {"input_ids": torch.randint(0, 60, (2, 7))}
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=0, select="input"), ids)
    ref = model(**ids).last_hidden_state
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["midl_plan"] = as_version_1({"plan": config["midl_plan"]})["plan"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(load(tmp_path / "hf")(**ids).last_hidden_state, ref)


@pytest.mark.parametrize("version,message", [
    (3, r"format_version 3, newer than this midl-convert reads \(2\); upgrade midl-convert"),
    (0, r"format_version 0; this midl-convert reads 1 to 2"),
    (None, r"format_version None; this midl-convert reads 1 to 2"),
])
def test_a_format_version_this_code_does_not_know_is_refused_in_one_line(tmp_path, version, message):
    folder = save(converted_tiny(), tmp_path / "o")
    meta = json.loads((folder / "midl_config.json").read_text())
    (folder / "midl_config.json").write_text(json.dumps({**meta, "format_version": version}))
    with pytest.raises(mc.MIDLError, match=message) as info:
        load(folder, model=TinyNet())
    assert "\n" not in str(info.value)
