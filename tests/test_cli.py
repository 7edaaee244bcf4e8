"""The command line through typer's test runner: a full run, dry run, inspect, schema, report, bad input."""
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from midl_convert import models
from midl_convert.cli import app, main

runner = CliRunner()
SMALL = ["--random-init", "--steps", "2", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.hub_reachable.cache_clear()


def invoke(*args):
    return runner.invoke(app, list(args))


def small_recipe(tmp_path, **extra):
    body = {"model": {"spec": "test_vit", "random_init": True},
            "distill": {"steps": 2, "batch_size": 4, "calibration_batches": 1},
            "report": {"eval_samples": 8, "batch_size": 4}, "output": {"dir": str(tmp_path / "out")}} | extra
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(body))
    return path


def test_full_run_writes_everything(tmp_path):
    res = invoke("convert", str(small_recipe(tmp_path)))
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert {"model.safetensors", "midl_config.json", "report.json", "report.md", "report.png"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["layers"] and "agreement" in report["quality"]["metrics"]
    assert f"wrote {out}" in res.output.replace("\n", "")
    assert not (tmp_path / ".out.distill").exists()  # checkpoints are removed once the run is saved
    again = invoke("report", str(out))
    assert again.exit_code == 0 and "FLOPs" in again.output
    import midl_convert as mc

    assert mc.midl_layers(mc.load(out))


def test_adaptive_run_saves_calibrated_thresholds(tmp_path):
    res = invoke("convert", "--recipe", str(small_recipe(tmp_path)), "--adaptive", "--include", "all-linear")
    assert res.exit_code == 0, res.output
    import midl_convert as mc

    layers = mc.midl_layers(mc.load(tmp_path / "out"))
    assert layers and all(m.adaptive and m.threshold is not None for m in layers.values())
    assert layers["blocks.0.mlp.fc1"].downstream == (None, "gelu")  # what calibration fits to, kept for a later refit


def test_adaptive_budget_run_meets_the_target_on_the_example_input(tmp_path):
    res = invoke("convert", "--recipe", str(small_recipe(tmp_path)), "--adaptive", "--include", "all-linear",
                 "--flops-ratio", "1.3")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["flops"]["budget"]["target"] == 1.3
    assert report["flops"]["ratio"] >= 1.3  # adaptive thresholds capped to what the budget counted
    from midl_convert.report import Report

    assert Report.load(tmp_path / "out").flops["budget"] == report["flops"]["budget"]  # validates with a budget section


def test_options_override_the_recipe(tmp_path):
    res = invoke("convert", "--recipe", str(small_recipe(tmp_path)), "--keep", "0.25", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "0.25" in res.output and not (tmp_path / "out").exists()


def test_dry_run_and_inspect_print_the_plan():
    res = invoke("convert", "test_vit", "--random-init", "--dry-run", "--include", "all-linear")
    assert res.exit_code == 0, res.output
    assert "blocks.0.mlp.fc1" in res.output and "convert" in res.output
    res = invoke("inspect", "test_vit", "--random-init")
    assert res.exit_code == 0 and "targets (export trace)" in res.output.replace("\n", " ")


def test_schema_is_json():
    res = invoke("schema")
    assert res.exit_code == 0 and "model" in json.loads(res.output)["properties"]


def test_main_treats_a_model_name_as_convert(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["resnt50", "--keep", "0.5"])
    assert exc.value.code == 2


@pytest.mark.parametrize("args,message", [
    (["convert", "resnt50"], "unknown model 'resnt50'"),
    (["convert", "nobody/nothing"], "cannot download 'nobody/nothing'"),
    (["convert", "test_vit", "--random-init", "--keep", "0"], "--keep: Value error, keep must be in (0, 1]"),
    (["convert", "test_vit", "--random-init", "--keep", "1.5"], "--keep: Value error, keep must be in (0, 1]"),
    (["convert", "test_vit", "--random-init", "--include", "mlp.fc9"], "include pattern 'mlp.fc9' matches no"),
    (["convert", "test_vit", *SMALL, "--data", "/no/such/folder"], "data '/no/such/folder' does not exist"),
    (["convert", "test_vit", "--random-init", "--rank", "lots"], "--rank must be an int or a fraction"),
    (["report", "/no/such/run"], "has no report.json"),
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    res = invoke(*args, "--out", str(tmp_path / "o")) if args[0] == "convert" else invoke(*args)
    assert res.exit_code == 2, res.output
    assert message in res.output.replace("\n", " ") or message in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_bad_recipe_keys_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  spec: test_vit\nmidl:\n  kep: 0.5\n")
    res = invoke("convert", str(bad))
    assert res.exit_code == 2 and "line 4: midl.kep: unknown key" in " ".join(res.output.split())
    bad.write_text("model:\n  spec: test_vit\ndistill:\n  steps: lots\n")
    res = invoke("convert", str(bad))
    assert res.exit_code == 2 and "distill.steps: Input should be a valid integer" in " ".join(res.output.split())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["model", "midl", "distill", "targets", "bogus"]),
                       st.one_of(st.integers(), st.text(max_size=5), st.dictionaries(
                           st.sampled_from(["spec", "keep", "rank", "steps", "x"]), st.one_of(st.integers(-3, 3), st.text(max_size=4)),
                           max_size=3)), max_size=4))
def test_malformed_recipes_exit_2_never_traceback(tmp_path, data):
    import yaml

    path = tmp_path / "h.yaml"
    data.setdefault("model", {"spec": "resnt50"})  # a recipe that validates still fails fast: unknown model
    path.write_text(yaml.safe_dump(data))
    res = invoke("convert", str(path), "--dry-run")
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_readme_python_example_runs():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["plan"].converted


@pytest.mark.slow
def test_offline_minilm_recipe_runs_end_to_end(tmp_path):
    recipe = Path(__file__).parents[1] / "recipes" / "minilm_offline.yaml"
    res = invoke("convert", str(recipe), "--steps", "5", "--out", str(tmp_path / "minilm"))
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "minilm" / "report.json").read_text())
    quality = report["quality"]["metrics"]
    assert 0.95 < quality["cosine"] <= 1.0 and "top10_overlap" in quality  # 0.990 after calibration at 1.5x
    assert report["flops"]["converted_ratio"] > 1.4  # the budget's 1.5x, gate and selection counted


