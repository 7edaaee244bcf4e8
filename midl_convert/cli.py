"""The command line: a thin typer shell over the Python API.

Exit codes: 0 done, 2 bad input (one line naming the problem and the fix), 1 unexpected failure
(a traceback only with --debug).
"""
from __future__ import annotations

import json
import logging
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional, get_args

import typer
import yaml
from rich.console import Console
from rich.table import Table

from . import __version__
from .config import Centring, Granularity, MIDLConfig, WeightDtype, select_choices
from .conversion import plan_conversion
from .distill import summary
from .errors import MIDLError
from .files import cache_dir
from .log import setup
from .models import load_model
from .pipeline import run
from .recipe import load_recipe, parse_recipe, recipe_schema
from .report import Report

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Swap a model's Linear and 1x1 conv layers for MID-L layers, distil briefly, report.\n\n"
                       "Example: `midl-convert sentence-transformers/all-MiniLM-L6-v2 --keep 0.5`")
COMMANDS = {"convert", "inspect", "report", "schema"}
TOP_LEVEL = {"-h", "--help", "--version"}  # options of the program itself, not of `convert`
console = Console(stderr=True)
out = Console(width=None if Console().is_terminal else 150)  # files and pipes get whole table rows


# ----- choices: enums so --help lists them, built from the config's own vocabulary ---------------
GranularityChoice = Enum("GranularityChoice", {v: v for v in get_args(Granularity)}, type=str)
SelectChoice = Enum("SelectChoice", {v: v for v in select_choices()}, type=str)
WeightDtypeChoice = Enum("WeightDtypeChoice", {v: v for v in get_args(WeightDtype)}, type=str)
CentringChoice = Enum("CentringChoice", {v: v for v in get_args(Centring)}, type=str)
DEVICES = ("auto", "cpu", "cuda", "mps")


def _device(value: str | None) -> str | None:
    """auto | cpu | cuda | mps, and cuda:N for one GPU of several."""
    if value is None or value in DEVICES or re.fullmatch(r"cuda:\d+", value):
        return value
    raise typer.BadParameter(f"{value!r} is not one of {', '.join(DEVICES)}, cuda:N")


