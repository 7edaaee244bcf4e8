"""The input side's masked path for many rows (a prompt, a sentence: each row its own mask) against
the dense layer it replaces, in float32 and bfloat16, on SmolLM2's decoder shapes.

Rows above the kernel's few (8) run ``midl::input_rows`` as one selection pass (C++: top-k or the
adaptive threshold, zeroing the inputs a row does not pick) and one GEMM on W^T, stored ``(in, out)``
for the decode kernel. "dense" is ``F.linear`` on the usual ``(out, in)`` weight; "same GEMM" is the
GEMM alone on the ``(in, out)`` storage, so the table splits the masked path's cost into storage and
selection. Issue 28 asks for at most 1.15x of dense.

    python benchmarks/many_rows.py
    python benchmarks/many_rows.py --rows 15 32 --threads 2 --repeats 200
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F

from midl_convert import kernels
from midl_convert.runtime import interleaved_rounds

SHAPES = [(576, 1536), (1536, 576), (576, 576)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[15, 32])
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200, help="interleaved rounds (medians)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"kernel: {'built' if kernels.fused_kernel() is not None else 'NOT built (torch fallback)'}; "
          f"{args.threads} threads, keep {args.keep}, medians of {args.repeats} interleaved calls, µs")
    print("| rows | in x out | dtype | dense (out, in) | same GEMM on (in, out) | adaptive masks | / dense | top-k masks | / dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        for i, o in SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                w = torch.randn(o, i).to(dtype)
                wt = w.T.contiguous()
                x = torch.randn(rows, i).to(dtype)
                scale = torch.rand(i) + 0.5
                threshold = float((x.float().abs() * scale).quantile(1 - args.keep))  # keeps about `keep` of the inputs
                k = int(args.keep * i)
                none, v, u = torch.empty(0, dtype=dtype), torch.empty(0, i, dtype=dtype), torch.empty(o, 0, dtype=dtype)
                op = torch.ops.midl.input_rows.default
                fns = [lambda: F.linear(x, w), lambda: torch.mm(x, wt),
                       lambda: op(x, wt, none, v, u, scale, k, threshold), lambda: op(x, wt, none, v, u, scale, k, math.nan)]
                for f in fns:
                    f()
                dense, same, adaptive, top = (statistics.median(t) * 1e6 for t in interleaved_rounds(fns, args.repeats, 4))
                print(f"| {rows} | {i} x {o} | {str(dtype).removeprefix('torch.')} | {dense:.1f} | {same:.1f} | {adaptive:.1f} "
                      f"| {adaptive / dense:.2f}x | {top:.1f} | {top / dense:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
