"""MID-L against two training-free peers at equal FLOPs on the real MiniLM: what input-dependence buys.

- static: magnitude pruning of output neurons, the same rows for every input (the rows with the
  largest norms stay; the others give their bias). This is a rank-0 MID-L layer with its static gate.
- teal: TEAL-style activation sparsity, each token's input entries below a per-layer magnitude
  threshold set to zero, so those columns of W are skipped; the threshold is calibrated to keep
  the share of columns that matches the FLOPs.
- midl: MID-L at keep 0.5 and the given rank, calibrated in closed form (no training for anyone).

Every method converts the same 36 encoder Linears at the same converted-layer FLOPs ratio (MID-L's
own, gate and light path counted). Quality: cosine to the teacher's sentence embeddings and top-10
retrieval overlap on held-out sentences. Speed: one 768x3072 layer at batch 1 with stock torch
implementations of each (static: a dense Linear of the kept rows plus a scatter; teal: threshold,
gather the kept columns, GEMV; midl: the layer's own eval path), medians of interleaved runs.

    python benchmarks/peers.py
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import midl_convert as mc
from midl_convert.flops import model_flops
from midl_convert.quality import compare


class TealLinear(nn.Module):
    """A Linear whose input entries with magnitude below ``threshold`` are dropped (columns skipped)."""

    def __init__(self, linear: nn.Linear, threshold: float) -> None:
        super().__init__()
        self.linear, self.threshold = linear, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.where(x.abs() >= self.threshold, x, torch.zeros_like(x)))


def teal(model: nn.Module, paths: list[str], batches, density: float) -> None:
    """Replace each Linear in ``paths`` with TEAL thresholding at ``density`` (share of input entries kept)."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    hooks = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: seen[p].append(a[0].detach().abs().flatten()))
             for p in paths]
    with torch.no_grad():
        for b in batches:
            model(**b.inputs)
    for h in hooks:
        h.remove()
    for p in paths:
        mags = torch.cat(seen[p])
        threshold = mags.kthvalue(max(1, int((1 - density) * mags.numel()))).values.item()
        parent, _, name = p.rpartition(".")
        setattr(model.get_submodule(parent), name, TealLinear(model.get_submodule(p), threshold))


def median_us(fn, x, repeats: int = 200) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(20):
            fn(x)
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def layer_speed(rank: int, keep: float, density: float, teal_cols: int) -> dict[str, float]:
    torch.manual_seed(0)
    dense = nn.Linear(768, 3072)
    midl = mc.MIDLinear.from_linear(dense, keep=keep, rank=rank).eval()
    k = midl.k
    rows = dense.weight.norm(dim=1).topk(k).indices
    w_kept, b_kept = dense.weight[rows].contiguous(), dense.bias[rows].contiguous()

    def static(x):
        out = dense.bias.expand(x.shape[0], -1).clone()
        out[:, rows] = F.linear(x, w_kept, b_kept)
        return out

    w_t = dense.weight.T.contiguous()  # (in, out): kept input entries select rows of W^T

    def teal_fn(x):
        cols = x[0].abs().topk(teal_cols).indices  # stands in for a threshold that keeps this many
        return (x[:, cols] @ w_t[cols]) + dense.bias

    x = torch.randn(1, 768)
    fns = {"dense": dense, "static": static, "teal": teal_fn, "midl": midl}
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(5):  # interleaved rounds, so drift hits every method alike
        for n, fn in fns.items():
            samples[n].append(median_us(fn, x, 60))
    return {n: statistics.median(v) for n, v in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--rank", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = mc.load_model("sentence-transformers/all-MiniLM-L6-v2")
    teacher = loaded.model
    data = mc.load_data("builtin:text", loaded)
    held = data.heldout_batches(64, limit=args.eval)
    calib = [data.train_batch(1_000_000 + i, 16) for i in range(4)]
    cfg = mc.MIDLConfig(keep=args.keep, rank=args.rank, exclude=["pooler.dense"])
    midl = copy.deepcopy(teacher)
    _, plan = mc.convert(midl, cfg, loaded.example_inputs)
    flops = model_flops(midl, teacher, loaded.example_inputs)
    ratio = flops.converted_ratio
    mc.calibrate(midl, calib)
    adaptive = copy.deepcopy(teacher)
    mc.convert(adaptive, cfg.model_copy(update={"adaptive": True}), loaded.example_inputs)
    mc.calibrate(adaptive, calib)
    adaptive_ratio = model_flops(adaptive, teacher, loaded.example_inputs).converted_ratio
    paths = [lp.path for lp in plan.converted]
    static = copy.deepcopy(teacher)
    mc.convert(static, mc.MIDLConfig(keep=min(1.0, 1 / ratio), rank=0, exclude=["pooler.dense"]), loaded.example_inputs)
    density = 1 / ratio
    tealed = copy.deepcopy(teacher)
    teal(tealed, paths, calib, density)
    print(f"MiniLM, {len(paths)} encoder Linears at the same converted-layer FLOPs ratio {ratio:.3f}x "
          f"(MID-L keep {args.keep}, rank {args.rank}; static keep {1 / ratio:.3f}; TEAL column density {density:.3f})")
    speed = layer_speed(args.rank, args.keep, density, round(768 * density))
    print()
    print("| method | cosine | top-10 overlap | 768x3072 layer, batch 1 (µs) | vs dense |")
    print("|---|---|---|---|---|")
    print(f"| dense | 1.000 | 1.000 | {speed['dense']:.0f} | 1.00x |")
    for name, model in (("static magnitude pruning", static), ("TEAL activation sparsity", tealed), ("MID-L (calibrated)", midl)):
        m = compare(model, teacher, held, "embedding")
        key = {"static magnitude pruning": "static", "TEAL activation sparsity": "teal", "MID-L (calibrated)": "midl"}[name]
        print(f"| {name} | {m['cosine']:.3f} | {m['top10_overlap']:.3f} | {speed[key]:.0f} | {speed['dense'] / speed[key]:.2f}x |",
              flush=True)
    m = compare(adaptive, teacher, held, "embedding")
    print(f"| MID-L adaptive masks (calibrated; {adaptive_ratio:.3f}x on the example input) | {m['cosine']:.3f} | "
          f"{m['top10_overlap']:.3f} | not timed | |", flush=True)


if __name__ == "__main__":
    main()
