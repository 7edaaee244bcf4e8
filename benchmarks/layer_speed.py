"""Speed of one converted layer against the dense layer it replaces, on the CPU, in eval.

Shapes: resnet50's 1x1 convs at their real pixel counts, ViT-S and BERT-base MLPs, a 7B decoder
MLP. Batch 1 is one token for a Linear (a mask per token: the fused kernel) and one image for a
conv (one mask for all its pixels: the sparse path); the larger batch is 32 tokens with a mask
each, or 8 images with a mask each. Dense and MID-L calls alternate in one process so drift hits
both; the table shows medians. "limit", for single rows (where reading the weights is the cost),
is the memory-traffic bound 1 / (keep + r (in + 2 out) / (in out)): MID-L reads keep * out rows
of W, and V, G and U, where dense reads all of W.

    python benchmarks/layer_speed.py                 # all shapes, keep 0.25 / 0.5 / 0.75
    python benchmarks/layer_speed.py --quick --threads 1
    python benchmarks/layer_speed.py --input-only    # the input-side kernel alone

The input-side table times the ``midl::input_rows`` op (keep 0.5, rank 0, one token) against
``F.linear``: it reads the k picked columns of W, stored transposed so that each is contiguous,
so its limit is 1 / (keep + r (in + out) / (in out)) and the last column is the share of it reached.

On a machine shared with other CPU-heavy work, use --threads 1 or OMP_WAIT_POLICY=passive: with
OpenMP's spinning waits every multi-threaded op there, dense ones included, stalls for a
scheduler slice (measured: torch.add on 1M floats, 2 threads, 8 ms instead of 0.15 ms).
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from midl_convert.kernels import fused_kernel
from midl_convert.kinds.output.layer import OutputMIDLConv2d, OutputMIDLinear
from midl_convert.runtime import interleaved_rounds


@dataclass(frozen=True)
class Shape:
    name: str
    in_features: int
    out_features: int
    pixels: int = 0  # side of the feature map for a 1x1 conv; 0 for a Linear
    quick: bool = False  # one of the few shapes --quick runs

    @property
    def is_conv(self) -> bool:
        return self.pixels > 0


SHAPES = [
    *(Shape("resnet50 1x1", i, o, side, quick=i == 1024) for i, o, side in [
        (256, 64, 56), (64, 256, 56), (512, 128, 28), (128, 512, 28),
        (1024, 256, 14), (256, 1024, 14), (2048, 512, 7), (512, 2048, 7),
    ]),
    Shape("ViT-S fc1", 384, 1536, quick=True), Shape("ViT-S fc2", 1536, 384),
    Shape("BERT-base fc1", 768, 3072, quick=True), Shape("BERT-base fc2", 3072, 768, quick=True),
    Shape("7B decoder MLP", 4096, 11008),
]
RANK = 32
INPUT_SHAPES = [(768, 3072), (3072, 768), (4096, 11008), (576, 1536)]  # in x out, for the input-side kernel
INPUT_BYTES = 64 << 20  # distinct inputs per row of the table, at most 16, taken in turn


def cpu_name() -> str:
    """The CPU model as the OS reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def traffic_limit(keep: float, shape: Shape) -> float:
    """Most a single row can gain: bytes of W, V, G and U read, relative to dense's W."""
    i, o = shape.in_features, shape.out_features
    return 1.0 / (keep + RANK * (i + 2 * o) / (i * o))


def interleaved(fns: list[Callable[[], object]], repeats: int, warmup: int) -> list[float]:
    """Median microseconds of each function over ``interleaved_rounds``, after ``warmup`` untimed rounds."""
    interleaved_rounds(fns, warmup)
    return [statistics.median(t) * 1e6 for t in interleaved_rounds(fns, repeats)]


def build(shape: Shape) -> tuple[nn.Module, nn.Module]:
    """The dense layer and its MID-L conversion (rank 32; keep is set per row)."""
    torch.manual_seed(0)
    if shape.is_conv:
        dense = nn.Conv2d(shape.in_features, shape.out_features, 1)
        return dense.eval(), OutputMIDLConv2d.from_conv(dense, keep=0.5, rank=RANK, granularity="sample").eval()
    dense = nn.Linear(shape.in_features, shape.out_features)
    return dense.eval(), OutputMIDLinear.from_linear(dense, keep=0.5, rank=RANK, granularity="token").eval()


