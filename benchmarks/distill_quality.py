"""How much of the teacher's behaviour conversion loses, and how much calibration and distillation win back.

MiniLM (the real all-MiniLM-L6-v2 from the `demo` extra): every encoder Linear at one keep and
rank (the pooler is excluded: it does not feed mean-pooled embeddings); cosine to the teacher's
sentence embeddings and top-10 retrieval overlap on held-out `builtin:text` sentences, right
after conversion, after closed-form calibration, and after distillation, with wall times.
EfficientNet-Lite0 (real ImageNet weights from the `demo` extra): top-1 agreement with the teacher
on held-out crops of photos training never draws (all, and those the teacher gives >= 0.5) and KL.
Digits: a small timm ViT trained here as teacher on `builtin:digits`, converted, calibrated and
distilled; held-out accuracy of teacher and student.

    python benchmarks/distill_quality.py --steps 300                   # MiniLM, defaults
    python benchmarks/distill_quality.py --steps 300 --no-whiten       # one lever at a time
    python benchmarks/distill_quality.py --digits --steps 200
    python benchmarks/distill_quality.py --effnet --granularity sample --steps 300
    python benchmarks/distill_quality.py --effnet --flops-ratio 1.2 --steps 300
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time
from typing import Iterator

import torch

import midl_convert as mc
from midl_convert.data import builtin_images
from midl_convert.downstream import post_fn
from midl_convert.flops import model_flops
from midl_convert.pipeline import budget_data
from midl_convert.quality import compare


def stage(rows: list, name: str, student, teacher, held, output: str, seconds: float) -> None:
    metrics = compare(student, teacher, held, output)
    rows.append((name, metrics, seconds))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("samples", "sure_samples"))
    print(f"  {name:<28} {shown}  ({seconds:.1f}s)", flush=True)


@contextlib.contextmanager
def oracle_gates(model) -> Iterator[None]:
    """Every MID-L layer picks, per mask, the ``k`` neurons where its light path is truly worst
    (after the norm and activation that follow it): the bound a gate that saw the full output would
    reach with these light paths. Not a product mode: it computes every row of ``W``."""
    layers = mc.midl_layers(model)

    def mix(layer, post, x):
        dense, light = layer._dense(x), layer._light(torch.nn.functional.linear(x, layer.light_down))
        err = (post(dense) - post(light)).abs().mean(dim=1, keepdim=True)  # (G, 1, out): one mask per group
        idx = err.topk(layer.k, dim=-1).indices.expand(-1, x.shape[1], -1)
        return light.scatter(-1, idx, dense.gather(-1, idx))

    for layer in layers.values():
        post = post_fn(model, *layer.downstream) or (lambda y: y)
        layer.mix_rows = lambda x, layer=layer, post=post: mix(layer, post, x)
    try:
        yield
    finally:
        for layer in layers.values():
            del layer.mix_rows


def adaptive_flops(student, teacher, example, held) -> None:
    """Adaptive masks pick what their thresholds let through: count the FLOPs again once they are
    fitted, on the example input and on the first held-out batch (a padded text batch counts its padding)."""
    if any(m.adaptive for m in mc.midl_layers(student).values()):
        for name, inputs in (("the example input", example), ("the first held-out batch", held[0].inputs)):
            flops = model_flops(student, teacher, inputs)
            print(f"  adaptive masks on {name}: converted layers {flops.converted_ratio:.3f}x, "
                  f"whole model {flops.ratio:.3f}x fewer FLOPs", flush=True)


def calibrate_and_distill(rows: list, student, teacher, data, held, calib: list, task: str, output: str,
                          args: argparse.Namespace, example) -> None:
    """The two recovery stages every row shares: closed-form calibration, then ``args.steps`` of distillation."""
    t = time.perf_counter()
    mc.calibrate(student, calib, whiten=not args.no_whiten, output=output if args.sensitivity else None)
    if args.flops_ratio:  # as a CLI budget run does: the example costs at most what was counted
        mc.cap_thresholds(student, example)
    stage(rows, "after calibration", student, teacher, held, output, time.perf_counter() - t)
    adaptive_flops(student, teacher, example, held)
    if args.oracle:
        with oracle_gates(student):
            stage(rows, "calibrated, oracle gates", student, teacher, held, output, 0.0)
    if args.steps:
        res = mc.distill(student, teacher, data, task, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         layer_weight=args.layer_weight, train=args.train, base_lr=args.base_lr, eval_batches=held,
                         lora_rank=args.lora_rank, block_weight=args.block_weight,
                         log_every=50)
        if args.flops_ratio:
            mc.cap_thresholds(student, example)
        stage(rows, f"after {args.steps} steps", student, teacher, held, output, res.seconds)
        adaptive_flops(student, teacher, example, held)
        if args.oracle:
            with oracle_gates(student):
                stage(rows, f"{args.steps} steps, oracle gates", student, teacher, held, output, 0.0)


def minilm(args: argparse.Namespace) -> None:
    loaded = mc.load_model("sentence-transformers/all-MiniLM-L6-v2")
    teacher, student = loaded.model, copy.deepcopy(loaded.model)
    data = mc.load_data("builtin:text", loaded, seed=args.seed)
    held = data.heldout_batches(64, limit=args.eval)
    t = time.perf_counter()
    if args.flops_ratio:
        cfg = mc.MIDLConfig(flops_ratio=args.flops_ratio, granularity=args.granularity, adaptive=args.adaptive, select=args.select,
                            exclude=["pooler.dense"])
        _, plan = mc.convert(student, cfg, loaded.example_inputs, batches=budget_data(data, cfg), output="embedding")
        what = f"budget {args.flops_ratio}x ({plan.budget['seconds']:.0f}s to measure{', cached' if plan.budget['cached'] else ''})"
    else:
        cfg = mc.MIDLConfig(keep=args.keep, rank=args.rank, granularity=args.granularity, adaptive=args.adaptive, select=args.select,
                            exclude=["pooler.dense"])
        _, plan = mc.convert(student, cfg, loaded.example_inputs)
        what = f"keep {args.keep}, rank {args.rank}"
    flops = model_flops(student, teacher, loaded.example_inputs)
    print(f"MiniLM: {len(plan.converted)} layers at {what}, {args.granularity} masks; "
          f"FLOPs ratio converted layers {flops.converted_ratio:.3f}x, whole model {flops.ratio:.3f}x "
          f"(gate and light path counted)")
    rows: list = []
    stage(rows, "after conversion (SVD gate)", student, teacher, held, "embedding", time.perf_counter() - t)
    calibrate_and_distill(rows, student, teacher, data, held, [data.train_batch(1_000_000 + i, 32) for i in range(args.calib_batches)],
                          "embedding", "embedding", args, loaded.example_inputs)
    target = {1.3: (0.98, 0.85)}.get(args.flops_ratio or 0.0, (0.95, 0.8))
    table(rows, ["cosine", "top10_overlap"], {"cosine": target[0], "top10_overlap": target[1]})


def effnet(args: argparse.Namespace) -> None:
    """EfficientNet-Lite0 (real ImageNet weights): every 1x1 conv at one keep, or a whole-model FLOPs budget."""
    loaded = mc.load_model("tf_efficientnet_lite0")
    for note in loaded.notes:
        print(note)
    teacher, student = loaded.model, copy.deepcopy(loaded.model)
    data = builtin_images(loaded, seed=args.seed, heldout=args.eval_images)
    held = data.heldout_batches(32)
    gran = "pixel" if args.granularity == "token" else args.granularity
    calib = [data.train_batch(1_000_000 + i, args.batch_size) for i in range(args.calib_batches)]
    t = time.perf_counter()
    if args.flops_ratio:
        cfg = mc.MIDLConfig(flops_ratio=args.flops_ratio, granularity=gran, adaptive=args.adaptive, select=args.select)
        _, plan = mc.convert(student, cfg, loaded.example_inputs, batches=budget_data(data, cfg), output="logits")
        what = f"budget {args.flops_ratio}x ({plan.budget['seconds']:.0f}s to measure{', cached' if plan.budget['cached'] else ''})"
    else:
        _, plan = mc.convert(student, mc.MIDLConfig(keep=args.keep, rank=args.rank, granularity=gran, adaptive=args.adaptive, select=args.select), loaded.example_inputs)
        what = f"keep {args.keep}, rank {args.rank}"
    flops = model_flops(student, teacher, loaded.example_inputs)
    print(f"EfficientNet-Lite0: {len(plan.converted)} of {len(plan.layers)} 1x1 convs / Linear converted, {what}, {gran} masks; "
          f"FLOPs ratio converted layers {flops.converted_ratio:.3f}x, whole model {flops.ratio:.3f}x (gate and light path "
          f"counted); held-out crops {sum(b.size for b in held)} from photos training never draws")
    rows: list = []
    stage(rows, "after conversion", student, teacher, held, "logits", time.perf_counter() - t)
    if args.alone:
        each_alone(plan, teacher, held, calib)
    calibrate_and_distill(rows, student, teacher, data, held, calib, "classifier", "logits", args, loaded.example_inputs)
    target = {1.2: 0.85, 1.5: 0.7}.get(args.flops_ratio or 0.0)
    table(rows, ["agreement", "agreement_sure", "kl"], {"agreement_sure": target} if target else {})


def each_alone(plan, teacher, held, calib) -> None:
    """Each converted layer of ``plan`` alone, at its planned keep and rank, calibrated: which layers
    do the damage, and whether it is theirs or the sum of many small ones."""
    from dataclasses import replace

    print("each converted layer alone, calibrated (agreement all / sure, KL):")
    for lp in plan.converted:
        alone = mc.Plan([layer if layer.path == lp.path else replace(layer, convert=False) for layer in plan.layers], plan.trace)
        student = mc.apply_plan(copy.deepcopy(teacher), alone)
        mc.calibrate(student, calib)
        m = compare(student.eval(), teacher, held, "logits")
        predicted = f", budget's predicted damage {lp.predicted_damage:.4f}" if lp.predicted_damage is not None else ""
        print(f"  {lp.path:<24} keep {lp.keep:<5} rank {lp.rank:<3} {m['agreement']:.2f} / {m['agreement_sure']:.2f}, "
              f"KL {m['kl']:.3f}{predicted}", flush=True)


def digits(args: argparse.Namespace) -> None:
    import timm

    from midl_convert.data import load_data
    from midl_convert.models import LoadedModel

    torch.manual_seed(args.seed)
    model = timm.create_model("test_vit", img_size=32, patch_size=4, num_classes=10)
    loaded = LoadedModel(model, "test_vit", "timm", "classifier", (torch.randn(1, 3, 32, 32),),
                         data_config=timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=model))
    data = load_data("builtin:digits", loaded, seed=args.seed)
    held = data.heldout_batches(120)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    t = time.perf_counter()
    model.train()
    for step in range(args.teacher_steps):
        batch = data.train_batch(step, 64)
        loss = torch.nn.functional.cross_entropy(model(*batch.inputs), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher = model.eval().requires_grad_(False)
    print(f"digits teacher: test_vit trained {args.teacher_steps} steps in {time.perf_counter() - t:.0f}s")
    student = copy.deepcopy(teacher)
    _, plan = mc.convert(student, mc.MIDLConfig(keep=args.keep, rank=args.rank, include="all-linear"), loaded.example_inputs)
    flops = model_flops(student, teacher, loaded.example_inputs)
    print(f"digits: {len(plan.converted)} layers at keep {args.keep}, rank {args.rank}; FLOPs ratio converted "
          f"{flops.converted_ratio:.3f}x, whole model {flops.ratio:.3f}x")
    rows: list = []
    stage(rows, "after conversion", student, teacher, held, "logits", 0.0)
    t = time.perf_counter()
    mc.calibrate(student, [data.train_batch(1_000_000 + i, 64) for i in range(args.calib_batches)])
    stage(rows, "after calibration", student, teacher, held, "logits", time.perf_counter() - t)
    if args.steps:
        res = mc.distill(student, teacher, data, "classifier", steps=args.steps, lr=args.lr, batch_size=64,
                         eval_batches=held, log_every=50)
        stage(rows, f"after {args.steps} steps", student, teacher, held, "logits", res.seconds)
    table(rows, ["accuracy", "teacher_accuracy", "agreement", "kl"], {})


def table(rows: list, keys: list[str], targets: dict[str, float]) -> None:
    print()
    print("| stage | " + " | ".join(keys) + " | seconds |")
    print("|---|" + "---|" * (len(keys) + 1))
    for name, metrics, seconds in rows:
        cells = []
        for k in keys:
            v = metrics.get(k, float("nan"))
            gap = f" ({v - targets[k]:+.3f} vs target {targets[k]})" if k in targets and name.startswith("after ") and "steps" in name else ""
            cells.append(f"{v:.4f}{gap}")
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits", action="store_true", help="the digits teacher instead of MiniLM")
    p.add_argument("--effnet", action="store_true", help="EfficientNet-Lite0 (real ImageNet weights) instead of MiniLM")
    p.add_argument("--flops-ratio", type=float, default=None, help="a whole-model FLOPs budget instead of one keep")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--granularity", default="token")
    p.add_argument("--select", choices=[*mc.kind_names(), "auto"], default=None,
                   help="which neurons the masks pick (default: auto under --flops-ratio, else output)")
    p.add_argument("--adaptive", action="store_true", help="adaptive masks (a calibrated threshold, keep on average)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layer-weight", type=float, default=0.0)
    p.add_argument("--train", default="all",
                   help="what trains: gates, midl, lora, bias, norms, all (the default), full or a comma list")
    p.add_argument("--base-lr", type=float, default=1e-5, help="learning rate of the original weights with --train full")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--block-weight", type=float, default=0.0, help="weight of the block-by-block loss against the teacher")
    p.add_argument("--no-whiten", action="store_true")
    p.add_argument("--sensitivity", action="store_true",
                   help="MiniLM, effnet: gates fitted to each layer's error weighted by its reach to the output (calibrate(output=...))")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--eval", type=int, default=512, help="held-out sentences")
    p.add_argument("--eval-images", type=int, default=256, help="effnet: held-out crops")
    p.add_argument("--oracle", action="store_true",
                   help="MiniLM, effnet: also each stage with oracle gates (the true top-k of the light path's error)")
    p.add_argument("--alone", action="store_true", help="effnet: also each converted layer alone, calibrated")
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    (digits if args.digits else effnet if args.effnet else minilm)(args)


if __name__ == "__main__":
    main()
