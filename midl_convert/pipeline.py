"""The whole job, top to bottom: spec -> model -> plan -> converted -> calibrated -> distilled -> report -> saved.

The CLI is a thin shell over ``run``; every step is also a public function of its own.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .budget_damage import damage_batches
from .calibrate import LayerCalibration, calibrate, cap_thresholds
from .config import MIDLConfig
from .data import CALIBRATION_OFFSET, Batch, default_data, load_data
from .distill import CHECKPOINT, CHECKPOINT_PURPOSE, DistillConfig, DistillResult, distill
from .graph import TargetTable
from .latency import end_to_end, is_causal_lm
from .log import logger
from .models import LoadedModel, check_remote_code, load_model
from .processes import rank_and_size
from .quality import TASK_OUTPUT
from .recipe import DECODE_SPEED_PARAMS, Recipe
from .report import build_report
from .conversion import plan_conversion
from .errors import MIDLError
from .files import cache_dir, own_dir_marker, remove_own_dir
from .saving import check_output, output_lock, save
from .surgery import Plan, apply_plan
from .weight_dtype import set_weight_dtype



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
                               "train": d.train, "trainable_parameters": d.trainable,
                               "before": d.before, "after": d.after,
                               "loss_first": d.losses[0] if d.losses else None, "loss_last": d.losses[-1] if d.losses else None}
    return out


def budget_data(data: Any, config: MIDLConfig) -> list[Batch]:
    """The batches a run's layer budget measures on (the first ``damage_batches``) and fits on (the rest),
    from the part of the data stream training never draws."""
    first = [data.train_batch(CALIBRATION_OFFSET, config.budget_batch_size)]
    count = damage_batches(config, first) + config.budget_fit_batches
    return first + [data.train_batch(CALIBRATION_OFFSET + i, config.budget_batch_size) for i in range(1, count)]


def times_decoding(asked: bool | None, student: nn.Module) -> bool:
    """Whether a run ends by timing batch-1 greedy decoding: as asked, else for a causal LM of at least
    ``DECODE_SPEED_PARAMS`` parameters."""
    if not is_causal_lm(student):
        return False
    if asked is not None:
        return asked
    return sum(p.numel() for p in student.parameters()) >= DECODE_SPEED_PARAMS


def decoder_centring(config: MIDLConfig, task: str) -> MIDLConfig:
    """``centre="none"`` for adaptive masks on a causal LM unless the run names a centre: on SmolLM2 at keep
    0.7, rank 0, centres fitted on the help text (the default "auto") cost +9.2% held-out perplexity
    on the Bible against +1.5% uncentred, and neither the layers' errors nor the model's loss on
    calibration text shows it (README, "Centred selection"). Fixed-k masks keep "auto": there the
    two are close either way (+26.3% against +27.5% uncentred at keep 0.6, +9.8% against +8.6%
    at keep 0.7)."""
    if task != "causal-lm" or not config.adaptive or "centre" in config.model_fields_set:
        return config
    logger.info("centre: none (adaptive masks on a causal LM; centres fitted on calibration text cost held-out "
                "perplexity there); --centre auto to centre")
    return config.model_copy(update={"centre": "none"})


def measure_speedup(teacher: nn.Module, student: nn.Module, example_inputs: Any, plan: Plan,
                    gguf: str | None = None) -> dict[str, Any]:
    """The converted model's measured speed-up at its real call shape, printed and kept in the plan's
    budget; with ``gguf``, decoding also against llama.cpp on that file."""
    measured = end_to_end(teacher, student, example_inputs, gguf=gguf)
    line = (f"measured speed-up at the call shape ({measured['call']}, {measured['threads']} threads): "
            f"{measured['dense_ms']:.3f} -> {measured['converted_ms']:.3f} ms, {measured['speedup']:.3f}x")
    if "dense_tokens_per_s" in measured:
        line += (f"; greedy decode ({measured['decoder']}): {measured['dense_tokens_per_s']:.1f} -> "
                 f"{measured['converted_tokens_per_s']:.1f} tokens/s ({measured['tokens_per_s_speedup']:.3f}x)")
        compiled = measured.get("compile_s") or {}
        if compiled.get("dense") is not None:
            line += f", compiled in {compiled['dense']:.0f}s / {compiled['converted']:.0f}s apart from the timing"
        if "llama_cpp_tokens_per_s" in measured:
            line += (f"; llama.cpp on the same {measured['llama_cpp']} file {measured['llama_cpp_tokens_per_s']:.1f} "
                     f"tokens/s, the converted model at {measured['converted_per_llama_cpp']:.3f}x of it")
        elif "llama_cpp_missing" in measured:
            line += f"; llama.cpp not timed: {measured['llama_cpp_missing']}"
    logger.info(line)
    if plan.budget is not None:
        plan.budget["measured"] = measured
    return measured


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


def run(recipe: Recipe, dry_run: bool = False, progress: bool = True, trust_remote_code: bool = False) -> RunResult:
    """Run a recipe; with ``dry_run`` stop after the plan (the model is untouched). Steps are logged
    (``midl_convert.log``); ``progress=False`` hides the bars. A recipe's ``model.kwargs`` may ask
    for ``trust_remote_code`` only when ``trust_remote_code=True`` is passed.

    Before anything long: the device must exist and the output folder must be writable and not
    hold the user's own files (``output.overwrite``); the run then holds a lock on that folder.
    """
    device = resolve_device(recipe.device)
    if dry_run:
        return _run(recipe, True, device, progress, trust_remote_code)
    if rank_and_size()[0] != 0:  # under a launcher the other processes share the work; the first one writes
        return _run(recipe, False, device, False, trust_remote_code, write=False)
    check_output(recipe.output.dir, recipe.output.overwrite)
    with output_lock(recipe.output.dir):
        return _run(recipe, False, device, progress, trust_remote_code)


def _run(recipe: Recipe, dry_run: bool, device: torch.device, progress: bool, trust_remote_code: bool,
         write: bool = True) -> RunResult:
    torch.manual_seed(recipe.seed)
    m = recipe.model
    loaded = load_model(m.spec, weights=m.weights, random_init=m.random_init, trust_remote_code=trust_remote_code,
                        **check_remote_code(m.kwargs, trust_remote_code))
    for note in loaded.notes:
        logger.info(note)
    config = decoder_centring(recipe.midl_config(), loaded.task)
    spec = recipe.distill.data or default_data(loaded)
    dcfg = DistillConfig(**recipe.distill.model_dump(exclude={"data", "enabled"}))
    bs = dcfg.batch_size
    data = load_data(spec, loaded, seed=recipe.seed) if config.budgeted or not dry_run else None
    budget_batches = None
    if config.budgeted:
        axis, target = config.target
        budget_batches = budget_data(data, config)
        judged = len(budget_batches) - config.budget_fit_batches
        logger.info(f"layer budget: fitting each option on {config.budget_fit_batches} batch(es) and measuring its damage "
                    f"on {judged} other batch(es) of {config.budget_batch_size} from {spec} for a "
                    f"{target:g}x {'FLOPs' if axis == 'flops' else 'measured speed-up'} target")
    plan, table = plan_conversion(loaded.model, config, loaded.example_inputs, budget_batches, TASK_OUTPUT[loaded.task],
                                  progress=progress)
    if plan.budget is not None and plan.budget.get("cached"):
        logger.info(f"layer budget: measurements read from the cache ({cache_dir()}); delete it to measure again")
    result = RunResult(loaded, plan, table)
    if dry_run:
        return result
    teacher = copy.deepcopy(loaded.model).eval()
    student = apply_plan(loaded.model, plan).eval()
    result.student, result.teacher = student, teacher
    if dcfg.calibration_batches:
        logger.info(f"calibrating {len(plan.converted)} layers on {dcfg.calibration_batches} batches of {spec}")
        result.calibration = calibrate(student, [data.train_batch(CALIBRATION_OFFSET + i, bs) for i in range(dcfg.calibration_batches)],
                                       progress=progress)
    eval_data = load_data(recipe.report.data, loaded, seed=recipe.seed) if recipe.report.data else data
    eval_batches = eval_data.heldout_batches(recipe.report.batch_size, limit=recipe.report.eval_samples)
    out = Path(os.path.abspath(recipe.output.dir))  # `--out .` has a name and a parent
    ckpt_dir = checkpoint_dir(out) if recipe.distill.enabled and dcfg.steps > 0 and dcfg.checkpoint_every else None
    if recipe.distill.enabled and dcfg.steps > 0:
        if device.type != "cpu":
            student.to(device)
            teacher.to(device)
        result.distilled = distill(student, teacher, data, loaded.task, dcfg, checkpoint_dir=ckpt_dir, eval_batches=eval_batches,
                                   device=device.type if recipe.device != "auto" else None)
    student.to(device).eval()
    teacher.to(device).eval()
    if config.budgeted:
        raised = cap_thresholds(student, Batch(loaded.example_inputs).to(device).inputs)
        if raised:
            logger.info(f"adaptive thresholds raised on {len(raised)} layers so the example input meets the "
                        f"{config.target[1]:g}x target (at most k exact neurons per mask there)")
    if not write:
        return result
    example = Batch(loaded.example_inputs).to(device)
    if config.weight_dtype != "float32":  # last, after training: the dense teacher too, so speed compares like with like
        logger.info(f"weights in {config.weight_dtype} (student and the dense model it is measured against)")
        set_weight_dtype(student, config.weight_dtype)
        set_weight_dtype(teacher, config.weight_dtype)
        plan.weight_dtype = config.weight_dtype
        if config.weight_dtype == "bfloat16":  # float inputs (pixels) in the model's dtype; token ids stay
            eval_batches = [b.map(lambda t: t.bfloat16() if t.is_floating_point() else t) for b in eval_batches]
            example = example.map(lambda t: t.bfloat16() if t.is_floating_point() else t)
    measured = None
    if device.type == "cpu" and (config.speedup is not None or times_decoding(recipe.report.decode_speed, student)):
        measured = measure_speedup(teacher, student, example.inputs, plan, gguf=loaded.gguf)
    if recipe.report.enabled:
        settings = {"model": m.model_dump(), "recipe": recipe.model_dump(), "data": spec, "seed": recipe.seed,
                    "device": str(device), "notes": loaded.notes}
        result.report = build_report(student, teacher, [b.to(device) for b in eval_batches], loaded.task, plan=plan,
                                     settings=settings, latency_batch_sizes=tuple(recipe.report.latency_batch_sizes),
                                     example_inputs=example.inputs, progress=progress,
                                     call_latency=measured)
        result.report.history = history(result)
    result.out_dir = save(student, out, build=loaded.build, recipe=recipe.model_dump(), tokenizer=loaded.tokenizer,
                          extra=result.report.save if result.report is not None else None, overwrite=recipe.output.overwrite)
    if ckpt_dir is not None:  # the run is saved: its checkpoints are spent
        remove_own_dir(ckpt_dir, CHECKPOINT_PURPOSE, (CHECKPOINT,))
    return result


def checkpoint_dir(out: Path) -> Path | None:
    """``.OUT.distill`` beside the output folder, made with this tool's marker; ``None`` (no checkpoints this
    run, said in one line) when a folder of that name is there and is not one this tool made."""
    folder = out.parent / f".{out.name}.distill"
    if own_dir_marker(folder, CHECKPOINT_PURPOSE) is not None:
        return folder
    if os.path.lexists(folder):
        logger.warning(f"{folder} is not a checkpoint folder midl-convert made; it is left alone and this run "
                       f"writes no checkpoints (move it to have them)")
        return None
    return folder  # made, with the marker, when the first checkpoint is written
