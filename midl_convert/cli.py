"""The command line: a thin typer shell over the Python API.

Exit codes: 0 done, 2 bad input (one line naming the problem and the fix), 1 unexpected failure
(a traceback only with --debug).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import MIDLError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Swap a model's Linear and 1x1 conv layers for MID-L layers, distil briefly, report.\n\n"
                       "Example: `midl-convert sentence-transformers/all-MiniLM-L6-v2 --keep 0.5`")
COMMANDS = {"convert", "inspect", "report", "schema"}
console = Console(stderr=True)
out = Console(width=None if Console().is_terminal else 150)  # files and pipes get whole table rows

# CLI option -> recipe key path (the one place the two vocabularies meet)
OPTION_KEYS = {
    "keep": ("midl", "keep"), "rank": ("midl", "rank"), "granularity": ("midl", "granularity"),
    "flops_ratio": ("midl", "flops_ratio"), "adaptive": ("midl", "adaptive"),
    "include": ("targets", "include"), "exclude": ("targets", "exclude"),
    "steps": ("distill", "steps"), "lr": ("distill", "lr"), "data": ("distill", "data"),
    "batch_size": ("distill", "batch_size"),
    "weights": ("model", "weights"), "random_init": ("model", "random_init"),
    "out_dir": ("output", "dir"), "device": ("device",), "seed": ("seed",),
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


def _overrides(options: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in options.items():
        if value is None or value == [] or value is False:
            continue
        if name == "include" and value == ["all-linear"]:
            value = "all-linear"
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
    import yaml

    from .recipe import load_recipe, parse_recipe

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
    cols = ("layer", "kind", "in -> out", "FLOPs share", "keep", "rank", "granularity", *(("damage",) if budget else ()), "decision")
    table = Table(title=title, caption=plan.notes[-1] if budget else None)
    for col in cols:
        table.add_column(col, justify="right" if col in ("FLOPs share", "keep", "rank", "damage") else "left")
    total = sum(lp.flops for lp in plan.layers) or 1
    for lp in plan.layers:
        damage = ("" if lp.predicted_damage is None else f"{lp.predicted_damage:.2e}",) if budget else ()
        table.add_row(lp.path, lp.kind, f"{lp.in_features} -> {lp.out_features}", f"{lp.flops / total:.1%}",
                      "" if lp.keep is None else f"{lp.keep:g}", "" if lp.rank is None else str(lp.rank),
                      lp.granularity or "", *damage, "convert" if lp.convert else f"dense: {lp.reason}")
    return table


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
    rank: Optional[str] = typer.Option(None, help="light-path rank: an int, or a fraction of min(in, out)"),
    granularity: Optional[str] = typer.Option(None, help="token | sequence (Linear), pixel | sample (1x1 conv)"),
    adaptive: Optional[bool] = typer.Option(None, "--adaptive/--exact-k", help="masks whose size follows the input "
                                            "(a calibrated threshold keeps `keep` of the neurons on average)"),
    include: list[str] = typer.Option([], help="pattern of layers to convert (repeatable; 'all-linear')"),
    exclude: list[str] = typer.Option([], help="pattern of layers to leave dense (repeatable)"),
    steps: Optional[int] = typer.Option(None, help="distillation steps"),
    lr: Optional[float] = typer.Option(None, help="learning rate of gates and light paths"),
    batch_size: Optional[int] = typer.Option(None, help="distillation batch size"),
    data: Optional[str] = typer.Option(None, help="builtin:text | builtin:images | builtin:digits | folder | file"),
    weights: Optional[str] = typer.Option(None, help="local weights for a timm architecture, or a .gguf file (architecture and tokenizer included)"),
    random_init: bool = typer.Option(False, "--random-init", help="random weights (nothing downloaded)"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="output folder (default midl-out)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    seed: Optional[int] = typer.Option(None),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and stop"),
    no_distill: bool = typer.Option(False, "--no-distill", help="calibrate only"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    options = {"keep": keep, "flops_ratio": flops_ratio, "rank": rank, "granularity": granularity, "adaptive": adaptive, "include": include, "exclude": exclude,
               "steps": steps, "lr": lr, "batch_size": batch_size, "data": data, "weights": weights,
               "random_init": random_init, "out_dir": out_dir, "device": device, "seed": seed}

    def go() -> None:
        from .pipeline import run

        options["rank"] = _number(rank)
        result = run(build_recipe(target, recipe, options, no_distill), dry_run=dry_run, console=console)
        if dry_run:
            out.print(plan_table(result.plan, f"plan ({result.plan.method} trace): {len(result.plan.converted)} "
                                              f"of {len(result.plan.layers)} layers converted"))
            return
        if result.distilled is not None:
            from .distill import summary

            console.print(f"distilled: {summary(result.distilled)}")
        if result.report is not None:
            result.report.print(out)
        out.print(f"wrote {result.out_dir}")

    _guard(go, debug)


@app.command(help="List the layers that would be converted, with sizes and FLOPs share.\n\n"
                  "Example: `midl-convert inspect resnet50 --random-init`")
def inspect(
    model: str = typer.Argument(..., help="timm name, Hugging Face id or folder"),
    random_init: bool = typer.Option(False, "--random-init"),
    weights: Optional[str] = typer.Option(None),
    include: list[str] = typer.Option([]),
    exclude: list[str] = typer.Option([]),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    def go() -> None:
        from .config import MIDLConfig
        from .models import load_model
        from .surgery import plan_conversion

        loaded = load_model(model, weights=weights, random_init=random_init)
        cfg = MIDLConfig(include=("all-linear" if include == ["all-linear"] else include) or None, exclude=exclude)
        plan, table = plan_conversion(loaded.model, cfg, loaded.example_inputs)
        out.print(plan_table(plan, f"{model}: {len(table.targets)} targets ({table.method} trace), "
                                   f"{table.total_flops / 1e9:.3f} GFLOPs in targets"))

    _guard(go, debug)


@app.command(help="Print a saved report again.\n\nExample: `midl-convert report midl-out`")
def report(directory: Path = typer.Argument(..., help="a folder written by midl-convert"),
           debug: bool = typer.Option(False, "--debug")) -> None:
    def go() -> None:
        from .report import Report

        if not (directory / "report.json").is_file():
            raise MIDLError(f"{str(directory)!r} has no report.json; pass the --out folder of a finished run")
        Report.load(directory).print(out)

    _guard(go, debug)


@app.command(help="Print the recipe's JSON Schema.\n\nExample: `midl-convert schema > recipe.schema.json`")
def schema() -> None:
    from .recipe import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``midl-convert MODEL ...`` is ``midl-convert convert MODEL ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in COMMANDS and args[0] not in ("--help", "-h"):
        args.insert(0, "convert")
    app(args=args, prog_name="midl-convert")


if __name__ == "__main__":
    main()
