"""llama.cpp (llama-cpp-python, the ``demo`` extra) on a GGUF file, as the runtime a CPU user would pick
instead: greedy batch-1 decoding timed and perplexity judged as this package times and judges its own
models, so a run can say where the converted model stands against it.

llama.cpp runs in a child process (``python -m midl_convert.llama_cpp_peer``, one JSON request and
reply per line): a wheel built for instructions the CPU faults on (a VM that lists AMX but faults on
``ldtilecfg``) kills only the child, and ``probe`` says so in one line; its OpenMP runtime and threads
stay apart from torch's.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .files import cache_dir

# llama.cpp's file types (llama.h's LLAMA_FTYPE_MOSTLY_*) and bytes per weight of each block format.
FTYPES = {"Q4_1": 3, "Q8_0": 7, "F16": 1}
BYTES_PER_WEIGHT = {"Q4_1": 20 / 32, "Q8_0": 34 / 32, "F16": 2.0}

# Decodes two tokens in a child process: a llama.cpp build that faults on this CPU kills the child, not the run.
PROBE = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=1, n_ctx=64, verbose=False); "
         "g = llm.generate(llm.tokenize(b'In the beginning'), top_k=1, temp=0.0); next(g); next(g)")
# The rebuild that avoids the one fault seen so far, a VM that lists AMX but faults on `ldtilecfg`: the
# instruction sets named, since a native build (-march=native) turns AMX on whatever the AMX options say.
REBUILD = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON '
           '-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF '
           '-DGGML_AMX_BF16=OFF" pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python')
# Marks the child's replies on stdout, where a llama.cpp build may also print.
REPLY = "midl-reply "


def available() -> bool:
    """Whether llama-cpp-python is installed (without importing it here)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def probe(path: str | Path, timeout: float = 300.0, code: str = PROBE) -> str | None:
    """None where llama.cpp decodes ``path`` in a child process; otherwise why not, in one line.

    Some prebuilt llama.cpp wheels die with a signal on their first decode (an illegal instruction,
    or a general protection fault at AMX tile set-up in a VM)."""
    if not available():
        return "llama-cpp-python is not installed (pip install 'midl-convert[demo]')"
    try:
        run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout)
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


def gguf_copies(source: Path, formats: list[str], source_format: str = "Q4_1") -> dict[str, Path]:
    """``source`` and copies of it requantised into ``formats`` (``llama_model_quantize``, allowing a
    requantise), made once into the cache folder and written under a temporary name first."""
    import llama_cpp

    folder = cache_dir().parent / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in formats:
        if name == source_format:
            out[name] = source
            continue
        target = folder / f"{source.stem}.{name}.gguf"
        if not target.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = FTYPES[name]
            params.allow_requantize = True
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"llama_model_quantize to {name} failed ({rc})")
            os.replace(tmp, target)
        out[name] = target
    return out


class LlamaCpp:
    """One GGUF file in llama.cpp with ``threads`` threads, in a child process of its own."""

    def __init__(self, path: str | Path, threads: int, n_ctx: int = 1024) -> None:
        self.path, self.threads = Path(path), threads
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, str(path), str(threads), str(n_ctx)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._call("ready")

    def _call(self, *request: Any) -> Any:
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            for line in self._proc.stdout:
                if line.startswith(REPLY):
                    status, value = json.loads(line[len(REPLY):])
                    break
            else:
                raise EOFError
        except (EOFError, OSError):
            code = self._proc.wait(10)
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
            raise RuntimeError(f"llama.cpp's process died ({why}) on {request[0]}") from None
        if status != "ok":
            raise RuntimeError(f"llama.cpp {request[0]}: {value}")
        return value

    def generate_seconds(self, prompt: list[int], new_tokens: int) -> float:
        """Seconds, timed in the child, for the prompt and exactly ``new_tokens`` greedy tokens
        (end-of-text does not stop it)."""
        return float(self._call("generate", prompt, new_tokens))

    def perplexity(self, ids: list[int], window: int) -> float:
        """exp of the mean next-token loss over non-overlapping windows of ``window`` tokens."""
        return float(self._call("perplexity", ids, window))

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps(["stop"]) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_peer(gguf: str | Path, threads: int) -> tuple[LlamaCpp | None, str | None]:
    """llama.cpp serving ``gguf`` with ``threads`` threads, or (None, why not) in one line."""
    why = probe(gguf)
    if why is not None:
        return None, why
    try:
        return LlamaCpp(gguf, threads), None
    except RuntimeError as e:
        return None, str(e)


def gguf_format(path: str | Path) -> str:
    """The block format a GGUF file's name states (``Q4_1``, ``Q8_0``, ``F16``...), else ``GGUF``."""
    import re

    found = re.findall(r"(?i)(?:^|[._-])((?:I?Q\d(?:_[0-9A-Z]+)*)|BF16|F16|F32)(?=[._-]|$)", Path(path).stem)
    return found[-1].upper() if found else "GGUF"


def _generate_seconds(llm: Any, prompt: list[int], new_tokens: int) -> float:
    t = time.perf_counter()
    count = 0
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        count += 1
        if count == new_tokens:
            break
    return time.perf_counter() - t


def _perplexity(path: str, threads: int, ids: list[int], window: int) -> float:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=max(window, 64),
                          n_batch=window, logits_all=True, verbose=False)
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


def serve(path: str, threads: int, n_ctx: int) -> None:
    """The child: one JSON request per line on stdin, one marked reply per line on stdout, until "stop"."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False)
    handlers = {"ready": lambda: True,
                "generate": lambda prompt, n: _generate_seconds(llm, prompt, n),
                "perplexity": lambda ids, window: _perplexity(path, threads, ids, window)}
    for line in sys.stdin:
        request = json.loads(line)
        if request[0] == "stop":
            return
        try:
            reply = ["ok", handlers[request[0]](*request[1:])]
        except Exception as e:  # noqa: BLE001 - sent back to the parent, which raises it
            reply = ["error", f"{type(e).__name__}: {e}"]
        print(REPLY + json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

__all__ = ["BYTES_PER_WEIGHT", "LlamaCpp", "available", "gguf_copies", "gguf_format", "probe", "start_peer"]
