"""Where a lean decode step's time goes: ``torch.profiler`` over greedy decoding of SmolLM2.

The tokens/s of ``generate.py`` say how fast; this says what a step spends it on, so a change can
be aimed: the sparse layers (``midl::input_rows``, which also serves ``Int8Linear``), the compiled
graph's own kernels (norms, rotary embedding, attention), dynamo's per-call checks, and the
uncompiled prompt (its masked GEMMs and selections).

    python benchmarks/decode_profile.py --weight-dtype int8                      # the dense model
    python benchmarks/decode_profile.py --weight-dtype int8 --keep 0.7 --adaptive  # converted, input side, rank 0

The converted model is input side at rank 0, uncentred (a run's default on a causal LM with
adaptive masks), calibrated on one batch of Python's help text. Self CPU times are over one
``generate`` call: the prompt once and ``--new-tokens`` - 1 compiled steps.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

import midl_convert as mc
from midl_convert.decoding import LeanDecoder

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weight-dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--keep", type=float, default=None, help="convert at this keep (default: the dense model)")
    p.add_argument("--adaptive", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--rows", type=int, default=12, help="ops listed")
    p.add_argument("--by-shape", action="store_true", help="one line per op and input shapes (the prompt's calls apart)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = mc.load_model(MODEL)
    model = copy.deepcopy(loaded.model)
    if args.keep is not None:
        mc.convert(model, mc.MIDLConfig(keep=args.keep, rank=0, select="input", centre="none", adaptive=args.adaptive),
                   loaded.example_inputs)
        data = mc.load_data("builtin:text", loaded, seed=0)
        mc.calibrate(model, [data.train_batch(100, 8)])
    model = mc.set_weight_dtype(model, args.weight_dtype).eval()
    ids = torch.randint(100, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    lean = LeanDecoder(model, max_tokens=args.prompt_tokens + args.new_tokens + 8)
    print(f"compiled in {lean.warm_up(ids):.0f}s", flush=True)
    start = time.perf_counter()
    lean.generate(ids, args.new_tokens)
    seconds = time.perf_counter() - start
    print(f"{args.weight_dtype}, {'dense' if args.keep is None else f'keep {args.keep}'}: {args.new_tokens} tokens "
          f"in {seconds * 1e3:.0f} ms ({args.new_tokens / seconds:.1f} tokens/s, prompt included), unprofiled")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        lean.generate(ids, args.new_tokens)
    table = prof.key_averages(group_by_input_shape=args.by_shape)
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40,
                      max_shapes_column_width=60))


if __name__ == "__main__":
    main()