def inputs(shape: Shape) -> list[tuple[str, list[torch.Tensor]]]:
    """(label, inputs) for batch 1 and the larger batch. Several different inputs, taken in turn:
    the same input every call would let the branch predictor learn the top-k selection."""
    batches = [(1, "1 image"), (8, "8 images")] if shape.is_conv else [(1, "1 token"), (32, "32 tokens")]
    out = []
    for batch, label in batches:
        size = (batch, shape.in_features, shape.pixels, shape.pixels) if shape.is_conv else (batch, shape.in_features)
        variants = max(2, min(16, INPUT_BYTES // (4 * torch.Size(size).numel())))
        side = f" {shape.pixels}x{shape.pixels}" if shape.is_conv else ""
        out.append((label + side, [torch.randn(size) for _ in range(variants)]))
    return out


def in_turn(fn: Callable[[torch.Tensor], object], xs: list[torch.Tensor]) -> Callable[[], object]:
    """A call of ``fn`` on the next of ``xs``, round robin."""
    turn = itertools.cycle(xs)
    return lambda: fn(next(turn))


def table_rows(shape: Shape, keeps: list[float], repeats: int, warmup: int) -> Iterator[str]:
    """One markdown row per batch and keep: times, speedup, limit and the path MID-L took."""
    dense, layer = build(shape)
    for label, xs in inputs(shape):
        x = xs[0]
        for keep in keeps:
            layer.keep = keep
            path = layer.compute_route(layer.groups_of(x))
            t_dense, t_midl = interleaved([in_turn(dense, xs), in_turn(layer, xs)], repeats, warmup)
            single = not shape.is_conv and x.shape[0] == 1
            limit = f"{traffic_limit(keep, shape):.2f}x" if single else "–"
            yield (f"| {shape.name} | {shape.in_features}x{shape.out_features} | {label} | {keep} | "
                   f"{t_dense:.0f} | {t_midl:.0f} | {t_dense / t_midl:.2f}x | {limit} | {path} |")


def input_side(in_f: int, out_f: int, keep: float, rank: int) -> tuple[Callable, Callable]:
    """Dense ``F.linear`` and the input-side op on the same random layer (scale: W's column norms)."""
    torch.manual_seed(0)
    w, b = torch.randn(out_f, in_f) / in_f**0.5, torch.randn(out_f)
    wt, scale = w.T.contiguous(), w.norm(dim=0)
    v, u = torch.randn(rank, in_f) / in_f**0.5, torch.randn(out_f, rank) / max(rank, 1) ** 0.5
    k, op = max(1, round(keep * in_f)), torch.ops.midl.input_rows.default
    return (lambda x: F.linear(x, w, b)), (lambda x: op(x, wt, b, v, u, scale, k, float("nan")))


def input_rows_table(keep: float, rank: int, repeats: int, warmup: int) -> Iterator[str]:
    """One markdown row per input-side shape at batch 1: times, speedup, traffic limit, share of it."""
    for in_f, out_f in INPUT_SHAPES:
        dense, sparse = input_side(in_f, out_f, keep, rank)
        xs = [torch.randn(1, in_f) for _ in range(16)]
        t_dense, t_input = interleaved([in_turn(dense, xs), in_turn(sparse, xs)], repeats, warmup)
        limit = 1.0 / (keep + rank * (in_f + out_f) / (in_f * out_f))
        speedup = t_dense / t_input
        yield (f"| {in_f}x{out_f} | {keep} | {rank} | {t_dense:.0f} | {t_input:.0f} | {speedup:.2f}x | "
               f"{limit:.2f}x | {speedup / limit:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four shapes and fewer repeats, for development")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 50, quick 20)")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--input-only", action="store_true", help="only the input-side kernel table")
    parser.add_argument("--input-keep", type=float, default=0.5, help="keep of the input-side table (default 0.5)")
    parser.add_argument("--input-rank", type=int, default=0, help="rank of the input-side table (default 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (20 if args.quick else 50)
    shapes = [s for s in SHAPES if s.quick or not args.quick]
    kernel = "built" if fused_kernel() is not None else "unavailable (pure torch paths)"
    print(f"Machine: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"fused kernel {kernel}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"Rank {RANK}; medians of {repeats} interleaved calls after 5 warm-up calls, torch.inference_mode, "
          "inputs changing every call.\n")
    with torch.inference_mode():
        if not args.input_only:
            print("| layer | in x out | batch | keep | dense µs | MID-L µs | speedup | limit | path |")
            print("|---|---|---|---|---|---|---|---|---|")
            for shape in shapes:
                for row in table_rows(shape, args.keeps, repeats, warmup=5):
                    print(row, flush=True)
            print()
        print("Input side, 1 token: F.linear against midl::input_rows.\n")
        print("| in x out | keep | rank | dense µs | input kernel µs | speedup | limit | share of limit |")
        print("|---|---|---|---|---|---|---|---|")
        for row in input_rows_table(args.input_keep, args.input_rank, repeats, warmup=5):
            print(row, flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
