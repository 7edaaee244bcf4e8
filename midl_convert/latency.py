"""Measured time: what each layer option costs on this machine, at the model's real call shape.

FLOPs do not say what a CPU runs fast. Per-token masks on a 16-token sentence run as dense compute
plus masking, slower than the dense layer; batch-1 decoding through a fused kernel saves memory
traffic one for one. So under ``MIDLConfig(speedup=...)`` the budget spends measured seconds:

- the call shape is batch-1 decode for a causal LM (each Linear gets one row), else the shapes the
  example input gives each layer;
- each distinct (layer shape, call shape, option) is timed once, as the median of interleaved runs
  against the dense layer, in eval under ``torch.inference_mode()`` with the run's thread count;
- times are cached on disk beside the budget's measurements, keyed by the CPU, its instruction
  set, the thread count, the torch version and the kernel's source version, so another machine
  (or a rebuilt kernel) never reads them.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .decoding import LeanDecoder, supports_static_cache
from .errors import MIDLError
from .files import cache_dir, write_atomic
from .kernels import KERNEL_VERSION
from .kinds import build_layer
from .llama_cpp_peer import gguf_format, start_peer
from .running import run_model, watching
from .sparse import new_conv1d, sparse_layers
from .weight_dtype import set_weight_dtype
from .runtime import interleaved_rounds, weight_bytes

CACHE_VERSION = 5  # 2: over the model's working set, each option against dense; 3: copies warmed, built outside inference mode;
# 4: entries say select and module_type (format 2, migrate.py): older entries are simply not read;
# 5: a dense bfloat16 layer is a Bf16Linear
REPEATS = 15  # interleaved rounds per timing; the median is kept
SAMPLE_S = 1e-3  # one timed sample repeats the call until it lasts about this long (timer resolution, call overhead)
MAX_CALLS = 2000  # ... but never more calls than this per sample
MAX_WORKING_SET = 1 << 30  # bytes of layer copies a timing cycles through at most (past any CPU cache)
MAX_COPIES = 4096
DECODE = "batch-1 decode (one row per Linear)"
GENERATE_TOKENS = 16  # new tokens of the generation that measures a causal LM's tokens/s
LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # the Hugging Face classes that decode token by token


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face decoder that generates token by token (its real call is batch-1 decode)."""
    return type(model).__name__.endswith(LM_SUFFIXES) and hasattr(model, "generate")


# ----- the cache -------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None = None, cpu: str | None = None) -> dict[str, Any]:
    """What a time depends on besides the layer: CPU, instruction set, threads, torch and the kernel's source."""
    return {"cpu": cpu if cpu is not None else cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": threads if threads is not None else torch.get_num_threads(), "torch": torch.__version__,
            "kernel": KERNEL_VERSION}