# ----- options every command shares -------------------------------------------------------------
def _version(value: bool) -> None:
    if value:
        print(f"midl-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _program(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="print the version and exit")) -> None:
    """The program's own options; the app's help text stays the one shown."""


QUIET = typer.Option(False, "--quiet", "-q", help="only warnings and errors; no progress bars")
VERBOSE = typer.Option(False, "--verbose", "-v", help="also debug lines (each layer the budget measures, ...)")
JSON = typer.Option(False, "--json", help="print one JSON object on stdout instead of tables (for scripts)")
DEBUG = typer.Option(False, "--debug", help="show tracebacks")
TRUST = typer.Option(False, "--trust-remote-code", help="let a Hugging Face repository run its own code (as in transformers)")


def _logging(quiet: bool, verbose: bool) -> None:
    """The library logs through ``logging``; show it through rich's handler at the asked level."""
    if quiet and verbose:
        raise MIDLError("--quiet and --verbose contradict each other; pass one")
    setup(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# CLI option -> recipe key path (the one place the two vocabularies meet)
OPTION_KEYS = {
    "keep": ("midl", "keep"), "rank": ("midl", "rank"), "granularity": ("midl", "granularity"), "select": ("midl", "select"),
    "centre": ("midl", "centre"),
    "flops_ratio": ("midl", "flops_ratio"), "speedup": ("midl", "speedup"), "adaptive": ("midl", "adaptive"),
    "weight_dtype": ("midl", "weight_dtype"),
    "include": ("targets", "include"), "exclude": ("targets", "exclude"),
    "steps": ("distill", "steps"), "lr": ("distill", "lr"), "data": ("distill", "data"),
    "batch_size": ("distill", "batch_size"), "train": ("distill", "train"),
    "weights": ("model", "weights"), "random_init": ("model", "random_init"),
    "out_dir": ("output", "dir"), "device": ("device",), "seed": ("seed",),
    "overwrite": ("output", "overwrite"), "checkpoint_every": ("distill", "checkpoint_every"),
    "decode_speed": ("report", "decode_speed"),
}


def _number(text: str | None) -> int | float | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise MIDLError(f"--rank must be an int or a fraction of min(in, out), got {text!r}") from None


# Flags whose False is their default, not a choice: left out, a recipe's value stands. (--exact-k and
# --no-decode-speed are choices: they override a recipe's True.)
OFF_BY_DEFAULT = {"random_init", "overwrite"}


def _overrides(options: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in options.items():
        if value is None or value == [] or (value is False and name in OFF_BY_DEFAULT):
            continue
        if name == "include" and value == ["all-linear"]:
            value = "all-linear"
        if isinstance(value, Enum):
            value = value.value
        *parents, leaf = OPTION_KEYS[name]
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def build_recipe(target: str | None, recipe_file: Path | None, options: dict[str, Any], no_distill: bool):
    """A validated Recipe from a model spec or recipe file plus command-line overrides."""
    if target is not None and target.endswith((".yaml", ".yml")):
        recipe_file, target = Path(target), None
    data: dict[str, Any] = load_recipe(recipe_file).model_dump(exclude_unset=True) if recipe_file else {}
    if target is not None:
        data.setdefault("model", {})["spec"] = target
    if "model" not in data:
        raise MIDLError("name a model (timm name, HF id or folder) or a recipe: midl-convert resnet50 --keep 0.5")
    data = _merge(data, _overrides(options))
    if no_distill:
        data.setdefault("distill", {})["enabled"] = False
    flags = {".".join(v): f"--{k.replace('_', '-')}" for k, v in OPTION_KEYS.items()}
    try:
        return parse_recipe(yaml.safe_dump(data, sort_keys=False), "command line")
    except MIDLError as exc:
        msg = str(exc).removeprefix("command line, line ").split(": ", 1)[-1]
        for key, flag in flags.items():
            if msg.startswith(key + ":"):
                raise MIDLError(f"{flag}: {msg.split(': ', 1)[1]}") from None
        raise MIDLError(msg if recipe_file is None else f"{recipe_file}: {msg}") from None


def plan_table(plan, title: str = "plan") -> Table:
    budget = plan.budget is not None
    cols = ("layer", "module type", "in -> out", "FLOPs share", "keep", "rank", "granularity", *(("damage",) if budget else ()), "decision")
    table = Table(title=title, caption=plan.notes[-1] if budget else None)
    for col in cols:
        table.add_column(col, justify="right" if col in ("FLOPs share", "keep", "rank", "damage") else "left")
    total = sum(lp.flops for lp in plan.layers) or 1
    for lp in plan.layers:
        damage = ("" if lp.predicted_damage is None else f"{lp.predicted_damage:.2e}",) if budget else ()
        table.add_row(lp.path, lp.module_type, f"{lp.in_features} -> {lp.out_features}", f"{lp.flops / total:.1%}",
                      "" if lp.keep is None else f"{lp.keep:g}", "" if lp.rank is None else str(lp.rank),
                      lp.granularity or "", *damage, "convert" if lp.convert else f"dense: {lp.reason}")
    return table


def _say_where(out_dir: str) -> None:
    """One line when a recipe's output.dir leads outside the current folder (``../..``, an absolute path)."""
    where = Path(out_dir).resolve()
    if not where.is_relative_to(Path.cwd().resolve()):
        console.print(f"[yellow]note:[/] the recipe's output.dir {out_dir!r} is {where}, outside the current folder; "
                      f"pass --out to write elsewhere", highlight=False, soft_wrap=True)


def _guard(fn, debug: bool) -> None:
    try:
        fn()
    except MIDLError as exc:
        console.print(f"[red]error:[/] {str(exc).splitlines()[0]}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        console.print(f"[red]unexpected failure:[/] {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                      f"(rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@app.command(help="Convert, calibrate, distil, report and save.\n\n"
                  "Examples: `midl-convert resnet50 --keep 0.5 --random-init`, "
                  "`midl-convert recipes/minilm_offline.yaml --steps 50`")
def convert(
    target: Optional[str] = typer.Argument(None, help="timm name, Hugging Face id or folder, or a recipe .yaml"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="recipe file; other options override it"),
    keep: Optional[float] = typer.Option(None, help="share of neurons on the exact path, in (0, 1]"),
    flops_ratio: Optional[float] = typer.Option(None, "--flops-ratio", help="whole-model FLOPs target, e.g. 1.3: "
                                                "each layer's keep and rank (or dense) chosen from measured damage"),
    speedup: Optional[float] = typer.Option(None, "--speedup", help="whole-model speed-up target measured on this machine, "
                                            "e.g. 1.3: the layer budget spends measured seconds (batch-1 decode for a causal "
                                            "LM) instead of FLOPs; an alternative to --flops-ratio"),
    rank: Optional[str] = typer.Option(None, help="light-path rank: an int, or a fraction of min(in, out)"),
    granularity: Optional[GranularityChoice] = typer.Option(None, help="token | sequence (Linear), pixel | sample (1x1 conv)"),
    select: Optional[SelectChoice] = typer.Option(None, help="which neurons a mask picks: output (MID-L), input "
                                                  "(columns), prune (one fixed set of columns), auto (the budget measures "
                                                  "output and input; needs --flops-ratio)"),
    centre: Optional[CentringChoice] = typer.Option(None, help="input side: centre each input on its calibration mean, "
                                                    "median, auto (per layer: no centre, mean or median, by output error on rows "
                                                    "not fitted on) or none"),
    adaptive: Optional[bool] = typer.Option(None, "--adaptive/--exact-k", help="masks whose size follows the input "
                                            "(a calibrated threshold keeps `keep` of the neurons on average)"),
    weight_dtype: Optional[WeightDtypeChoice] = typer.Option(None, "--weight-dtype", help="the weights' dtype after "
                                                             "conversion: float32, bfloat16 (the whole model) or int8 "
                                                             "(weight-only, a scale per output channel)"),
    include: list[str] = typer.Option([], help="pattern of layers to convert (repeatable; 'all-linear')"),
    exclude: list[str] = typer.Option([], help="pattern of layers to leave dense (repeatable)"),
    steps: Optional[int] = typer.Option(None, help="distillation steps"),
    lr: Optional[float] = typer.Option(None, help="learning rate of gates and light paths"),
    batch_size: Optional[int] = typer.Option(None, help="distillation batch size"),
    train: Optional[str] = typer.Option(None, help="what distillation trains: gates, midl (gates and light paths), lora "
                                        "(a low-rank delta merged into W), bias, norms, all (those four, the default), full "
                                        "(every weight), or a comma list such as midl,lora"),
    data: Optional[str] = typer.Option(None, help="builtin:text | builtin:mixed (help text, docstrings, package descriptions; the default for text encoders, builtin:text for causal LMs) | builtin:teacher (a causal LM's own samples) | builtin:images | builtin:digits | folder | file"),
    weights: Optional[str] = typer.Option(None, help="local weights for a timm architecture, or a .gguf file (architecture and tokenizer included)"),
    random_init: bool = typer.Option(False, "--random-init", help="random weights (nothing downloaded)"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="output folder (default midl-out); an existing folder "
                                          "must be an earlier run's, or empty"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into an existing folder that is not an earlier run "
                                   "(files of the same names are replaced, others kept)"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="distillation steps between "
                                                   "resumable checkpoints (default 50; 0 = none)"),
    device: Optional[str] = typer.Option(None, parser=_device, metavar="[auto|cpu|cuda|mps|cuda:N]",
                                         help="where to distil and measure"),
    seed: Optional[int] = typer.Option(None),
    decode_speed: Optional[bool] = typer.Option(None, "--decode-speed/--no-decode-speed", help="time batch-1 greedy "
                                                "decoding, dense against converted, at the end (causal LMs on the CPU; "
                                                "default: from 50M parameters, and under --speedup)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and stop"),
    no_distill: bool = typer.Option(False, "--no-distill", help="calibrate only"),
    trust_remote_code: bool = TRUST,
    as_json: bool = JSON,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
    debug: bool = DEBUG,
) -> None:
    options = {"keep": keep, "flops_ratio": flops_ratio, "speedup": speedup, "rank": rank, "granularity": granularity,
               "select": select, "centre": centre, "adaptive": adaptive, "weight_dtype": weight_dtype, "include": include,
               "exclude": exclude, "steps": steps, "lr": lr, "batch_size": batch_size, "train": train, "data": data,
               "weights": weights,
               "random_init": random_init, "out_dir": out_dir, "device": device, "seed": seed, "overwrite": overwrite,
               "checkpoint_every": checkpoint_every, "decode_speed": decode_speed}

    def go() -> None:
        _logging(quiet, verbose)
        options["rank"] = _number(rank)
        parsed = build_recipe(target, recipe, options, no_distill)
        if out_dir is None and (recipe is not None or (target or "").endswith((".yaml", ".yml"))):
            _say_where(parsed.output.dir)
        result = run(parsed, dry_run=dry_run, progress=not quiet, trust_remote_code=trust_remote_code)
        if dry_run:
            title = (f"plan ({result.plan.trace} trace): {len(result.plan.converted)} "
                     f"of {len(result.plan.layers)} layers converted")
            _print_json(result.plan.to_dict()) if as_json else out.print(plan_table(result.plan, title))
            return
        if result.out_dir is None:  # another process of a launched run: the first one reports and writes
            return
        summary = run_summary(result)
        if as_json:
            _print_json(summary)
            return
        if summary["distilled"] is not None:
            out.print(f"distilled: {summary['distilled']}")
        if result.report is not None:
            result.report.print(out)
        if summary["budget_cached"]:
            out.print(f"layer budget: measurements read from the cache in {summary['budget_cache']}")
        out.print(f"wrote {summary['out_dir']}: {', '.join(summary['files'])}", highlight=False, soft_wrap=True)

    _guard(go, debug)


def run_summary(result: Any) -> dict[str, Any]:
    """What a finished run did, as JSON-able data: the folder (absolute), its files, the headline numbers."""
    folder = Path(result.out_dir).resolve()
    budget = result.plan.budget or {}
    report = result.report.to_dict() if result.report is not None else None
    return {
        "out_dir": str(folder),
        "files": sorted(p.name for p in folder.iterdir()),
        "converted_layers": len(result.plan.converted), "layers": len(result.plan.layers), "trace": result.plan.trace,
        "budget": budget or None, "budget_cached": bool(budget.get("cached")),
        "budget_cache": str(cache_dir()) if budget.get("cached") else None,
        "distilled": summary(result.distilled) if result.distilled is not None else None,
        "flops_ratio": (report["flops"].get("heldout") or report["flops"])["ratio"] if report else None,  # held-out data
        "flops_ratio_example": report["flops"]["ratio"] if report else None,
        "quality": {report["quality"]["headline"]: report["quality"]["value"]} if report else None,
    }


@app.command(help="List the layers that would be converted, with sizes and FLOPs share.\n\n"
                  "Example: `midl-convert inspect resnet50 --random-init`")
def inspect(
    model: str = typer.Argument(..., help="timm name, Hugging Face id or folder"),
    random_init: bool = typer.Option(False, "--random-init"),
    weights: Optional[str] = typer.Option(None),
    include: list[str] = typer.Option([]),
    exclude: list[str] = typer.Option([]),
    trust_remote_code: bool = TRUST,
    as_json: bool = JSON,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
    debug: bool = DEBUG,
) -> None:
    def go() -> None:
        _logging(quiet, verbose)
        loaded = load_model(model, weights=weights, random_init=random_init, trust_remote_code=trust_remote_code)
        cfg = MIDLConfig(include=("all-linear" if include == ["all-linear"] else include) or None, exclude=exclude)
        plan, table = plan_conversion(loaded.model, cfg, loaded.example_inputs)
        if as_json:
            _print_json({"model": model, "trace": table.trace, "targets": len(table.targets),
                         "target_flops": table.total_flops, "plan": plan.to_dict()})
            return
        out.print(plan_table(plan, f"{model}: {len(table.targets)} targets ({table.trace} trace), "
                                   f"{table.total_flops / 1e9:.3f} GFLOPs in targets"))

    _guard(go, debug)


@app.command(help="Print a saved report again.\n\nExample: `midl-convert report midl-out`")
def report(directory: Path = typer.Argument(..., help="a folder written by midl-convert"),
           as_json: bool = JSON,
           debug: bool = DEBUG) -> None:
    def go() -> None:
        if not (directory / "report.json").is_file():
            raise MIDLError(f"{str(directory)!r} has no report.json; pass the --out folder of a finished run")
        saved = Report.load(directory)
        _print_json(saved.to_dict()) if as_json else saved.print(out)

    _guard(go, debug)


@app.command(help="Print the recipe's JSON Schema.\n\nExample: `midl-convert schema > recipe.schema.json`")
def schema() -> None:
    print(json.dumps(recipe_schema(), indent=2))


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``midl-convert MODEL ...`` is ``midl-convert convert MODEL ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in COMMANDS and args[0] not in TOP_LEVEL:
        args.insert(0, "convert")
    app(args=args, prog_name="midl-convert")


if __name__ == "__main__":
    main()
