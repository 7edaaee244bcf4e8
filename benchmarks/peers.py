"""Sparse-layer methods side by side at equal whole-model FLOPs on the real offline models.

Every method converts the same layers (MiniLM: the 36 encoder Linears; EfficientNet-Lite0: every
1x1 conv but the classifier; SmolLM2-135M: the 210 decoder Linears), with its keep set so the whole
model costs ``dense / target`` FLOPs on the example input (SmolLM2: on the first window of the
held-out text, where attention's share depends on the length; gate, light path and selection
counted), and is calibrated the same way (``mc.calibrate`` on the same batches of help text); no
training unless said. All of them are the package's own layers with the settings that make them
the published method:

- static: output neurons by row norm, the same for every input (output side, rank 0);
- static pruning (``kinds/prune``): one fixed set of input columns by E|x_j| ||W_:,j|| on the
  calibration rows (Wanda's score per column), the dropped inputs' mean folded into the bias;
- TEAL: input entries above a magnitude threshold calibrated to the keep (input side, rank 0,
  adaptive masks, column scale 1); adaptive rows count their FLOPs on the first held-out batch;
- TEAL uniform / TEAL greedy (MiniLM, SmolLM2): TEAL's own procedure (``teal_greedy.py``): one
  threshold per projection from the dense model's |x| on the calibration tokens, every projection
  at one sparsity, or sparsity allocated by TEAL's block-wise greedy walk (each block on its dense
  inputs, ``--teal-step``, up to ``--teal-until``; TEAL's step is 0.05, SmolLM2 on 2 shared cores
  walked in steps of 0.2, about 3 minutes a block); the level is bisected to the target on held-out
  FLOPs; the model runs plain masks ``x * (|x| > t)`` on the dense Linears, and its FLOPs are counted
  as the masks fall on the held-out inputs (kept columns x out x 2 per row, plus |x| and the compare);
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
photo, agreement on the crops the teacher is sure of (>= 0.5), and the worst photo; SmolLM2
perplexity on ``--ppl-tokens`` tokens of Bible verses (``generate.py``'s text, from ``KJV_START``) in
windows of ``--ppl-window``. Each row gives the whole-model ratio and the converted layers' ratio,
both counted on held-out inputs (and, for the budget, the whole-model ratio it planned on the example).

    python benchmarks/peers.py --ratio 1.5 --ratio 2.0
    python benchmarks/peers.py --model smollm2 --ratio 1.3 --ratio 1.5 --rank 0 --steps 0 --teal-step 0.2 \
        --teal-until 0.5 --only "TEAL uniform,TEAL greedy,MID-L input side (rank 0, centred),budget"
    python benchmarks/peers.py --model effnet --ratio 1.2 --ratio 1.5 --ratio 1.8
    python benchmarks/peers.py --model effnet --ratio 1.8 --only budget --steps 0 --adaptive
    python benchmarks/peers.py --keep 0.65 --keep 0.5
"""
from __future__ import annotations

import argparse
import copy
import re
import time
from typing import Any, Callable

import torch
from torch import nn

import midl_convert as mc
from midl_convert.calibrate import fit_thresholds
from midl_convert.flops import ModelFlops, count_flops, model_flops, model_flops_over
from midl_convert.pipeline import budget_data
from midl_convert.quality import compare
import teal_greedy

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
        ("MID-L input side (rank 0, adaptive, uncentred: a run's default on a causal LM)",
         lambda k: mc.MIDLConfig(keep=k, rank=0, select="input", adaptive=True, **peer), nothing),
    ]


