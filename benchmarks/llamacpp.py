"""llama.cpp (the llama-cpp-python package of the `demo` extra) on the same GGUF weights, timed and
judged as ``generate.py`` times and judges the Hugging Face models: greedy batch-1 decoding of
exactly N new tokens after the same prompt ids, and perplexity over the same windows.

The shipped SmolLM2 GGUF is Q4_1; Q8_0 and F16 copies are requantised from it once into a cache
folder with ``llama_cpp.llama_model_quantize`` (``allow_requantize``), so all three hold the weights
the Hugging Face model is read from (dequantised Q4_1), at 0.625, 1.0625 and 2 bytes per weight.
"""
from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# llama.cpp's file types (llama.h's LLAMA_FTYPE_MOSTLY_*) and bytes per weight of each block format.
FTYPES = {"Q4_1": 3, "Q8_0": 7, "F16": 1}
BYTES_PER_WEIGHT = {"Q4_1": 20 / 32, "Q8_0": 34 / 32, "F16": 2.0}


def cache_folder() -> Path:
    root = Path(os.environ.get("MIDL_CACHE_DIR", Path.home() / ".cache" / "midl-convert"))
    folder = root / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def gguf_copies(source: Path, formats: list[str]) -> dict[str, Path]:
    """``source`` (Q4_1) and requantised copies in ``formats``, made once into the cache folder."""
    import llama_cpp

    out = {}
    for name in formats:
        if name == "Q4_1":
            out[name] = source
            continue
        target = cache_folder() / f"{source.stem}.{name}.gguf"
        if not target.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = FTYPES[name]
            params.allow_requantize = True
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize to {name} failed ({rc})")
            os.replace(tmp, target)
        out[name] = target
    return out


# Decodes two tokens in a child process: a llama.cpp build that faults on this CPU kills the child, not the run.
PROBE = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=1, n_ctx=64, verbose=False); "
         "g = llm.generate(llm.tokenize(b'In the beginning'), top_k=1, temp=0.0); next(g); next(g)")
# The rebuild that avoids the one fault seen so far: a VM that lists AMX but faults on `ldtilecfg`.
REBUILD = ('CMAKE_ARGS="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" '
           "pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python")


def probe(path: Path, timeout: float = 300.0) -> str | None:
    """None where llama.cpp decodes ``path`` in a child process; otherwise why not, in one line.

    Some prebuilt llama.cpp wheels die with a signal on the first decode (illegal instruction, or a
    general protection fault at AMX tile set-up in a VM), which would take the whole benchmark with them."""
    try:
        run = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"llama.cpp did not decode two tokens in {timeout:.0f}s in a child process"
    if run.returncode == 0:
        return None
    if run.returncode < 0:
        name = signal.Signals(-run.returncode).name
        return (f"llama.cpp died with {name} on its first decode in a child process (this CPU faults on an instruction "
                f"the build uses); rebuild it for this CPU: {REBUILD}")
    last = (run.stderr.strip().splitlines() or ["no message"])[-1]
    return f"llama.cpp failed in a child process (exit {run.returncode}): {last}"


class LlamaCpp:
    """One GGUF file in llama.cpp with ``threads`` threads: ``generate_seconds`` and ``perplexity``."""

    def __init__(self, path: Path, threads: int, n_ctx: int = 1024) -> None:
        import llama_cpp

        self.path, self.threads = path, threads
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   verbose=False)

    def generate_seconds(self, prompt: list[int], new_tokens: int) -> float:
        """Seconds for the prompt and exactly ``new_tokens`` greedy tokens (end-of-text does not stop it)."""
        t = time.perf_counter()
        count = 0
        for _ in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == new_tokens:
                break
        return time.perf_counter() - t

    def perplexity(self, ids: list[int], window: int) -> float:
        """exp of the mean next-token loss over non-overlapping windows (as generate.perplexity)."""
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(self.path), n_threads=self.threads, n_threads_batch=self.threads,
                              n_ctx=max(window, 64), n_batch=window, logits_all=True, verbose=False)
        total, count = 0.0, 0
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                continue
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
            top = logits.max(-1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
            total += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
            count += len(chunk) - 1
        del llm
        return math.exp(total / count)
