"""What a decode step's Linear calls cost, by the share of each weight they read.

One SmolLM2-135M decode step calls ``midl::input_rows`` on 210 decoder Linears, one row each. This
calls the op the same way, on random weights of the model's shapes in the model's order (30 layers
of q, k, v, o, gate, up, down; the same bytes as the model's, which stay in this machine's 480 MiB
L3), with top-k masks at each ``--keeps`` share (1 is the dense path that ``Bf16Linear`` and
``Int8Linear`` take). The models take turns within each round; the median over rounds is printed.
A line through the per-call times splits them into a cost per call (selection, the op's dispatch,
the OpenMP region) and a cost per share of the weight read: what keep can and cannot save.

    python benchmarks/call_cost.py                       # bfloat16, 2 threads
    python benchmarks/call_cost.py --dtype int8 --threads 1
    python benchmarks/call_cost.py --picks contiguous   # each call's picks one block of neighbouring rows

``--picks scattered`` (the default) gives each call a random input, so its top-k rows lie scattered
over ``W^T``; ``contiguous`` gives inputs that fall with the index, so the k picked rows are the first k.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from midl_convert import kernels
from midl_convert.weight_dtype import quantize_rows

LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # (in, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "int8"], default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--keeps", default="1,0.75,0.5,0.25,0.01")
    p.add_argument("--picks", choices=["scattered", "contiguous"], default="scattered")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.fused_kernel() is None:
        raise SystemExit("the C++ kernel is not built here (no compiler, or MIDL_NO_KERNEL=1): nothing to time")
    g = torch.Generator().manual_seed(0)
    act = torch.float32 if args.dtype in ("float32", "int8") else torch.bfloat16
    calls = []
    for _ in range(args.layers):
        for n_in, n_out in LAYER:
            w = torch.randn(n_out, n_in, generator=g)
            if args.dtype == "int8":
                q, scale = quantize_rows(w)
                wt, wscale = q.T.contiguous(), scale
            else:
                wt, wscale = w.T.contiguous().to(act), None
            x = torch.randn(1, n_in, generator=g) if args.picks == "scattered" else torch.linspace(2, 1, n_in)[None]
            calls.append((x.to(act), wt, wscale, torch.ones(n_in)))
    none = {n: torch.zeros(0, n, dtype=act) for n in (576, 1536)}
    bias = torch.empty(0, dtype=act)
    keeps = [float(k) for k in args.keeps.split(",")]

    def step(keep: float) -> None:
        for x, wt, wscale, ones in calls:
            n = x.shape[1]
            torch.ops.midl.input_rows.default(x, wt, bias, none[n], none[n].T, ones, max(1, round(keep * n)), math.nan,
                                              wscale)

    times = {k: [] for k in keeps}
    for k in keeps:
        step(k)  # warm
    for _ in range(args.repeats):
        for k in keeps:
            start = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e6 / len(calls) for k, v in times.items()}
    slope, intercept = statistics.linear_regression(list(med), list(med.values()))
    mib = sum(c[1].numel() * c[1].element_size() for c in calls) / 2**20
    print(f"{len(calls)} calls of one row, {args.dtype} weights ({mib:.0f} MiB), {args.picks} picks, {args.threads} threads, "
          f"median of {args.repeats} interleaved rounds")
    print("| keep | µs per call | ms per step | speed-up over keep 1 | limit 1 / keep |")
    print("|---|---|---|---|---|")
    dense = med.get(1.0)
    for k, us in med.items():
        up = f"{dense / us:.2f}x" if dense else ""
        print(f"| {k:g} | {us:.1f} | {us * len(calls) / 1e3:.2f} | {up} | {1 / k:.2f}x |")
    print(f"\nfit over the keeps: {intercept:.1f} µs per call + {slope:.1f} µs x keep "
          f"(the per-call part is {intercept / (intercept + slope):.0%} of a dense call)")


if __name__ == "__main__":
    main()