def centrings(teacher: nn.Module, example, keeps: list[float], exclude: list[str], granularity: str, calib,
              names: list[str], judged: Callable[[nn.Module], dict[str, float]], adaptive: bool = False,
              counted: Any = None) -> None:
    """Per uniform keep, the input side at rank 0 on every converted layer, no training, for each centring
    (with "auto": how many layers took no centre, the mean and the median); ``adaptive`` masks with it,
    their ratio counted on ``counted`` (held-out inputs) as well as on the example."""
    print(f"\n| keep | centre | whole-model ratio (example) | held-out ratio | {' | '.join(names)} | seconds |")
    print("|---|---|---|---|" + "---|" * (1 + len(names)))
    for keep in keeps:
        for centre in ("none", "mean", "median", "auto"):
            t = time.perf_counter()
            student = copy.deepcopy(teacher)
            mc.convert(student, mc.MIDLConfig(keep=keep, rank=0, select="input", centre=centre, exclude=exclude,
                                              granularity=granularity, adaptive=adaptive), example)
            calibration = mc.calibrate(student, calib)
            taken = [c.gate.rsplit(", ", 1)[-1].split(" ")[0] for c in calibration if c.gate.endswith("centre")]
            counts = (f" ({taken.count('no')} none, {taken.count('mean')} mean, {taken.count('median')} median)"
                      if centre == "auto" else "")
            shown = figures(judged(student))
            held = f"{model_flops_over(student, teacher, counted).ratio:.3f}x" if counted is not None else ""
            print(f"| {keep:g} | {centre}{counts} | {model_flops(student, teacher, example).ratio:.3f}x | {held} | {shown} | "
                  f"{time.perf_counter() - t:.0f} |", flush=True)
        if adaptive:  # the same level as TEAL: its plain masks, and the input kind scoring |x| alone
            teal_same_level(teacher, example, keep, exclude, granularity, calib, judged, counted, list(mc.midl_layers(student)))


def teal_same_level(teacher: nn.Module, example, keep: float, exclude: list[str], granularity: str, calib,
                    judged: Callable[[nn.Module], dict[str, float]], counted: Any, projections: list[str]) -> None:
    """Two rows at sparsity 1 - ``keep`` in every projection: TEAL uniform (``teal_greedy``: plain
    ``x * (|x| > t)`` masks, thresholds from the dense model's ``|x|``) and the package's input kind,
    adaptive and uncentred, with its column scale set to 1 so it scores ``|x|`` alone."""
    t = time.perf_counter()
    walk = teal_greedy.greedy_walk(teacher, projections, calib, 0.0, calib[:1], log=False)  # quantiles, no walk
    sparsity, plain = walk.uniform(1 - keep), copy.deepcopy(teacher)  # judged against the untouched teacher
    with teal_greedy.thresholded(plain, walk, sparsity):
        shown = figures(judged(plain))
    held = f"{teal_greedy.teal_flops(plain, walk, sparsity, counted).ratio:.3f}x" if counted is not None else ""
    print(f"| {keep:g} | TEAL uniform, sparsity {1 - keep:.3f} | | {held} | {shown} | {time.perf_counter() - t:.0f} |", flush=True)
    t = time.perf_counter()
    student = copy.deepcopy(teacher)
    mc.convert(student, mc.MIDLConfig(keep=keep, rank=0, select="input", centre="none", exclude=exclude,
                                      granularity=granularity, adaptive=True), example)
    mc.calibrate(student, calib)
    _no_column_scale(student)
    fit_thresholds(student, calib)
    shown = figures(judged(student))
    held = f"{model_flops_over(student, teacher, counted).ratio:.3f}x" if counted is not None else ""
    print(f"| {keep:g} | none, column scale 1 (the input kind scoring \\|x\\| alone) | {model_flops(student, teacher, example).ratio:.3f}x "
          f"| {held} | {shown} | {time.perf_counter() - t:.0f} |", flush=True)


def convert_at(teacher: nn.Module, config_for: Callable[[float], mc.MIDLConfig], example, target: float,
               counted: Any = None) -> tuple[nn.Module, float, float] | None:
    """The converted copy whose whole-model ratio (on ``counted``, default ``example``) is closest to
    ``target`` from above (bisection on keep)."""
    lo, hi, best = 0.02, 1.0, None
    for _ in range(9):
        keep = (lo + hi) / 2
        student = copy.deepcopy(teacher)
        mc.convert(student, config_for(keep), example)
        ratio = model_flops(student, teacher, example if counted is None else counted).ratio
        if ratio >= target:
            best, lo = (student, keep, ratio), keep
        else:
            hi = keep
    return best


