"""Sparse-layer methods side by side at equal whole-model FLOPs on the real offline models.

Every method converts the same layers (MiniLM: the 36 encoder Linears; EfficientNet-Lite0: every
1x1 conv but the classifier), with its keep set so the whole model costs ``dense / target`` FLOPs
on the example input (gate, light path and selection counted), and is calibrated the same way
(``mc.calibrate`` on the same batches); no training unless said. All of them are the package's
own layers with the settings that make them the published method:

- static: output neurons by row norm, the same for every input (output side, rank 0);
- static pruning (``kinds/prune``): one fixed set of input columns by E|x_j| ||W_:,j|| on the
  calibration rows (Wanda's score per column), the dropped inputs' mean folded into the bias;
- TEAL: input entries above a magnitude threshold calibrated to the keep (input side, rank 0,
  adaptive masks, column scale 1); adaptive rows count their FLOPs on the first held-out batch;
- WINA: top-k inputs by |x_j| ||W_:,j|| (input side, rank 0);
- R-Sparse: input top-k, the rest through a rank-r SVD of W (input side, plain SVD, not refitted);
- MID-L output side (the paper's): gate on V x, whitened light path, calibrated gate;
- MID-L input side: top-k by |x_j - mu_j| c_j (centred, ``MIDLConfig.centre``, default "auto"), light
  path fitted to the left-out inputs (rank r), or rank 0 with adaptive masks; the peers' input-side
  rows are not centred, as published;
- budget, select=auto: each layer's side, keep and rank (or dense) from measured damage; also after
  ``--steps`` of distillation; ``--adaptive`` gives its layers adaptive masks (FLOPs then counted
  on held-out data, like the other adaptive rows); ``--centre`` sets its centring.

``--keep 0.65 --keep 0.5`` prints instead, per keep, the input side at rank 0 on every converted layer
at that uniform keep, with no training, for each centring (none, mean, median, auto).

Quality is judged on held-out data from a source neither calibration nor distillation reads:
MiniLM on King James Bible verses (calibration and training read Python's help text), cosine to
the teacher's sentence embeddings and top-10 retrieval overlap; EfficientNet-Lite0 per held-out
photo, agreement on the crops the teacher is sure of (>= 0.5), and the worst photo.

    python benchmarks/peers.py --ratio 1.5 --ratio 2.0
    python benchmarks/peers.py --model effnet --ratio 1.2 --ratio 1.5 --ratio 1.8
    python benchmarks/peers.py --model effnet --ratio 1.8 --only budget --steps 0 --adaptive
    python benchmarks/peers.py --keep 0.65 --keep 0.5
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import torch
from torch import nn

import midl_convert as mc
from midl_convert.calibrate import fit_thresholds
from midl_convert.flops import model_flops
from midl_convert.pipeline import budget_data
from midl_convert.quality import compare

Method = tuple[str, Callable[[float], mc.MIDLConfig], Callable[[nn.Module], None]]


def _no_column_scale(model: nn.Module) -> None:
    """TEAL reads |x| alone: the input kind (``kinds/input``) with its column scale set to 1."""
    for layer in mc.midl_layers(model).values():
        layer.column_norm.fill_(1.0)


def methods(rank: float, exclude: list[str], granularity: str) -> list[Method]:
    common = dict(exclude=exclude, skip_head=True, granularity=granularity)
    peer = dict(common, centre="none")  # the published methods pick by |x| itself
    nothing = lambda model: None  # noqa: E731
    return [
        ("static (output rows by norm)", lambda k: mc.MIDLConfig(keep=k, rank=0, select="output", **common), nothing),
        ("static pruning (input columns, calibrated)", lambda k: mc.MIDLConfig(keep=k, select="prune", **common),
         nothing),
        ("TEAL (input magnitude threshold)", lambda k: mc.MIDLConfig(keep=k, rank=0, select="input", adaptive=True, **peer),
         _no_column_scale),
        ("WINA (input top-k, |x| x column norm)", lambda k: mc.MIDLConfig(keep=k, rank=0, select="input", **peer), nothing),
        (f"R-Sparse (input top-k + SVD, rank {rank:g})", lambda k: mc.MIDLConfig(keep=k, rank=rank, select="input", **peer),
         nothing),
        (f"MID-L output side (rank {rank:g})", lambda k: mc.MIDLConfig(keep=k, rank=rank, select="output", **common), nothing),
        (f"MID-L input side (rank {rank:g}, centred)", lambda k: mc.MIDLConfig(keep=k, rank=rank, select="input", **common),
         nothing),
        ("MID-L input side (rank 0, adaptive, centred)",
         lambda k: mc.MIDLConfig(keep=k, rank=0, select="input", adaptive=True, **common), nothing),
    ]


def centrings(teacher: nn.Module, example, keeps: list[float], exclude: list[str], granularity: str, calib,
              names: list[str], judged: Callable[[nn.Module], dict[str, float]]) -> None:
    """Per uniform keep, the input side at rank 0 on every converted layer, no training, for each centring
    (with "auto": how many layers took the mean and the median)."""
    print(f"\n| keep | centre | whole-model ratio | {' | '.join(names)} | seconds |")
    print("|---|---|---|" + "---|" * (1 + len(names)))
    for keep in keeps:
        for centre in ("none", "mean", "median", "auto"):
            t = time.perf_counter()
            student = copy.deepcopy(teacher)
            mc.convert(student, mc.MIDLConfig(keep=keep, rank=0, select="input", centre=centre, exclude=exclude,
                                              granularity=granularity), example)
            calibration = mc.calibrate(student, calib)
            taken = [name for c in calibration for name in ("mean", "median") if f"{name} centre" in c.gate]
            counts = f" ({taken.count('mean')} mean, {taken.count('median')} median)" if centre == "auto" else ""
            shown = " | ".join(f"{v:.3f}" for v in judged(student).values())
            print(f"| {keep:g} | {centre}{counts} | {model_flops(student, teacher, example).ratio:.3f}x | {shown} | "
                  f"{time.perf_counter() - t:.0f} |", flush=True)


def convert_at(teacher: nn.Module, config_for: Callable[[float], mc.MIDLConfig], example, target: float,
               ) -> tuple[nn.Module, float, float] | None:
    """The converted copy whose whole-model ratio is closest to ``target`` from above (bisection on keep)."""
    lo, hi, best = 0.02, 1.0, None
    for _ in range(9):
        keep = (lo + hi) / 2
        student = copy.deepcopy(teacher)
        mc.convert(student, config_for(keep), example)
        ratio = model_flops(student, teacher, example).ratio
        if ratio >= target:
            best, lo = (student, keep, ratio), keep
        else:
            hi = keep
    return best


def judge(model: nn.Module, teacher: nn.Module, held, output: str, photos) -> dict[str, float]:
    if output == "embedding":
        m = compare(model, teacher, held, output)
        return {"cosine": m["cosine"], "overlap": m["top10_overlap"]}
    per = {name: compare(model, teacher, batches, "logits") for name, batches in photos.items()}
    sure = {name: m.get("agreement_sure", float("nan")) for name, m in per.items()}
    return {"worst": min(sure.values()), **{f"sure {n}": v for n, v in sure.items()}}


def row(name: str, ratio: float | None, q: dict[str, float], seconds: float) -> None:
    shown = " | ".join(f"{v:.3f}" for v in q.values())
    print(f"| {name} | {'' if ratio is None else f'{ratio:.3f}x'} | {shown} | {seconds:.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["minilm", "effnet"], default="minilm")
    p.add_argument("--ratio", type=float, action="append", help="whole-model FLOPs targets (repeat)")
    p.add_argument("--rank", type=float, default=1 / 16, help="light-path rank (share of min(in, out))")
    p.add_argument("--steps", type=int, default=300, help="distillation steps for the budget row (0: none)")
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--only", default="", help="comma-separated method name prefixes to run (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--judge", type=int, default=None,
                   help="options per layer the budget judges at the output after screening (0: every option; "
                        "default: MIDLConfig's, every option on a grid of at most 1000)")
    p.add_argument("--budget-batches", type=int, default=None,
                   help="batches the budget judges each option's damage on (default: MIDLConfig's)")
    p.add_argument("--adaptive", action="store_true",
                   help="the budget row with adaptive masks (thresholds calibrated, then capped on the example input)")
    p.add_argument("--train", action="append", default=None,
                   help="what the budget row's distillation trains (repeat: one row each, from the same calibrated model; "
                        "default: DistillConfig's)")
    p.add_argument("--lr", type=float, default=None, help="distillation learning rate (default: DistillConfig's)")
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--lora-lr", type=float, default=None)
    p.add_argument("--block-weight", type=float, default=None, help="weight of the block-by-block loss")
    p.add_argument("--data", default="builtin:text", help="MiniLM: calibration and distillation data")
    p.add_argument("--centre", default="auto", choices=["auto", "mean", "median", "none"],
                   help="the budget row's centring of input-side layers (MIDLConfig.centre)")
    p.add_argument("--keep", type=float, action="append",
                   help="instead of the peers: every layer at this keep, input side, rank 0, each centring (repeat)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ratios = args.ratio or [1.5, 2.0]
    if args.model == "minilm":
        loaded = mc.load_model("sentence-transformers/all-MiniLM-L6-v2")
        data = mc.load_data(args.data, loaded)
        held, output, photos, task = data.heldout_batches(64, limit=args.eval), "embedding", None, loaded.task
        exclude, granularity = ["pooler.dense"], "token"
    else:
        from midl_convert.data import HELDOUT_PHOTOS, _heldout_crops, _image_collate

        loaded = mc.load_model("tf_efficientnet_lite0")
        data = mc.load_data("builtin:images", loaded)
        collate = _image_collate(loaded)
        photos = {name: [collate(_heldout_crops((name,), 48, seed=0), False)] for name in HELDOUT_PHOTOS}
        held, output, task = None, "logits", loaded.task
        exclude, granularity = [], "pixel"
    teacher, example = loaded.model.eval(), loaded.example_inputs
    calib = [data.train_batch(1_000_000 + i, 16) for i in range(4)]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.keep:
        names = ["cosine", "top-10 overlap"] if output == "embedding" else ["worst photo", *[f"sure {n}" for n in photos]]
        centrings(teacher, example, args.keep, exclude, granularity, calib, names,
                  lambda m: judge(m, teacher, held, output, photos))
        return
    for target in ratios:
        q_names = ["cosine", "top-10 overlap"] if output == "embedding" else ["worst photo", *[f"sure {n}" for n in photos]]
        print(f"\n{args.model}, whole-model target {target}x (held-out: {'KJV verses' if output == 'embedding' else 'photos'})\n")
        print(f"| method | whole-model ratio | {' | '.join(q_names)} | seconds |")
        print("|" + "---|" * (3 + len(q_names)))
        for name, config_for, tweak in methods(args.rank, exclude, granularity):
            if only and not any(name.startswith(o) for o in only):
                continue
            t = time.perf_counter()
            found = convert_at(teacher, config_for, example, target)
            if found is None:
                print(f"| {name} | unreachable | | |")
                continue
            student, keep, ratio = found
            if not name.startswith("R-Sparse"):  # R-Sparse keeps its plain SVD
                mc.calibrate(student, calib)
            tweak(student)
            fit_thresholds(student, calib)  # adaptive masks keep their share with the tweak in place
            if "adaptive" in name or name.startswith("TEAL"):  # masks follow the input: count on held-out data
                ratio = model_flops(student, teacher, (held[0] if held else next(iter(photos.values()))[0]).inputs).ratio
            row(f"{name}, keep {keep:.3f}", ratio, judge(student, teacher, held, output, photos), time.perf_counter() - t)
        if only and not any("budget".startswith(o) for o in only):
            continue
        t = time.perf_counter()
        student = copy.deepcopy(teacher)
        cfg = mc.MIDLConfig(flops_ratio=target, select="auto", exclude=exclude, granularity=granularity,
                            budget_judge=args.judge, adaptive=args.adaptive, centre=args.centre,
                            **({"budget_batches": args.budget_batches} if args.budget_batches else {}))
        _, plan = mc.convert(student, cfg, example, batches=budget_data(data, cfg), output=output)
        mc.calibrate(student, calib)
        if args.adaptive:
            mc.cap_thresholds(student, example)
        counted = (held[0] if held else next(iter(photos.values()))[0]).inputs if args.adaptive else example
        ratio = model_flops(student, teacher, counted).ratio  # adaptive masks: counted on held-out data, as above
        sides = {s: sum(lp.select == s for lp in plan.converted) for s in ("input", "output")}
        judged = {None: "default judging", 0: "every option judged"}.get(args.judge, f"{args.judge} judged per layer")
        judged += ", adaptive masks" if args.adaptive else ""
        judged += f", centre {args.centre}"
        judged += f", damage on {cfg.budget_batches} batches" if args.budget_batches else ""
        row(f"budget, select=auto, {judged} ({sides['input']} input / {sides['output']} output side, "
            f"{len(plan.layers) - len(plan.converted)} dense)", ratio, judge(student, teacher, held, output, photos),
            time.perf_counter() - t)
        settings = {k: v for k, v in (("lr", args.lr), ("lora_rank", args.lora_rank), ("lora_lr", args.lora_lr),
                                      ("block_weight", args.block_weight)) if v is not None}
        for train in (args.train or [None]) if args.steps else []:
            tuned = copy.deepcopy(student)
            res = mc.distill(tuned, teacher, data, task, steps=args.steps, log_every=50,
                             **settings, **({"train": train} if train else {}))
            if args.adaptive:
                mc.cap_thresholds(tuned, example)
            shown = ", ".join(f"{k} {v:g}" for k, v in settings.items())
            row(f"budget, select=auto, after {args.steps} steps, train {res.train} ({res.trainable:,} parameters"
                f"{', ' + shown if shown else ''}{', data ' + args.data if args.data != 'builtin:text' else ''})",
                model_flops(tuned, teacher, counted).ratio, judge(tuned, teacher, held, output, photos), res.seconds)


if __name__ == "__main__":
    main()
