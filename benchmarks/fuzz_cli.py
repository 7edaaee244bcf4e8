"""Bad inputs and traps on purpose, as a careful new user would try them: does the command line refuse
each with one line and exit 2, and leave the folder and its parent as they were?

Each case builds a scene in a fresh folder (the user's files, a recipe, a data file, a saved run),
runs ``midl-convert`` there in a subprocess, and hashes every file of the folder and its parent
before and after. Two kinds of case:

- ``refuse``: must exit 2 with one ``error:`` line on stderr and change nothing at all;
- ``keep``: the run may succeed, but every file the user had must be there, byte for byte
  (an earlier run's file list that names files outside the folder, a user's hidden folder of
  the tool's naming shape, ...), but for the planted earlier run's ``midl_config.json``.

    python benchmarks/fuzz_cli.py              # every case (about 4 minutes on 2 cores)
    python benchmarks/fuzz_cli.py --only seed  # cases whose name contains "seed"
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

# A small run (random weights, one calibration batch, no report), so each case takes seconds, not minutes.
BASE = ("model: {spec: test_vit, random_init: true}\nmidl: {keep: 0.5}\n"
        "distill: {calibration_batches: 1, batch_size: 4}\nreport: {enabled: false}\n")
VIT = ["base.yaml"]
TEXT = ["sentence-transformers/all-MiniLM-L6-v2", "--keep", "0.5", "--include", "encoder.layer.0.*"]
Scene = Callable[[Path], tuple[list[str], str]]  # builds the scene in a folder; returns (arguments, kind)
CASES: dict[str, Scene] = {}


def case(fn: Scene) -> Scene:
    CASES[fn.__name__] = fn
    return fn


def _earlier_run(root: Path, files: list[str]) -> None:
    """An ``out`` folder whose ``midl_config.json`` lists ``files``, as a downloaded folder could."""
    (root / "out").mkdir()
    (root / "out" / "midl_config.json").write_text(json.dumps({"format_version": 1, "files": files,
                                                               "written": {f: {"size": 6, "mtime_ns": 0} for f in files}}))


# ----- data loss: the run may go on, the user's files must stay ----------------------------------
@case
def list_reaches_parent(root):
    (root / "victim.txt").write_text("victim")
    (root / "victimdir").mkdir()
    (root / "victimdir" / "a.txt").write_text("a")
    _earlier_run(root, ["../victim.txt", "../victimdir", "midl_config.json"])
    return [*VIT, "--no-distill", "--out", "out"], "keep"


@case
def list_absolute_path(root):
    (root / "victim.txt").write_text("victim")
    _earlier_run(root, [str(root / "victim.txt"), "midl_config.json"])
    return [*VIT, "--no-distill", "--out", "out", "--overwrite"], "keep"


@case
def list_names_users_file(root):
    _earlier_run(root, ["thesis.txt", "midl_config.json"])
    (root / "out" / "thesis.txt").write_text("years of work")
    return [*VIT, "--no-distill", "--out", "out"], "keep"


@case
def users_distill_folder(root):
    (root / ".out.distill").mkdir()
    (root / ".out.distill" / "mine.txt").write_text("mine")
    return [*VIT, "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1", "--out", "out"], "keep"


@case
def users_tmp_file(root):
    (root / ".out.tmp-999999").write_text("mine")
    return [*VIT, "--no-distill", "--out", "out"], "keep"


@case
def users_tmp_folder(root):
    (root / ".out.tmp-999999").mkdir()
    (root / ".out.tmp-999999" / "mine.txt").write_text("mine")
    return [*VIT, "--no-distill", "--out", "out"], "keep"


@case
def overwrite_folder_named_like_weights(root):
    (root / "user" / "model.safetensors").mkdir(parents=True)
    (root / "user" / "model.safetensors" / "shard").write_text("shard")
    (root / "user" / "midl_config.json").write_text("the user's own")
    return [*VIT, "--no-distill", "--out", "user", "--overwrite"], "refuse"


# ----- one clear line and exit 2 -----------------------------------------------------------------
def _recipe(root: Path, text: str | bytes) -> list[str]:
    path = root / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return [str(path), "--no-distill", "--out", "out"]


@case
def recipe_kwargs_wrong_type(root):
    return _recipe(root, "model: {spec: test_vit, random_init: true, kwargs: {num_classes: ten}}\n"), "refuse"


@case
def recipe_kwargs_unknown(root):
    return _recipe(root, "model: {spec: test_vit, random_init: true, kwargs: {no_such_argument: 1}}\n"), "refuse"


@case
def recipe_not_utf8(root):
    return _recipe(root, b"model: {spec: test_vit}\n# caf\xe9\xff\n"), "refuse"


@case
def recipe_alias_bomb(root):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghij"):
        prev = "abcdefghij"[i]
        lines.append(f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    lines.append("model: {spec: test_vit, random_init: true, kwargs: {bomb: *j}}")
    return _recipe(root, "\n".join(lines) + "\n"), "refuse"


@case
def seed_too_large(root):
    return [*VIT, "--no-distill", "--out", "out", "--seed", str(2**70)], "refuse"


@case
def image_folder_with_a_non_image(root):
    (root / "imgs" / "cat").mkdir(parents=True)
    for name in "abcdef":  # enough files for a training and a held-out part
        (root / "imgs" / "cat" / f"{name}.jpg").write_text("not a jpeg")
    return [*VIT, "--no-distill", "--out", "out", "--data", "imgs"], "refuse"


@case
def csv_empty(root):
    (root / "d.csv").write_text("")
    return [*TEXT, "--no-distill", "--out", "out", "--data", "d.csv"], "refuse"


@case
def csv_header_only(root):
    (root / "d.csv").write_text("text,label\n")
    return [*TEXT, "--no-distill", "--out", "out", "--data", "d.csv"], "refuse"


@case
def json_garbage(root):
    (root / "d.json").write_text("{not json at all")
    return [*TEXT, "--no-distill", "--out", "out", "--data", "d.json"], "refuse"


@case
def parquet_garbage(root):
    (root / "d.parquet").write_bytes(os.urandom(200))
    return [*TEXT, "--no-distill", "--out", "out", "--data", "d.parquet"], "refuse"


@case
def csv_string_labels(root):
    (root / "d.csv").write_text("text,label\n" + "".join(f"sentence number {i} here,cat\n" for i in range(20)))
    return [*TEXT, "--no-distill", "--out", "out", "--data", "d.csv"], "refuse"


@case
def datasets_folder_not_a_dataset(root):
    (root / "ds").mkdir()
    (root / "ds" / "dataset_info.json").write_text("{}")
    return [*TEXT, "--no-distill", "--out", "out", "--data", "ds"], "refuse"


@case
def images_for_a_text_model(root):
    return [*TEXT, "--no-distill", "--out", "out", "--data", "builtin:images"], "refuse"


@case
def saved_folder_without_weights(root):
    from transformers import BertConfig

    BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(root / "bert")
    return ["bert", "--keep", "0.5", "--no-distill", "--out", "out"], "refuse"


@case
def report_with_wrong_types(root):
    (root / "run").mkdir()
    (root / "run" / "report.json").write_text(json.dumps({
        "schema_version": 1, "settings": {"versions": {}, "device": "cpu"}, "flops": "many", "parameters": {},
        "quality": {}, "latency": {}, "memory": {}, "layers": 5, "skipped": [], "notes": [], "history": {}}))
    return ["report", "run"], "refuse"


@case
def out_is_a_dangling_link(root):
    (root / "out").symlink_to(root / "nowhere")
    return [*VIT, "--no-distill", "--out", "out"], "refuse"


# ----- running them ------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (links as their target, folders as a mark, files by hash)."""
    seen = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            seen[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            seen[key] = "dir"
        else:
            seen[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def run_case(scene: Scene, cache: Path) -> tuple[bool, str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        parent = Path(tmp)
        root = parent / "work"
        root.mkdir()
        (root / "base.yaml").write_text(BASE)
        args, kind = scene(root)
        before = snapshot(parent)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MIDL_CACHE_DIR": str(cache)}
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "midl_convert.cli", *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=900)
        after = snapshot(parent)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        if kind == "refuse":
            ok = proc.returncode == 2 and len(errors) == 1 and after == before
            why = f"exit {proc.returncode}, {len(errors)} error line(s), folder {'same' if after == before else 'changed'}"
        else:
            # an earlier run's midl_config.json (planted by the scene) is the one file a run replaces
            lost = [k for k, v in before.items() if after.get(k) != v and not k.endswith("out/midl_config.json")]
            ok = proc.returncode in (0, 2) and not lost
            why = f"exit {proc.returncode}, user's files {'kept' if not lost else 'lost: ' + ', '.join(lost)}"
        last = (errors or lines or [""])[-1][:150]
        return ok, kind, f"{why}; {time.perf_counter() - t:.0f}s; {last}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args()
    cases = {k: v for k, v in CASES.items() if args.only in k}
    passed = 0
    with tempfile.TemporaryDirectory() as cache:
        print("| case | kind | result | what happened |\n|---|---|---|---|")
        for name, scene in cases.items():
            ok, kind, detail = run_case(scene, Path(cache))
            passed += ok
            print(f"| {name} | {kind} | {'ok' if ok else 'FAIL'} | {detail.replace('|', '/')} |", flush=True)
    print(f"\n{passed} of {len(cases)} cases: refused with one line and exit 2, or ran, leaving the user's files as they were")


if __name__ == "__main__":
    main()