def teal_at(walk: teal_greedy.Walk, model: nn.Module, sparsity_at: Callable[[float], dict[str, float]], target: float,
            counted: list[Any], top: float) -> tuple[float, dict[str, float]] | None:
    """The lowest level in [0, ``top``] (uniform sparsity or the greedy walk's effective sparsity) at which
    TEAL's masks bring the whole-model ratio on ``counted`` to ``target`` (bisection): (level, sparsities)."""
    dense = sum(count_flops(model, one) for one in counted)
    lo, hi, best = 0.0, top, None
    for _ in range(12):
        level = (lo + hi) / 2
        if teal_greedy.teal_flops(model, walk, sparsity_at(level), counted, dense).ratio >= target:
            best, hi = level, level
        else:
            lo = level
    return None if best is None else (best, sparsity_at(best))


def judge(model: nn.Module, teacher: nn.Module, held, output: str, photos) -> dict[str, float]:
    if output == "perplexity":  # held: (token ids, window, dense perplexity)
        from generate import perplexity

        ids, window, dense = held
        ppl = perplexity(model, ids, window)
        return {"perplexity": ppl, "vs dense %": 100 * (ppl / dense - 1)}
    if output == "embedding":
        m = compare(model, teacher, held, output)
        return {"cosine": m["cosine"], "overlap": m["top10_overlap"]}
    per = {name: compare(model, teacher, batches, "logits") for name, batches in photos.items()}
    sure = {name: m.get("agreement_sure", float("nan")) for name, m in per.items()}
    return {"worst": min(sure.values()), **{f"sure {n}": v for n, v in sure.items()}}


def figures(q: dict[str, float]) -> str:
    """A judged row's quality figures as table cells (a change in % signed)."""
    return " | ".join(f"{v:+.1f}" if k.endswith("%") else f"{v:.3f}" for k, v in q.items())


def row(name: str, ratio: float | None, q: dict[str, float], seconds: float, layers: float | None = None) -> None:
    shown = figures(q)
    print(f"| {name} | {'' if ratio is None else f'{ratio:.3f}x'} | {'' if layers is None else f'{layers:.3f}x'} "
          f"| {shown} | {seconds:.0f} |", flush=True)


def prefixes(only: str) -> list[str]:
    """``--only``'s name prefixes: split on commas outside parentheses (method names hold some)."""
    return [s.strip() for s in re.split(r",(?![^(]*\))", only) if s.strip()]


