"""The layer budget against one global keep, at equal whole-model FLOPs ratios, on real weights.

For each target ratio: (a) one keep for every converted layer at one rank, the largest keep whose
whole-model ratio still meets the target; (b) the budget's per-layer keep and rank (or dense).
Both are calibrated the same way, then optionally distilled the same number of steps; quality
against the teacher on held-out data the calibration and training never saw. FLOPs count the
gate and light path, on the example input, as the report does.

    python benchmarks/budget.py                                  # MiniLM, 1.2 1.3 1.5 1.7, calibration only
    python benchmarks/budget.py --ratios 1.3 --steps 300         # with distillation
    python benchmarks/budget.py --model effnet --ratios 1.2 1.5  # EfficientNet-Lite0 (real ImageNet weights)
    python benchmarks/budget.py --model resnet50 --time-only     # allocation time (random weights)
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from dataclasses import replace

import torch

import midl_convert as mc
from midl_convert.budget import option_flops, input_shapes
from midl_convert.flops import count_flops, model_flops
from midl_convert.quality import TASK_OUTPUT, compare
from midl_convert.pipeline import budget_data
from midl_convert.conversion import plan_conversion
from midl_convert.surgery import Plan

MODELS = {
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2", "builtin:text", ["pooler.dense"], ["cosine", "top10_overlap"]),
    "effnet": ("tf_efficientnet_lite0", "builtin:images", [], ["agreement", "agreement_sure", "kl"]),
    "resnet50": ("resnet50", "builtin:images", [], ["agreement", "kl"]),  # random weights: allocation time only
}
RANDOM_INIT = {"resnet50"}


def global_plan(model, plan: Plan, example, target: float, rank: int | float) -> Plan | str:
    """Every planned layer at one keep and rank: the largest keep (in steps of 0.01) that meets ``target``
    (a line saying so when no keep does)."""
    dense_total = count_flops(model, example)
    shapes = input_shapes(model, [lp.path for lp in plan.converted], example)
    from midl_convert.config import resolve_rank

    def ratio(keep: float) -> float:
        saved = 0
        for lp in plan.converted:
            trial = replace(lp, keep=keep, rank=resolve_rank(rank, lp.in_features, lp.out_features))
            d, m = option_flops(model.get_submodule(lp.path), trial, shapes[lp.path])
            saved += d - m
        return dense_total / (dense_total - saved)

    for keep in [k / 100 for k in range(99, 0, -1)]:
        if ratio(keep) >= target:
            layers = [replace(lp, keep=keep, rank=resolve_rank(rank, lp.in_features, lp.out_features)) if lp.convert else lp
                      for lp in plan.layers]
            return Plan(layers, plan.trace, [f"global keep {keep:g}, rank {rank}"])
    best = max(ratio(k / 100) for k in range(1, 100))
    return f"global keep at rank {rank}: unreachable (at most {best:.3f}x)"


def evaluate(name: str, plan: Plan, loaded, data, held, output: str, args, rows: list) -> None:
    teacher = loaded.model
    student = mc.apply_plan(copy.deepcopy(teacher), plan).eval()
    t = time.perf_counter()
    mc.calibrate(student, [data.train_batch(1_000_000 + i, args.batch_size) for i in range(args.calib_batches)])
    if plan.budget is not None:  # as a CLI run does: adaptive masks may not cost more than counted on the example
        mc.cap_thresholds(student, loaded.example_inputs)
    calib = compare(student, teacher, held, output)
    secs = time.perf_counter() - t
    after = None
    if args.steps:
        res = mc.distill(student, teacher, data, loaded.task, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         log_every=max(1, args.steps // 5))
        if plan.budget is not None:
            mc.cap_thresholds(student, loaded.example_inputs)
        after, secs = compare(student, teacher, held, output), secs + res.seconds
    # Counted last: adaptive masks pick as many neurons as their (re)fitted thresholds let through.
    achieved = model_flops(student, teacher, loaded.example_inputs).ratio
    converted = sum(lp.convert for lp in plan.layers)
    rows.append((name, achieved, converted, calib, after, secs))
    keys = MODELS[args.model][3]
    shown = " / ".join(f"{calib[k]:.4f}" for k in keys)
    print(f"  {name:<28} achieved {achieved:.3f}x, {converted} layers; calibrated {shown}"
          + (f"; after {args.steps} steps " + " / ".join(f"{after[k]:.4f}" for k in keys) if after else "")
          + f"  ({secs:.0f}s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="minilm")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.2, 1.3, 1.5, 1.7])
    p.add_argument("--global-rank", type=float, default=1 / 16, help="rank of the global-keep baseline (int or share)")
    p.add_argument("--granularity", default="token")
    p.add_argument("--adaptive", action="store_true", help="adaptive masks (a calibrated threshold, keep on average)")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--eval", type=int, default=256, help="held-out samples")
    p.add_argument("--methods", nargs="+", default=["global", "budget"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-only", action="store_true", help="time the allocation (empty cache, then cached) and stop")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec, data_spec, exclude, keys = MODELS[args.model]
    loaded = mc.load_model(spec, random_init=args.model in RANDOM_INIT)
    for note in loaded.notes:
        print(note)
    output = TASK_OUTPUT[loaded.task]
    data = mc.load_data(data_spec, loaded, seed=0)
    held = data.heldout_batches(32, limit=args.eval)
    calib_batches = budget_data(data, mc.MIDLConfig())  # what a CLI run measures and fits on
    rank = int(args.global_rank) if args.global_rank >= 1 else args.global_rank
    print(f"{spec}: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads; held-out {len(held)} batches "
          f"of {data_spec}; granularity {args.granularity}")
    if args.time_only or args.model in RANDOM_INIT:
        os.environ["MIDL_CACHE_DIR"] = tempfile.mkdtemp()  # an empty cache: the first measurement is what is timed
        cfg = mc.MIDLConfig(exclude=exclude, granularity=args.granularity, adaptive=args.adaptive, flops_ratio=args.ratios[0])
        for attempt in ("measured", "cached"):
            t = time.perf_counter()
            bplan, _ = plan_conversion(loaded.model, cfg, loaded.example_inputs, calib_batches, output)
            b = bplan.budget
            print(f"| {spec} | {attempt} | {b['measured_layers']} | {b['options']} | {time.perf_counter() - t:.1f} s |", flush=True)
        return
    rows: list = []
    for target in args.ratios:
        print(f"target {target}x")
        base = mc.MIDLConfig(exclude=exclude, granularity=args.granularity, adaptive=args.adaptive)
        plan, _ = plan_conversion(loaded.model, base, loaded.example_inputs)
        if "global" in args.methods:
            gplan = global_plan(loaded.model, plan, loaded.example_inputs, target, rank)
            if isinstance(gplan, str):  # a compact CNN's small convs cannot pay for one keep everywhere
                print(f"  {gplan}", flush=True)
                rows.append((gplan, None, 0, None, None, 0.0))
            else:
                evaluate(gplan.notes[0], gplan, loaded, data, held, output, args, rows)
        if "budget" in args.methods:
            t = time.perf_counter()
            cfg = mc.MIDLConfig(**base.model_dump(exclude_unset=True), flops_ratio=target)  # select filled anew: auto
            bplan, _ = plan_conversion(loaded.model, cfg, loaded.example_inputs, calib_batches, output)
            b = bplan.budget
            print(f"  budget: {b['measured_layers']} layers x {b['options']} options, "
                  f"{'cached' if b['cached'] else 'measured'}; allocation took {time.perf_counter() - t:.1f}s "
                  f"(measurement {b['seconds']:.1f}s when first run)")
            evaluate("budget allocation", bplan, loaded, data, held, output, args, rows)
    print()
    stage = f"after {args.steps} steps" if args.steps else "after calibration"
    print(f"| target | method | achieved ratio | layers converted | {' / '.join(keys)} after calibration |"
          + (f" {' / '.join(keys)} {stage} |" if args.steps else "") + " seconds |")
    print("|---|---|---|---|---|" + ("---|" if args.steps else "") + "---|")
    for i, (name, achieved, converted, calib, after, secs) in enumerate(rows):
        target = args.ratios[i // len(args.methods)]
        if calib is None:
            print(f"| {target}x | {name} | | | |" + (" |" if args.steps else "") + " |")
            continue
        cells = [" / ".join(f"{calib[k]:.3f}" for k in keys)]
        if args.steps:
            cells.append(" / ".join(f"{after[k]:.3f}" for k in keys))
        print(f"| {target}x | {name} | {achieved:.3f}x | {converted} | " + " | ".join(cells) + f" | {secs:.0f} |")


if __name__ == "__main__":
    main()
