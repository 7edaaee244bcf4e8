"""The whole job, top to bottom: spec -> model -> plan -> converted -> calibrated -> distilled -> report -> saved.

The CLI is a thin shell over ``run``; every step is also a public function of its own.
"""
from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from .calibrate import LayerCalibration, calibrate, cap_thresholds
from .config import MIDLConfig
from .data import CALIBRATION_OFFSET, Batch, default_data, load_data
from .distill import DistillConfig, DistillResult, distill
from .graph import TargetTable
from .models import LoadedModel, load_model
from .quality import OUTPUT_KIND
from .recipe import Recipe
from .errors import MIDLError
from .saving import check_output, output_lock, save
from .surgery import Plan, apply_plan, plan_conversion



@dataclass
class RunResult:
    loaded: LoadedModel
    plan: Plan
    table: TargetTable
    student: nn.Module | None = None
    teacher: nn.Module | None = None
    calibration: list[LayerCalibration] | None = None
    distilled: DistillResult | None = None
    report: Any = None
    out_dir: Path | None = None


def history(result: RunResult) -> dict[str, Any]:
    """What happened before the final measurement: calibration and distillation, for the report."""
    out: dict[str, Any] = {}
    if result.calibration:
        out["calibration"] = {"layers": len(result.calibration),
                              "error_before": sum(c.error_before for c in result.calibration) / len(result.calibration),
                              "error_after": sum(c.error_after for c in result.calibration) / len(result.calibration)}
    d = result.distilled
    if d is not None:
        out["distillation"] = {"steps": d.steps, "seconds": d.seconds, "resumed_from": d.resumed_from,
                               "before": d.before, "after": d.after,
                               "loss_first": d.losses[0] if d.losses else None, "loss_last": d.losses[-1] if d.losses else None}
    return out


def budget_data(data: Any, config: MIDLConfig) -> list[Batch]:
    """The batches a run's layer budget measures on (first ``budget_batches``) and fits on (the rest),
    from the part of the data stream training never draws."""
    count = config.budget_batches + config.budget_fit_batches
    return [data.train_batch(CALIBRATION_OFFSET + i, config.budget_batch_size) for i in range(count)]


def resolve_device(name: str) -> torch.device:
    """The device a run uses; a ``MIDLError`` naming ``--device`` when there is no such device here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MIDLError(f"--device {name!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(device.type)
    if not available:
        raise MIDLError(f"--device {name!r}: no {device.type} device on this machine; use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MIDLError(f"--device {name!r}: this machine has {torch.cuda.device_count()} cuda device(s); use cuda:0 or auto")
    return device


def run(recipe: Recipe, dry_run: bool = False, console: Console | None = None) -> RunResult:
    """Run a recipe; with ``dry_run`` stop after the plan (the model is untouched).

    Before anything long: the device must exist and the output folder must be writable and not
    hold the user's own files (``output.overwrite``); the run then holds a lock on that folder.
    """
    console = console or Console(stderr=True)
    device = resolve_device(recipe.device)
    if dry_run:
        return _run(recipe, True, console, device)
    check_output(recipe.output.dir, recipe.output.overwrite)
    with output_lock(recipe.output.dir):
        return _run(recipe, False, console, device)


def _run(recipe: Recipe, dry_run: bool, console: Console, device: torch.device) -> RunResult:
    torch.manual_seed(recipe.seed)
    m = recipe.model
    loaded = load_model(m.spec, weights=m.weights, random_init=m.random_init, **m.kwargs)
    for note in loaded.notes:
        console.print(f"[dim]{note}[/]")
    config = recipe.midl_config()
    spec = recipe.distill.data or default_data(loaded)
    dcfg = DistillConfig(**recipe.distill.model_dump(exclude={"data", "enabled"}))
    bs = dcfg.batch_size
    data = load_data(spec, loaded, seed=recipe.seed) if config.flops_ratio is not None or not dry_run else None
    budget_batches = None
    if config.flops_ratio is not None:
        console.print(f"layer budget: fitting each option on {config.budget_fit_batches} batch(es) and measuring its damage "
                      f"on {config.budget_batches} other batch(es) of {config.budget_batch_size} from {spec} for a "
                      f"{config.flops_ratio:g}x FLOPs target")
        budget_batches = budget_data(data, config)
    plan, table = plan_conversion(loaded.model, config, loaded.example_inputs, budget_batches, OUTPUT_KIND[loaded.task],
                                  progress=lambda line: console.print(f"[dim]{line}[/]"))
    result = RunResult(loaded, plan, table)
    if dry_run:
        return result
    teacher = copy.deepcopy(loaded.model).eval()
    student = apply_plan(loaded.model, plan).eval()
    result.student, result.teacher = student, teacher
    if dcfg.calibration_batches:
        console.print(f"calibrating {len(plan.converted)} layers on {dcfg.calibration_batches} batches of {spec}")
        result.calibration = calibrate(student, [data.train_batch(CALIBRATION_OFFSET + i, bs) for i in range(dcfg.calibration_batches)])
    eval_data = load_data(recipe.report.data, loaded, seed=recipe.seed) if recipe.report.data else data
    eval_batches = eval_data.heldout_batches(recipe.report.batch_size, limit=recipe.report.eval_samples)
    out = Path(os.path.abspath(recipe.output.dir))  # `--out .` has a name and a parent
    ckpt_dir = out.parent / f".{out.name}.distill"
    if recipe.distill.enabled and dcfg.steps > 0:
        if device.type != "cpu":
            student.to(device)
            teacher.to(device)
        result.distilled = distill(student, teacher, data, loaded.task, dcfg, checkpoint_dir=ckpt_dir, eval_batches=eval_batches,
                                   device=device.type if recipe.device != "auto" else None)
    student.to(device).eval()
    teacher.to(device).eval()
    if config.flops_ratio is not None:
        raised = cap_thresholds(student, Batch(loaded.example_inputs).to(device).inputs)
        if raised:
            console.print(f"[dim]adaptive thresholds raised on {len(raised)} layers so the example input meets the "
                          f"{config.flops_ratio:g}x target (at most k exact neurons per mask there)[/]")
    if recipe.report.enabled:
        from .report import build_report

        settings = {"model": m.model_dump(), "recipe": recipe.model_dump(), "data": spec, "seed": recipe.seed,
                    "device": str(device), "notes": loaded.notes}
        result.report = build_report(student, teacher, [b.to(device) for b in eval_batches], loaded.task, plan=plan,
                                     settings=settings, latency_batch_sizes=tuple(recipe.report.latency_batch_sizes),
                                     example_inputs=Batch(loaded.example_inputs).to(device).inputs)
        result.report.history = history(result)
    result.out_dir = save(student, out, build=loaded.build, recipe=recipe.model_dump(), tokenizer=loaded.tokenizer,
                          extra=result.report.save if result.report is not None else None, overwrite=recipe.output.overwrite)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is saved: its checkpoints are spent
    return result