def walk_text(loaded, data, seqs: int, tokens: int) -> list[dict[str, torch.Tensor]]:
    """One batch of ``seqs`` unpadded sequences of ``tokens`` tokens of help text (the calibration
    source), as TEAL cuts its calibration text: the greedy walk's data on a causal LM."""
    import random

    picked = random.Random(0).sample(range(len(data.train)), min(len(data.train), 40 * seqs * tokens // 16))
    text = " ".join(data.train[i][0] if isinstance(data.train[i], tuple) else data.train[i] for i in picked)
    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < seqs * tokens:
        raise SystemExit(f"help text gave {ids.numel()} tokens, fewer than {seqs} x {tokens}")
    return [{"input_ids": ids[: seqs * tokens].reshape(seqs, tokens)}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["minilm", "effnet", "smollm2"], default="minilm")
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
                   help="instead of the peers: every layer at this keep, input side, rank 0, each centring (repeat; with "
                        "--adaptive, adaptive masks)")
    p.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 16 sequences")
    p.add_argument("--ppl-tokens", type=int, default=1024, help="SmolLM2: held-out tokens perplexity is measured on")
    p.add_argument("--ppl-window", type=int, default=512)
    p.add_argument("--teal-step", type=float, default=teal_greedy.STEP,
                   help="TEAL greedy: the sparsity a query-sized projection gains per step (TEAL's: 0.05)")
    p.add_argument("--teal-until", type=float, default=0.6, help="TEAL greedy: the effective sparsity each block walks to")
    p.add_argument("--teal-walk", default="4x64",
                   help="SmolLM2: the greedy walk's data, SEQUENCESxTOKENS of unpadded help text (MiniLM: the first "
                        "calibration batch)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ratios = args.ratio or [1.5, 2.0]
    if args.rank == 0 or args.rank >= 1:
        args.rank = int(args.rank)  # a count of directions (MIDLConfig takes a float only as a share below 1)
    if args.model == "minilm":
        loaded = mc.load_model("sentence-transformers/all-MiniLM-L6-v2")
        data = mc.load_data(args.data, loaded)
        held, output, photos, task = data.heldout_batches(64, limit=args.eval), "embedding", None, loaded.task
        exclude, granularity, counted_on = ["pooler.dense"], "token", [held[0].inputs]
    elif args.model == "smollm2":
        from generate import SMOL, heldout_ids, perplexity

        loaded = mc.load_model(SMOL)
        data = mc.load_data("builtin:text", loaded)
        ids = heldout_ids(loaded.tokenizer, args.ppl_tokens)
        counted_on = [{"input_ids": ids[:, i : i + args.ppl_window]} for i in range(0, ids.shape[1], args.ppl_window)]
        held, output, photos, task = (ids, args.ppl_window, perplexity(loaded.model, ids, args.ppl_window)), "perplexity", \
            None, loaded.task
        exclude, granularity = [], "token"
    else:
        from midl_convert.data import HELDOUT_PHOTOS, _heldout_crops, _image_collate

        loaded = mc.load_model("tf_efficientnet_lite0")
        data = mc.load_data("builtin:images", loaded)
        collate = _image_collate(loaded)
        photos = {name: [collate(_heldout_crops((name,), 48, seed=0), False)] for name in HELDOUT_PHOTOS}
        held, output, task = None, "logits", loaded.task
        exclude, granularity, counted_on = [], "pixel", [next(iter(photos.values()))[0].inputs]
    teacher, example = loaded.model.eval(), loaded.example_inputs
    calib = [data.train_batch(1_000_000 + i, 16) for i in range(args.calib_batches)]
    only = prefixes(args.only)
    if args.keep:
        names = (["cosine", "top-10 overlap"] if output == "embedding" else ["perplexity", "vs dense %"]
                 if output == "perplexity" else ["worst photo", *[f"sure {n}" for n in photos]])
        centrings(teacher, example, args.keep, exclude, granularity, calib, names,
                  lambda m: judge(m, teacher, held, output, photos), args.adaptive, counted_on)
        return

    def held_flops(student: nn.Module) -> ModelFlops:
        """FLOPs on held-out inputs (SmolLM2: every window of the perplexity text)."""
        return model_flops_over(student, teacher, counted_on)

    # a bisection's count: SmolLM2 on its first held-out window (attention's share depends on the length)
    counted = counted_on[0] if output == "perplexity" else None
    walked: list[teal_greedy.Walk] = []

    def walk() -> teal_greedy.Walk:
        if not walked:
            student = copy.deepcopy(teacher)
            mc.convert(student, mc.MIDLConfig(keep=0.5, rank=0, select="input", exclude=exclude, skip_head=True,
                                              granularity=granularity), example)
            if output == "perplexity":
                seqs, tokens = (int(v) for v in args.teal_walk.split("x"))
                on = walk_text(loaded, data, seqs, tokens)
            else:
                on = calib[:1]
            walked.append(teal_greedy.greedy_walk(teacher, list(mc.midl_layers(student)), calib, args.teal_until,
                                                  on, args.teal_step))
            print(f"TEAL greedy walk: {len(walked[0].blocks)} blocks to effective sparsity {args.teal_until} in steps "
                  f"of {args.teal_step:g}, {walked[0].seconds:.0f}s", flush=True)
        return walked[0]

    q_names = {"embedding": ["cosine", "top-10 overlap"], "perplexity": ["perplexity", "vs dense %"]}.get(
        output, ["worst photo", *[f"sure {n}" for n in (photos or {})]])
    for target in ratios:
        source = {"embedding": "KJV verses", "perplexity": f"{held[0].shape[1] if output == 'perplexity' else 0} KJV tokens "
                  f"in windows of {args.ppl_window}"}.get(output, "photos")
        print(f"\n{args.model}, whole-model target {target}x (held-out: {source}; calibration: {len(calib)} batches "
              f"of 16 from {data.spec}; ratios counted on held-out inputs)\n")
        if output == "perplexity":
            print(f"dense perplexity {held[2]:.2f}\n")
        print(f"| method | whole-model ratio | converted layers' ratio | {' | '.join(q_names)} | seconds |")
        print("|" + "---|" * (4 + len(q_names)))
        for name, config_for, tweak in methods(args.rank, exclude, granularity):
            if only and not any(name.startswith(o) for o in only):
                continue
            t = time.perf_counter()
            found = convert_at(teacher, config_for, example, target, counted)
            if found is None:
                print(f"| {name} | unreachable | | |")
                continue
            student, keep, ratio = found
            if not name.startswith("R-Sparse"):  # R-Sparse keeps its plain SVD
                mc.calibrate(student, calib)
            tweak(student)
            fit_thresholds(student, calib)  # adaptive masks keep their share with the tweak in place
            f = held_flops(student)  # adaptive masks follow the input: every row is counted on held-out data
            row(f"{name}, keep {keep:.3f}", f.ratio, judge(student, teacher, held, output, photos), time.perf_counter() - t,
                f.converted_ratio)
        teal_rows = {"TEAL uniform (dense-model thresholds)": lambda w: w.uniform,
                     "TEAL greedy (block-wise allocation)": lambda w: w.at_level}
        for name, at in teal_rows.items() if output != "logits" else ():
            if only and not any(name.startswith(o) for o in only):
                continue
            t = time.perf_counter()
            w, student = walk(), copy.deepcopy(teacher)
            top = 0.95 if "uniform" in name else args.teal_until
            found = teal_at(w, student, at(w), target, [counted] if counted is not None else counted_on, top)
            if found is None:
                print(f"| {name} | unreachable below {top:g} | | |")
                continue
            level, sparsity = found
            f = teal_greedy.teal_flops(student, w, sparsity, counted_on)
            with teal_greedy.thresholded(student, w, sparsity):
                q = judge(student, teacher, held, output, photos)
            row(f"{name}, {'sparsity' if 'uniform' in name else 'effective sparsity'} {level:.3f}", f.ratio, q,
                time.perf_counter() - t, f.converted_ratio)
        if only and not any("budget".startswith(o) for o in only):
            continue
        t = time.perf_counter()
        student = copy.deepcopy(teacher)
        cfg = mc.MIDLConfig(flops_ratio=target, select="auto", exclude=exclude, granularity=granularity,
                            budget_judge=args.judge, adaptive=args.adaptive, centre=args.centre,
                            **({"budget_batches": args.budget_batches} if args.budget_batches else {}))
        _, plan = mc.convert(student, cfg, example, batches=budget_data(data, cfg),
                             output="logits" if output == "perplexity" else output)
        mc.calibrate(student, calib)
        if args.adaptive:
            mc.cap_thresholds(student, example)
        planned = model_flops(student, teacher, example).ratio
        f = held_flops(student)
        sides = {s: sum(lp.select == s for lp in plan.converted) for s in ("input", "output")}
        judged = {None: "default judging", 0: "every option judged"}.get(args.judge, f"{args.judge} judged per layer")
        judged += ", adaptive masks" if args.adaptive else ""
        judged += f", centre {args.centre}"
        judged += f", damage on {cfg.budget_batches} batches" if args.budget_batches else ""
        row(f"budget, select=auto, {judged} ({sides['input']} input / {sides['output']} output side, "
            f"{len(plan.layers) - len(plan.converted)} dense; {planned:.3f}x on the example input)", f.ratio,
            judge(student, teacher, held, output, photos), time.perf_counter() - t, f.converted_ratio)
        settings = {k: v for k, v in (("lr", args.lr), ("lora_rank", args.lora_rank), ("lora_lr", args.lora_lr),
                                      ("block_weight", args.block_weight)) if v is not None}
        for train in (args.train or [None]) if args.steps else []:
            tuned = copy.deepcopy(student)
            res = mc.distill(tuned, teacher, data, task, steps=args.steps, log_every=50,
                             **settings, **({"train": train} if train else {}))
            if args.adaptive:
                mc.cap_thresholds(tuned, example)
            shown = ", ".join(f"{k} {v:g}" for k, v in settings.items())
            f = held_flops(tuned)
            row(f"budget, select=auto, after {args.steps} steps, train {res.train} ({res.trainable:,} parameters"
                f"{', ' + shown if shown else ''}{', data ' + args.data if args.data != 'builtin:text' else ''})",
                f.ratio, judge(tuned, teacher, held, output, photos), res.seconds, f.converted_ratio)


if __name__ == "__main__":
    main()
