"""One decode step's layers, timed as the time budget times them: hot and over a model's working set.

At batch-1 decoding every Linear gets one row, so a layer reads its whole weight for two FLOPs per
weight. Whether that read comes from the CPU's cache or from memory decides what skipping columns
buys. This table times each decoder shape with ``latency.time_options`` (the function the
``--speedup`` budget uses): the dense layer against input-side MID-L at two keeps (rank 0) and the
output side at keep 0.7, first alone and hot (working set 0: its weights stay in cache between
calls), then as copies holding as many bytes as the whole model's fp32 weights, called in turn.

    python benchmarks/decode_layers.py                   # SmolLM2-135M's shapes, 0.54 GB working set
    python benchmarks/decode_layers.py --model 1b        # TinyLlama-1.1B's shapes (1 GiB, the cap)

"limit" is the traffic bound at that keep, 1 / keep (rank 0); "share" is the speed-up over it.
"""
from __future__ import annotations

import argparse

import torch

from midl_convert import latency
from midl_convert.surgery import LayerPlan

MODELS = {  # (in, out) of each decoder Linear; weights in fp32 bytes (all parameters, tied head once)
    "smollm2": ([(576, 576), (576, 192), (576, 1536), (1536, 576)], 134_515_008 * 4),
    "1b": ([(2048, 2048), (2048, 256), (2048, 5632), (5632, 2048)], 1_100_048_384 * 4),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=latency.REPEATS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes, weights = MODELS[args.model]
    options = [("input", 0.5, 0), ("input", 0.7, 0), ("output", 0.7, 8)]
    print(f"{args.model}: batch-1 decode, {args.threads} threads, median of {args.repeats} interleaved rounds; "
          f"working set: hot (0) or the model's weights ({weights / 2**30:.2f} GiB, capped at "
          f"{latency.MAX_WORKING_SET / 2**30:.0f} GiB)\n")
    print("| layer (in x out) | working set | dense µs | " + " | ".join(f"{s} keep {k}, rank {r}: µs (speed-up)" for s, k, r in options)
          + " | input keep 0.5: share of limit |")
    print("|---|---|---|" + "---|" * len(options) + "---|")
    for fan_in, fan_out in shapes:
        shape = latency.LayerShape("linear", fan_in, fan_out, bias=False)
        plans = [LayerPlan("x", "linear", fan_in, fan_out, 0, True, keep=k, rank=r, granularity="token", side=s)
                 for s, k, r in options]
        for label, ws in (("hot", 0), ("model", weights)):
            dense, times = latency.time_options(shape, (1, 1, fan_in), plans, use_cache=False, repeats=args.repeats,
                                                working_set=ws)
            cells = " | ".join(f"{t * 1e6:.1f} ({dense / t:.2f}x)" for t in times)
            print(f"| {fan_in} x {fan_out} | {label} | {dense * 1e6:.1f} | {cells} | {dense / times[0] / 2:.2f} |", flush=True)


if __name__ == "__main__":
    main()