def cache_key(entry: dict[str, Any], threads: int | None = None, cpu: str | None = None) -> str:
    """Hash of one timing: the layer, call shape and option in ``entry``, on this machine."""
    text = json.dumps({"v": CACHE_VERSION, "machine": machine(threads, cpu), "entry": entry}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_file() -> Path:
    return cache_dir() / "latency.json"


def _read_cache() -> dict[str, float]:
    try:
        data = json.loads(cache_file().read_text())
        return {k: float(v) for k, v in data.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _write_cache(new: dict[str, float]) -> None:
    """Merge ``new`` into the cache file and replace it atomically (a read-only cache costs only time)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({**_read_cache(), **new}, sort_keys=True))
    except OSError:
        pass


# ----- timing ----------------------------------------------------------------------------------
def interleaved(fns: Sequence[Callable[[], Any]], repeats: int = REPEATS) -> list[float]:
    """Median seconds per call of each function, warmed first, over ``interleaved_rounds`` of enough calls
    per sample to last about ``SAMPLE_S``."""
    for f in fns:  # warm: thread pools, caches, lazily built kernels
        f()
        f()
    start = time.perf_counter()
    fns[0]()
    once = time.perf_counter() - start
    calls = max(1, min(MAX_CALLS, int(SAMPLE_S / max(once, 1e-7))))
    return [statistics.median(t) for t in interleaved_rounds(fns, repeats, calls)]


@dataclass(frozen=True)
class LayerShape:
    """What a layer's time depends on besides its option: module type, sizes, bias, conv geometry."""

    module_type: str  # "linear", "conv1d" (HF, transposed) or "conv2d" (1x1)
    in_features: int
    out_features: int
    bias: bool
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, module: nn.Module, module_type: str, in_features: int, out_features: int) -> "LayerShape":
        return cls(module_type, in_features, out_features, module.bias is not None,
                   tuple(getattr(module, "stride", (1, 1))), tuple(getattr(module, "padding", (0, 0))))

    def dense(self) -> nn.Module:
        """A dense module of this shape with random weights (times do not depend on the values)."""
        if self.module_type == "conv2d":
            return nn.Conv2d(self.in_features, self.out_features, 1, self.stride, self.padding, bias=self.bias)
        if self.module_type == "conv1d":
            return new_conv1d(self.in_features, self.out_features, 0.02 * torch.randn(self.out_features, self.in_features),
                              torch.zeros(self.out_features) if self.bias else None)
        return nn.Linear(self.in_features, self.out_features, bias=self.bias)


def _entry(shape: LayerShape, call: tuple[int, ...], option: Any) -> dict[str, Any]:
    settings = {k: getattr(option, k) for k in ("select", "keep", "rank", "granularity", "adaptive")} if option else "dense"
    return {"layer": asdict(shape), "call": list(call), "option": settings}




def _copies(module: nn.Module, working_set: int) -> list[nn.Module]:
    """``module`` and enough deep copies that together they hold ``working_set`` bytes (at most
    ``MAX_COPIES``): calling them in turn meets the memory as the model's own pass does."""
    n = max(1, min(MAX_COPIES, -(-working_set // max(weight_bytes(module), 1))))
    return [module, *(copy.deepcopy(module) for _ in range(n - 1))]


def _in_turn(modules: list[nn.Module], x: torch.Tensor) -> Callable[[], Any]:
    """Call the copies in turn, each called once first: a sample may reach a copy only once, and a
    layer's first call (building what it remembers between calls) must not be what is timed."""
    for module in modules:
        module(x)
    turn = itertools.cycle(modules)
    return lambda: next(turn)(x)


def _in_dtype(module: nn.Module, weight_dtype: str) -> nn.Module:
    """``module`` with its weights in ``weight_dtype`` (a dense Linear becomes ``Bf16Linear`` or ``Int8Linear``)."""
    return set_weight_dtype(nn.Sequential(module), weight_dtype)[0]


def time_options(shape: LayerShape, call: tuple[int, ...], options: Sequence[Any], use_cache: bool = True,
                 repeats: int = REPEATS, working_set: int = 0, weight_dtype: str = "float32") -> tuple[float, list[float]]:
    """Seconds per call of the dense layer and of each option (a ``LayerPlan``) on an input of shape ``call``.

    ``working_set``: the bytes of weights the model reads per call. Each variant runs as that many
    bytes of copies called in turn, so a layer of a model larger than the CPU's cache is timed with
    its weights coming from memory, as in the model. Timed alone and hot, SmolLM2's 576x576 layers
    ran about 4x faster than in its decode step (``benchmarks/decode_layers.py``), and the input side's short column reads looked slower
    than dense where from memory they are faster. Each option is timed against the dense layer in
    its own interleaved run (two working sets in memory at a time); the dense time is their median.
    ``weight_dtype`` puts the dense layer and each option in that dtype (``weight_dtype.py``).
    """
    ws = 0 if working_set <= 0 else min(working_set, MAX_WORKING_SET)
    in_dtype = {} if weight_dtype == "float32" else {"weight_dtype": weight_dtype}  # float32 keeps the keys it had
    keys = [cache_key({**_entry(shape, call, o), "working_set_mb": ws >> 20, **in_dtype}) for o in [None, *options]]
    cached = _read_cache() if use_cache else {}
    if all(k in cached for k in keys):
        return cached[keys[0]], [cached[k] for k in keys[1:]]
    torch.manual_seed(0)
    # Layers built outside inference mode, as a model's are: an inference tensor has no version
    # counter, so a layer built from them recomputes what it would remember (see input_layers).
    with torch.no_grad():
        first = shape.dense().eval()
        dense = _copies(_in_dtype(copy.deepcopy(first), weight_dtype), ws)
    x = torch.randn(call, dtype=torch.bfloat16 if weight_dtype == "bfloat16" else torch.float32)
    dense_times, times = [], []
    for option in options:
        with torch.no_grad():
            layers = _copies(_in_dtype(build_layer(first, option, "random"), weight_dtype), ws)
        with torch.inference_mode():
            d, t = interleaved([_in_turn(dense, x), _in_turn(layers, x)], repeats)
        dense_times.append(d)
        times.append(t)
        del layers
    if not options:
        with torch.inference_mode():
            dense_times = interleaved([_in_turn(dense, x)], repeats)
    times = [statistics.median(dense_times), *times]
    if use_cache:
        _write_cache(dict(zip(keys, times)))
    return times[0], times[1:]


def decode_calls(in_features: int) -> list[tuple[int, ...]]:
    """The one call a Linear gets per generated token at batch 1."""
    return [(1, 1, in_features)]


# ----- the whole model -------------------------------------------------------------------------
def model_step(model: nn.Module, example_inputs: Any) -> Callable[[], Any]:
    """One call of ``model`` at its real shape: a batch-1 decode step after the example prompt, with
    the KV cache cropped back after each step, for a causal LM; a forward of the example input otherwise."""
    if not is_causal_lm(model):
        return lambda: run_model(model, example_inputs)
    import inspect

    ids = example_inputs["input_ids"][:1]
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5 renamed it
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "crop"):
        raise MIDLError(f"{type(model).__name__} returned no croppable KV cache; the decode step cannot be timed "
                        "(use flops_ratio instead of speedup for this model)")
    token = ids[:, -1:]

    def step() -> Any:
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache.crop(-1)  # drop the token just added (a negative count removes tokens in every transformers version)
        return out

    return step


@torch.inference_mode()
def model_time(model: nn.Module, example_inputs: Any, repeats: int = REPEATS) -> float:
    """Seconds per call of the whole model at its real shape (``model_step``)."""
    was_training = model.training
    model.eval()
    try:
        return interleaved([model_step(model, example_inputs)], repeats)[0]
    finally:
        model.train(was_training)


def end_to_end(teacher: nn.Module, student: nn.Module, example_inputs: Any, repeats: int = REPEATS,
               new_tokens: int = GENERATE_TOKENS, decoder: str = "lean", gguf: str | None = None) -> dict[str, Any]:
    """The dense and converted model timed interleaved at their real call shape; for a causal LM also
    tokens/s of a short greedy decode with the KV cache: through ``decoding.LeanDecoder`` (static
    cache, compiled step; compile seconds kept apart) where the model allows, else HF ``generate``.
    With ``gguf`` (the file the weights were read from), llama.cpp decodes that file in the same
    rounds: what a CPU user would run instead."""
    with torch.inference_mode():
        times = interleaved([model_step(teacher, example_inputs), model_step(student, example_inputs)], repeats)
    causal = is_causal_lm(student)
    out: dict[str, Any] = {
        "call": DECODE if causal else "example input", "threads": torch.get_num_threads(),
        "dense_ms": times[0] * 1e3, "converted_ms": times[1] * 1e3, "speedup": times[0] / times[1],
    }
    if causal:
        ids = example_inputs["input_ids"][:1]
        out.update(_decode_speed(teacher, student, ids, new_tokens, max(3, repeats // 3), decoder, gguf))
    return out


def _decode_speed(teacher: nn.Module, student: nn.Module, ids: torch.Tensor, new_tokens: int, repeats: int,
                  decoder: str, gguf: str | None = None) -> dict[str, Any]:
    """Tokens/s of dense and converted greedy decoding, interleaved, and which decoder ran; with
    ``gguf``, llama.cpp on that file in the same rounds (or why it could not run)."""
    out: dict[str, Any] = {"generate_tokens": new_tokens, "prompt_tokens": ids.shape[1]}
    if decoder == "lean" and supports_static_cache(teacher) and supports_static_cache(student):
        leans = [LeanDecoder(m, max_tokens=ids.shape[1] + new_tokens) for m in (teacher, student)]
        for lean in leans:
            lean.warm_up(ids)
        errors = {lean.compile_error for lean in leans} - {None}
        out["decoder"] = "lean: static KV cache, " + (f"uncompiled ({errors.pop()})" if errors else "compiled step")
        out["compile_s"] = {"dense": leans[0].compile_seconds, "converted": leans[1].compile_seconds}
        fns = [lambda lean=lean: lean.generate(ids, new_tokens) for lean in leans]
    else:
        pad = getattr(teacher.generation_config, "pad_token_id", None) or getattr(teacher.generation_config, "eos_token_id", None)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad)
        out["decoder"] = "HF generate"
        fns = [lambda: teacher.generate(ids, **kw), lambda: student.generate(ids, **kw)]
    peer, why = start_peer(gguf, torch.get_num_threads()) if gguf is not None else (None, None)
    failed: list[str] = []  # a peer that dies mid-run loses its row, never the run

    def peer_step() -> None:
        if not failed:
            try:
                peer.generate_seconds(ids[0].tolist(), new_tokens)
            except RuntimeError as e:
                failed.append(str(e))

    if peer is not None:
        fns.append(peer_step)
    try:
        with torch.no_grad():  # no inference mode: a compiled, frozen step wants plain no_grad
            gen = interleaved(fns, repeats)
    finally:
        if peer is not None:
            peer.close()
    out.update(dense_tokens_per_s=new_tokens / gen[0], converted_tokens_per_s=new_tokens / gen[1],
               tokens_per_s_speedup=gen[0] / gen[1])
    why = failed[0] if failed else why
    if peer is not None and not failed:
        out.update(llama_cpp=gguf_format(gguf), llama_cpp_tokens_per_s=new_tokens / gen[2],
                   converted_per_llama_cpp=gen[2] / gen[1])
    elif why is not None:
        out["llama_cpp_missing"] = why
    return out


def layer_times(model: nn.Module, step: Callable[[], Any], repeats: int = REPEATS) -> dict[str, tuple[float, float]]:
    """Each sparse layer's (dense, converted) seconds on the input it got in one ``step`` of the model."""
    layers = sparse_layers(model)
    inputs: dict[str, torch.Tensor] = {}
    with watching(layers, lambda p, m, x: inputs.setdefault(p, x.detach().clone())), torch.inference_mode():
        step()
    out = {}
    with torch.inference_mode():
        for p, x in inputs.items():
            m = layers[p]
            dense_s, midl_s = interleaved([lambda: m.dense_forward(x), lambda: m(x)], repeats)
            out[p] = (dense_s, midl_s)
    return out


__all__ = ["DECODE", "LayerShape", "cache_key", "cpu_name", "decode_calls", "end_to_end", "interleaved", "is_causal_lm",
           "layer_times", "machine", "model_step", "model_time", "time_options"]