def test_version_and_short_help(capsys):
    from midl_convert import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"midl-convert {__version__}"
    assert invoke("-h").exit_code == 0 and "convert" in invoke("-h").output
    text = runner.invoke(app, ["convert", "-h"], env={"COLUMNS": "300"}).output
    for choices in ("token|sequence|pixel|sample", "output|input|prune|auto", "auto|cpu|cuda|mps|cuda:N", "float32|bfloat16|int8", "--quiet",
                    "--json"):
        assert choices in text


@pytest.mark.parametrize("args", [["--granularity", "tokn"], ["--select", "both"], ["--device", "tpu"],
                                  ["--weight-dtype", "fp8"]])
def test_choices_are_checked_at_parse_time(args, tmp_path):
    res = invoke("convert", "test_vit", "--random-init", *args, "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "Traceback" not in res.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_run_in_a_weight_dtype_saves_and_loads_in_it(tmp_path, dtype):
    """The run converts, calibrates and distils in float32, then puts the weights (and the dense
    model the report compares with) in the dtype; the saved model loads back in it."""
    import midl_convert as mc
    from midl_convert.weight_dtype import weight_dtype_of

    res = invoke("convert", "--recipe", str(small_recipe(tmp_path)), "--select", "input", "--weight-dtype", dtype)
    assert res.exit_code == 0, res.output
    model = mc.load(tmp_path / "out")
    assert weight_dtype_of(model) == dtype
    assert json.loads((tmp_path / "out" / "midl_config.json").read_text())["plan"]["weight_dtype"] == dtype


def test_select_and_device_reach_the_recipe():
    from midl_convert.cli import SelectChoice, WeightDtypeChoice, build_recipe

    recipe = build_recipe("test_vit", None, {"select": SelectChoice.input, "device": "cuda:1"}, False)
    assert recipe.midl.select == "input" and recipe.midl_config().select == "input" and recipe.device == "cuda:1"
    assert recipe.midl_config().weight_dtype == "float32"
    recipe = build_recipe("test_vit", None, {"weight_dtype": WeightDtypeChoice.int8}, False)
    assert recipe.midl_config().weight_dtype == "int8"
    res = invoke("convert", "test_vit", "--random-init", "--select", "auto", "--dry-run")  # auto needs a budget
    assert res.exit_code == 2 and "select='auto' chooses each layer's side" in " ".join(res.output.split())
    assert len(res.output.strip().splitlines()) == 1


def test_select_left_out_is_filled_from_the_merged_recipe(tmp_path):
    """A recipe without a budget reads select 'output'; a --flops-ratio merged in makes it 'auto', as before."""
    from midl_convert.cli import build_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model: {spec: test_vit}\nmidl: {keep: 0.7}\n")
    assert build_recipe(None, path, {}, False).midl_config().select == "output"
    recipe = build_recipe(None, path, {"flops_ratio": 1.3}, False)
    assert recipe.midl.select == "auto" and recipe.midl_config().select == "auto"
    assert recipe.model_dump()["midl"]["select"] == "auto"  # what a run saves states the mode


def test_json_everywhere_and_the_run_names_its_folder_and_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MIDL_CACHE_DIR", str(tmp_path / "cache"))
    args = ["convert", "--recipe", str(small_recipe(tmp_path)), "--include", "all-linear", "--flops-ratio", "1.2",
            "--out", "rel-out", "--json"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["out_dir"] == str(tmp_path / "rel-out") and Path(summary["out_dir"]).is_absolute()
    assert {"model.safetensors", "midl_config.json", "report.json"} <= set(summary["files"])
    assert summary["budget_cached"] is False and summary["quality"]
    again = invoke(*args[:-1])  # the same budget again, as tables: measurements come from the cache, and it says so
    assert again.exit_code == 0, again.output
    text = " ".join(again.stdout.split())
    assert f"wrote {tmp_path / 'rel-out'}: " in text and "model.safetensors" in text
    assert "measurements read from the cache" in text
    saved = json.loads((tmp_path / "rel-out" / "report.json").read_text())
    assert json.loads(invoke("report", "rel-out", "--json").stdout) == saved
    plan = json.loads(invoke("inspect", "test_vit", "--random-init", "--json").stdout)
    assert plan["targets"] == len(plan["plan"]["layers"]) and plan["trace"] == "export"


def test_quiet_hides_progress_lines_and_verbose_adds_debug(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDL_CACHE_DIR", str(tmp_path / "cache"))  # measured here, not read from an earlier run's cache
    args = ["convert", "--recipe", str(small_recipe(tmp_path)), "--include", "all-linear", "--no-distill"]
    normal = invoke(*args)
    assert normal.exit_code == 0 and "calibrating" in normal.stderr
    quiet = invoke(*args, "--quiet")
    assert quiet.exit_code == 0 and "calibrating" not in quiet.stderr
    verbose = invoke(*args, "--verbose", "--flops-ratio", "1.2")
    assert verbose.exit_code == 0 and "measured 1/" in verbose.stderr
    assert invoke(*args, "--quiet", "--verbose").exit_code == 2


def test_trust_remote_code_in_a_recipe_needs_the_flag(tmp_path):
    recipe = small_recipe(tmp_path, model={"spec": "test_vit", "random_init": True, "kwargs": {"trust_remote_code": True}})
    res = invoke("convert", str(recipe), "--dry-run")
    assert res.exit_code == 2 and "--trust-remote-code" in " ".join(res.output.split())
    assert invoke("convert", str(recipe), "--dry-run", "--trust-remote-code").exit_code == 0


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: what a refused run must leave exactly as it was."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_run_keeps_its_history_and_the_users_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        res = invoke("convert", str(small_recipe(tmp_path)), "--train", "all")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == dict.fromkeys(
        ["model.safetensors", "midl_config.json", "report.json", "report.md", "report.png"], 0o644)
    history = json.loads((out / "report.json").read_text())["history"]
    d = history["distillation"]
    assert d["steps"] == 2 and d["seconds"] > 0 and d["resumed_from"] is None
    assert set(d["before"]) == set(d["after"]) and "agreement" in d["before"]
    assert history["calibration"]["layers"] >= 1
    assert d["train"] == "midl,lora,bias,norms" and d["trainable_parameters"] > 0
    md = (out / "report.md").read_text()
    assert "## History" in md and "Distillation: 2 steps" in md and "| agreement |" in md
    assert f"trained midl,lora,bias,norms ({d['trainable_parameters']:,} parameters)" in md
    from midl_convert.report import Report

    assert Report.load(out).history == history  # the history section validates against the schema


def test_out_with_the_users_files_is_refused_and_overwrite_keeps_them(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    recipe = small_recipe(tmp_path)
    before = tree(tmp_path)
    res = invoke("convert", str(recipe), "--out", str(mine))
    assert res.exit_code == 2 and "exists and is not an earlier midl-convert run" in res.output
    assert "--overwrite" in " ".join(res.output.split()) and "Traceback" not in res.output
    assert tree(tmp_path) == before
    res = invoke("convert", str(recipe), "--out", str(mine), "--overwrite")
    assert res.exit_code == 0, res.output
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "model.safetensors").is_file()


def test_out_dot_runs_twice(tmp_path, monkeypatch):
    run_dir = tmp_path / "here"
    run_dir.mkdir()
    recipe = small_recipe(tmp_path)
    monkeypatch.chdir(run_dir)
    for _ in range(2):  # the second run replaces the first one's files in place
        res = invoke("convert", str(recipe), "--out", ".", "--steps", "1")
        assert res.exit_code == 0, res.output
    assert {"model.safetensors", "midl_config.json", "report.json"} <= {p.name for p in run_dir.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "r.yaml"]  # no temp folders or checkpoints left


def test_a_second_run_to_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    from midl_convert.saving import output_lock

    recipe = small_recipe(tmp_path)
    before = tree(tmp_path)
    with output_lock(tmp_path / "out"):
        res = invoke("convert", str(recipe))
    assert res.exit_code == 2 and "another midl-convert run is writing" in res.output
    assert tree(tmp_path) == before


def test_device_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    import torch

    from midl_convert import pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    for device, message in [("tpu", "'tpu' is not one of auto, cpu, cuda, mps"),  # refused by the option's parser
                            *([] if torch.cuda.is_available() else [("cuda", "--device 'cuda': no cuda device on this "
                                                                              "machine; use --device auto or cpu")])]:
        res = invoke("convert", "test_vit", *SMALL, "--device", device, "--out", str(tmp_path / "o"))
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output


def test_an_unwritable_out_is_refused_before_the_long_work(tmp_path, monkeypatch):
    from midl_convert import pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    (tmp_path / "file").write_text("x")
    res = invoke("convert", "test_vit", *SMALL, "--out", str(tmp_path / "file" / "o"))
    assert res.exit_code == 2 and "cannot write --out" in " ".join(res.output.split()), res.output
    res = invoke("convert", "test_vit", *SMALL, "--out", str(tmp_path / "file"))
    assert res.exit_code == 2 and "is a file, not a folder" in " ".join(res.output.split()), res.output


def test_bad_files_exit_2_with_one_line(tmp_path):
    binary = tmp_path / "x.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    garbage = tmp_path / "w.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    report_dir = tmp_path / "run"
    report_dir.mkdir()
    (report_dir / "report.json").write_text('{"schema_version": 1, "layers": [')
    cases = [
        (["convert", "test_vit", *SMALL, "--data", str(binary)], "is not UTF-8 text"),
        (["convert", "resnet18", "--weights", str(garbage)], "as safetensors"),
        (["report", str(report_dir)], "report.json' is not valid JSON"),
    ]
    for args, message in cases:
        res = invoke(*args, *(["--out", str(tmp_path / "o")] if args[0] == "convert" else []))
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
        assert "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_checkpoint_every_and_a_recipe_writing_outside_the_current_folder(tmp_path, monkeypatch):
    from midl_convert.cli import build_recipe

    assert build_recipe("test_vit", None, {"checkpoint_every": 7}, False).distill.checkpoint_every == 7
    assert build_recipe("test_vit", None, {"overwrite": True}, False).output.overwrite
    monkeypatch.chdir(tmp_path)
    recipe = small_recipe(tmp_path, output={"dir": "../elsewhere"})
    res = invoke("convert", str(recipe), "--dry-run")
    assert res.exit_code == 0, res.output
    assert f"the recipe's output.dir '../elsewhere' is {tmp_path.parent / 'elsewhere'}, outside the current folder" in \
        " ".join(res.output.split())


@pytest.mark.slow
def test_a_run_killed_at_a_random_step_resumes_to_the_same_tensors(tmp_path):
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MIDL_CACHE_DIR": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "midl_convert.cli", "test_vit", "--random-init", "--steps", "12", "--batch-size", "4",
            "--checkpoint-every", "2"]
    subprocess.run([*args, "--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True, timeout=600)
    out, ckpt = tmp_path / "killed", tmp_path / ".killed.distill" / "distill_checkpoint.pt"
    kill_after = random.Random().choice([2, 4, 6, 8, 10])
    proc = subprocess.Popen([*args, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import torch

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if ckpt.is_file() and torch.load(ckpt, weights_only=True)["step"] >= kill_after:
                break
        except Exception:  # noqa: BLE001 - the file is being replaced: look again
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file() and not out.exists()
    step = torch.load(ckpt, weights_only=True)["step"]
    again = subprocess.run([*args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming distillation at step {step} of 12" in again.stderr
    whole, resumed = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:  # bit for bit
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0, equal_nan=True, msg=key)


def _alias_bomb() -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefghi", "bcdefghij"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nmodel: {spec: test_vit, random_init: true, kwargs: {bomb: *j}}\n"


@pytest.mark.parametrize("recipe,message", [
    ("model: {spec: test_vit, random_init: true, kwargs: {num_classes: ten}}\n", "does not take model.kwargs"),
    ("model: {spec: test_vit, random_init: true, kwargs: {no_such_argument: 1}}\n", "does not take model.kwargs"),
    (b"model: {spec: test_vit}\n# caf\xe9\xff\n", "is not UTF-8 text (byte"),
    (_alias_bomb(), "its aliases expand to more than 100,000 values"),
])
def test_bad_recipes_exit_2_with_one_line_and_nothing_written(recipe, message, tmp_path):
    """Each of these exited 1 with a raw exception (the alias bomb ran out of memory)."""
    path = tmp_path / "r.yaml"
    path.write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode())
    res = invoke("convert", str(path), "--no-distill", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_a_seed_too_large_for_the_generator_is_refused(tmp_path):
    res = invoke("convert", "test_vit", "--random-init", "--no-distill", "--seed", str(2**70), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "--seed: Input should be less than 4294967296" in " ".join(res.output.split()), res.output
    assert not any(tmp_path.iterdir())


def test_a_dangling_link_as_out_is_refused_and_kept(tmp_path):
    (tmp_path / "o").symlink_to(tmp_path / "gone")
    res = invoke("convert", "test_vit", "--random-init", "--no-distill", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "which does not exist; create that folder" in " ".join(res.output.split()), res.output
    assert (tmp_path / "o").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_the_users_checkpoint_named_folder_is_left_alone(tmp_path):
    """A user folder ``.o.distill`` was deleted at the end of every run with checkpoints."""
    mine = tmp_path / ".o.distill"
    mine.mkdir()
    (mine / "mine.txt").write_text("mine")
    res = invoke("convert", "test_vit", *SMALL, "--checkpoint-every", "1", "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in mine.iterdir()) == ["mine.txt"] and (mine / "mine.txt").read_text() == "mine"
    assert "is not a checkpoint folder midl-convert made" in " ".join(res.output.split())


@pytest.mark.slow
def test_a_launched_run_shares_the_budget_and_writes_once(tmp_path):
    """``torchrun --nproc_per_node 2 -m midl_convert.cli ...``: both processes measure, the first writes."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MIDL_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
                          "-m", "midl_convert.cli", "test_vit", "--random-init", "--flops-ratio", "1.2", "--steps", "2",
                          "--batch-size", "4", "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("wrote ") == 1 and (tmp_path / "o" / "model.safetensors").is_file()
    import midl_convert as mc

    assert mc.midl_layers(mc.load(tmp_path / "o"))


def test_off_switches_override_a_recipe_and_default_flags_do_not():
    """--exact-k and --no-decode-speed are choices that beat a recipe's True; --random-init and
    --overwrite left off leave the recipe's value alone."""
    from midl_convert.cli import _overrides

    tree = _overrides({"adaptive": False, "decode_speed": False, "random_init": False, "overwrite": False, "keep": None})
    assert tree == {"midl": {"adaptive": False}, "report": {"decode_speed": False}}


def test_runs_time_decoding_for_large_causal_lms_or_when_asked():
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from midl_convert.pipeline import times_decoding

    small = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with torch.device("meta"):  # 50M+ parameters, no memory
        large = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                             num_attention_heads=8, num_key_value_heads=4))
    encoder = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=64))
    assert not times_decoding(None, small) and times_decoding(True, small) and not times_decoding(False, small)
    assert times_decoding(None, large) and not times_decoding(False, large)
    assert not times_decoding(None, encoder) and not times_decoding(True, encoder)
