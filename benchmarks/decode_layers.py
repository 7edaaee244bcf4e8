"""One decode step's layers, timed as the time budget times them: hot and over a model's working set.

At batch-1 decoding every Linear gets one row, so a layer reads its whole weight for two FLOPs per
weight. Whether that read comes from the CPU's cache or from memory decides what skipping columns
buys. This table times each decoder shape with ``latency.time_options`` (the function the
``--speedup`` budget uses): the dense layer against input-side MID-L at two keeps (rank 0) and the
output side at keep 0.7, first alone and hot (working set 0: its weights stay in cache between
calls), then as copies holding as many bytes as the whole model's fp32 weights, called in turn.

    python benchmarks/decode_layers.py                   # SmolLM2-135M's shapes, 0.54 GB working set
    python benchmarks/decode_layers.py --model 1b        # TinyLlama-1.1B's shapes (1 GiB, the cap)
    python benchmarks/decode_layers.py --dtype int8 --options input:0.5:0 --shapes 576x1536,1536x576,2048x5632

"limit" is the traffic bound at that keep, 1 / keep (rank 0); "share" is the speed-up over it, both
against the dense layer in the same dtype. With ``--dtype bfloat16`` or ``int8`` the table adds the
dense float32 layer's time (timed in its own run) and "share of fp32 bandwidth": the time a layer
streaming ``keep`` of its weights at that dtype's bytes per weight (2, 1) would take at the dense
float32 layer's rate, over the time measured (1.0: reads as fast as dense float32 streams memory).
"""
from __future__ import annotations

import argparse

import torch

from midl_convert import latency
from midl_convert.surgery import LayerPlan
from midl_convert.weight_dtype import WEIGHT_DTYPES

MODELS = {  # (in, out) of each decoder Linear; weights in fp32 bytes (all parameters, tied head once)
    "smollm2": ([(576, 576), (576, 192), (576, 1536), (1536, 576)], 134_515_008 * 4),
    "1b": ([(2048, 2048), (2048, 256), (2048, 5632), (5632, 2048)], 1_100_048_384 * 4),
}
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}  # per weight


def option(text: str) -> tuple[str, float, int]:
    select, keep, rank = text.split(":")
    return select, float(keep), int(rank)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=latency.REPEATS)
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32", help="weights of the dense layer and the options")
    p.add_argument("--options", default="input:0.5:0,input:0.7:0,output:0.7:8", help="select:keep:rank, comma-separated")
    p.add_argument("--shapes", default=None, help="INxOUT,... instead of the model's (its working set is kept)")
    p.add_argument("--working-sets", default="hot,model", help="hot (weights stay in cache), model (the model's bytes)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes, weights = MODELS[args.model]
    if args.shapes:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    weights = weights * BYTES[args.dtype] // 4
    options = [option(o) for o in args.options.split(",")]
    extra = args.dtype != "float32"
    print(f"{args.model}: batch-1 decode, {args.dtype} weights, {args.threads} threads, median of {args.repeats} "
          f"interleaved rounds; working set: hot (0) or the model's weights in {args.dtype} ({weights / 2**30:.2f} GiB, "
          f"capped at {latency.MAX_WORKING_SET / 2**30:.0f} GiB)\n")
    first = options[0]
    print("| layer (in x out) | working set | dense µs | " + " | ".join(f"{s} keep {k}, rank {r}: µs (speed-up)" for s, k, r in options)
          + f" | {first[0]} keep {first[1]}: share of limit |" + (" dense fp32 µs | share of fp32 bandwidth |" if extra else ""))
    print("|---|---|---|" + "---|" * len(options) + "---|" + ("---|---|" if extra else ""))
    for fan_in, fan_out in shapes:
        shape = latency.LayerShape("linear", fan_in, fan_out, bias=False)
        plans = [LayerPlan("x", "linear", fan_in, fan_out, 0, True, keep=k, rank=r, granularity="token", select=s)
                 for s, k, r in options]
        for label in args.working_sets.split(","):
            ws = 0 if label == "hot" else weights
            dense, times = latency.time_options(shape, (1, 1, fan_in), plans, use_cache=False, repeats=args.repeats,
                                                working_set=ws, weight_dtype=args.dtype)
            cells = " | ".join(f"{t * 1e6:.1f} ({dense / t:.2f}x)" for t in times)
            row = f"| {fan_in} x {fan_out} | {label} | {dense * 1e6:.1f} | {cells} | {dense / times[0] * first[1]:.2f} |"
            if extra:
                fp32, _ = latency.time_options(shape, (1, 1, fan_in), [], use_cache=False, repeats=args.repeats,
                                               working_set=ws * 4 // BYTES[args.dtype])
                limit = fp32 * first[1] * BYTES[args.dtype] / 4
                row += f" {fp32 * 1e6:.1f} | {limit / times[0]:.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
