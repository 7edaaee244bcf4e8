"""The whole job, top to bottom: spec -> model -> plan -> converted -> calibrated -> distilled -> report -> saved.

The CLI is a thin shell over ``run``; every step is also a public function of its own.
"""
from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibrate import LayerCalibration, calibrate, cap_thresholds
from .config import MIDLConfig
from .data import CALIBRATION_OFFSET, Batch, default_data, load_data
from .distill import DistillConfig, DistillResult, distill
from .graph import TargetTable
from .log import logger
from .models import LoadedModel, check_remote_code, load_model
from .quality import OUTPUT_KIND
from .recipe import Recipe
from .saving import save
from .conversion import plan_conversion
from .surgery import Plan, apply_plan



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


def budget_data(data: Any, config: MIDLConfig) -> list[Batch]:
    """The batches a run's layer budget measures on (first ``budget_batches``) and fits on (the rest),
    from the part of the data stream training never draws."""
    count = config.budget_batches + config.budget_fit_batches
    return [data.train_batch(CALIBRATION_OFFSET + i, config.budget_batch_size) for i in range(count)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(recipe: Recipe, dry_run: bool = False, progress: bool = True, trust_remote_code: bool = False) -> RunResult:
    """Run a recipe; with ``dry_run`` stop after the plan (the model is untouched). Steps are logged
    (``midl_convert.log``); ``progress=False`` hides the bars. A recipe's ``model.kwargs`` may ask
    for ``trust_remote_code`` only when ``trust_remote_code=True`` is passed."""
    torch.manual_seed(recipe.seed)
    m = recipe.model
    loaded = load_model(m.spec, weights=m.weights, random_init=m.random_init, trust_remote_code=trust_remote_code,
                        **check_remote_code(m.kwargs, trust_remote_code))
    for note in loaded.notes:
        logger.info(note)
    config = recipe.midl_config()
    spec = recipe.distill.data or default_data(loaded)
    dcfg = DistillConfig(**recipe.distill.model_dump(exclude={"data", "enabled"}))
    bs = dcfg.batch_size
    data = load_data(spec, loaded, seed=recipe.seed) if config.flops_ratio is not None or not dry_run else None
    budget_batches = None
    if config.flops_ratio is not None:
        logger.info(f"layer budget: fitting each option on {config.budget_fit_batches} batch(es) and measuring its damage "
                    f"on {config.budget_batches} other batch(es) of {config.budget_batch_size} from {spec} for a "
                    f"{config.flops_ratio:g}x FLOPs target")
        budget_batches = budget_data(data, config)
    plan, table = plan_conversion(loaded.model, config, loaded.example_inputs, budget_batches, OUTPUT_KIND[loaded.task],
                                  progress=progress)
    if plan.budget is not None and plan.budget.get("cached"):
        from .budget import cache_dir

        logger.info(f"layer budget: measurements read from the cache ({cache_dir()}); delete it to measure again")
    result = RunResult(loaded, plan, table)
    if dry_run:
        return result
    device = resolve_device(recipe.device)
    teacher = copy.deepcopy(loaded.model).eval()
    student = apply_plan(loaded.model, plan).eval()
    result.student, result.teacher = student, teacher
    if dcfg.calibration_batches:
        logger.info(f"calibrating {len(plan.converted)} layers on {dcfg.calibration_batches} batches of {spec}")
        result.calibration = calibrate(student, [data.train_batch(CALIBRATION_OFFSET + i, bs) for i in range(dcfg.calibration_batches)],
                                       progress=progress)
    eval_data = load_data(recipe.report.data, loaded, seed=recipe.seed) if recipe.report.data else data
    eval_batches = eval_data.heldout_batches(recipe.report.batch_size, limit=recipe.report.eval_samples)
    out = Path(recipe.output.dir)
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
            logger.info(f"adaptive thresholds raised on {len(raised)} layers so the example input meets the "
                        f"{config.flops_ratio:g}x target (at most k exact neurons per mask there)")
    if recipe.report.enabled:
        from .report import build_report

        settings = {"model": m.model_dump(), "recipe": recipe.model_dump(), "data": spec, "seed": recipe.seed,
                    "device": str(device), "notes": loaded.notes}
        result.report = build_report(student, teacher, [b.to(device) for b in eval_batches], loaded.task, plan=plan,
                                     settings=settings, latency_batch_sizes=tuple(recipe.report.latency_batch_sizes),
                                     example_inputs=Batch(loaded.example_inputs).to(device).inputs, progress=progress)
    result.out_dir = save(student, out, build=loaded.build, recipe=recipe.model_dump(), tokenizer=loaded.tokenizer,
                          extra=result.report.save if result.report is not None else None)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is saved: its checkpoints are spent
    return result
