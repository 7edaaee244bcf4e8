"""Zoo coverage: does midl-convert convert every timm architecture and the Hugging Face families?

For each model (random weights, nothing downloaded) the check of ``tests/test_zoo.py``:
keep 1.0 reproduces the original output, keep 0.5 converts at least one layer and stays finite.
Each model runs in a worker process under a per-model timeout, so a slow or crashing model
cannot stall the sweep. Writes ``docs/coverage.md`` (rates per family and overall, trace
method counts, one line per failure) and prints the same table; also times the conversion
(graph pass + surgery) of a ~100M-parameter model.

    python benchmarks/coverage.py                    # deterministic sample of timm + all HF cases
    python benchmarks/coverage.py --sample 0         # every timm architecture
    python benchmarks/coverage.py --sample 400 --seed 0 --timeout 90 --workers 2

The Hugging Face cases are the ``hf`` rows of ``tests/test_zoo.py`` (one table for both).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import random
import re
import sys
import time
import traceback
from collections import Counter, defaultdict
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SMALL = 64  # first input size tried (pixels); the model's default size is the fallback
MAX_PARAMS = 150e6  # larger models are skipped (memory and time on a small machine)
_ZOO: Any = None  # tests/test_zoo.py, loaded once per worker
GIANT_WORDS = ("giant", "gigantic", "huge", "enormous", "xxlarge", "_7b", "_5b", "_6b", "_1b", "_2b", "_3b")


# ----- the check (runs in a worker) --------------------------------------------------------------
def load_zoo() -> Any:
    """``tests/test_zoo.py`` as a module: its ``ZOO`` table and ``build``/``run``/``wake`` helpers."""
    spec = importlib.util.spec_from_file_location("test_zoo", ROOT / "tests" / "test_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def param_count_meta(name: str) -> int | None:
    """Parameters of a timm architecture, counted on the meta device (no memory, no init)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - some models cannot be built on meta; fall back to the name
        return None


def build_timm(name: str) -> tuple[Any, Any, Any, dict]:
    """The model, an input it accepts and its output: 64 px (with ``img_size=64`` where the model
    takes it), else its default input size."""
    import timm
    import torch

    cfg = timm.models.get_pretrained_cfg(name)
    default = tuple(cfg.input_size) if cfg is not None and getattr(cfg, "input_size", None) else (3, 224, 224)
    attempts = [({"img_size": SMALL}, (SMALL, SMALL)), ({}, (SMALL, SMALL))]
    if default[1:] != (SMALL, SMALL):
        attempts.append(({}, default[1:]))
    errors = []
    for kwargs, hw in attempts:
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
        except Exception as exc:  # noqa: BLE001 - e.g. img_size not accepted: try the next way
            errors.append(f"build{kwargs or ''}: {one_line(exc)}")
            continue
        x = torch.randn(1, default[0], *hw)
        _ZOO.wake(model)
        try:
            with torch.no_grad():
                ref = _ZOO.run(model, x)
            return model, x, ref, kwargs
        except Exception as exc:  # noqa: BLE001 - try the next input size
            errors.append(f"{hw[0]}x{hw[1]}: {one_line(exc)}")
    raise RuntimeError("original model does not run: " + " | ".join(errors[-2:]))


def check(task: dict) -> dict:
    """Build one model, convert it at keep 1.0 and 0.5, and say what happened."""
    import torch

    import midl_convert as mc

    zoo = _ZOO
    res: dict[str, Any] = {"name": task["name"], "family": task["family"], "source": task["source"]}
    t0 = time.perf_counter()
    stage = "build"
    try:
        if task["source"] == "timm":
            params = res["params"] = param_count_meta(task["name"])
            too_big = params > MAX_PARAMS if params is not None else any(w in task["name"] for w in GIANT_WORDS)
            if too_big:
                size = f"{params / 1e6:.0f}M params" if params is not None else "giant by name"
                res.update(status="skip", reason=f"too large for this sweep ({size} > {MAX_PARAMS / 1e6:.0f}M)")
                return res
            model, x, ref, kwargs = build_timm(task["name"])
            res["input"] = list(x.shape)
            res["kwargs"] = kwargs
        else:
            model, x = zoo.build(*task["case"])
            ref = zoo.run(model, x)
            res["input"] = {k: list(v.shape) for k, v in x.items()} if isinstance(x, dict) else list(x.shape)
        if res.get("params") is None:
            res["params"] = sum(p.numel() for p in model.parameters())
        scale = ref.abs().max().item()
        if not torch.isfinite(ref).all() or scale <= 1e-6:
            raise RuntimeError(f"degenerate reference output (max |y| = {scale:g})")
        stage = "convert keep=1.0"
        model, plan = mc.convert(model, mc.MIDLConfig(keep=1.0), x)
        res["method"], res["notes"], res["converted"] = plan.trace, plan.notes, len(plan.converted)
        stage = "forward keep=1.0"
        diff = (zoo.run(model, x) - ref).abs().max().item()
        res["rel_err"] = diff / scale
        if not diff <= 1e-4 * scale:
            res.update(status="fail", reason=f"keep=1.0 output differs: rel err {diff / scale:.3g} (trace {plan.trace})")
            return res
        # keep 0.5: the same plan with another keep, so flip the converted layers' keep instead of
        # tracing and factorising (SVD) the model a second time.
        stage = "forward keep=0.5"
        layers = mc.midl_layers(model)
        if not layers:
            raise RuntimeError("no MID-L layer in the converted model")
        for layer in layers.values():
            layer.keep = 0.5
        torch.manual_seed(0)
        y = zoo.run(model, x)
        if y.shape != ref.shape or not torch.isfinite(y).all():
            res.update(status="fail", reason=f"keep=0.5 output {'not finite' if y.shape == ref.shape else 'has another shape'}")
            return res
        res["status"] = "pass"
    except Exception as exc:  # noqa: BLE001 - every failure is recorded as one line
        res["status"] = "skip" if stage == "build" else "fail"
        res["reason"] = f"{stage}: {one_line(exc)}"
        res["trace"] = traceback.format_exc(limit=-3)[-600:]
    finally:
        res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def worker(conn, threads: int) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    global _ZOO
    _ZOO = load_zoo()
    conn.send({"ready": True})
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(check(task))


# ----- the sweep (parent) ------------------------------------------------------------------------
class Pool:
    """Worker processes with a per-task timeout: a stuck or crashed worker is killed and replaced."""

    def __init__(self, n: int, threads: int, timeout: float) -> None:
        self.ctx = mp.get_context("spawn")
        self.threads, self.timeout = threads, timeout
        self.slots = [self._start() for _ in range(n)]

    def _start(self) -> dict:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker, args=(child, self.threads), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "task": None, "since": None, "ready": False}

    def run(self, tasks: list[dict], on_result) -> None:
        todo = list(tasks)
        while todo or any(s["task"] for s in self.slots):
            for slot in self.slots:
                if slot["ready"] and slot["task"] is None and todo:
                    slot["task"], slot["since"] = todo.pop(0), time.monotonic()
                    slot["conn"].send(slot["task"])
            conns = [s["conn"] for s in self.slots]
            for conn in wait(conns, timeout=1.0):
                slot = next(s for s in self.slots if s["conn"] is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    self._replace(slot, on_result, f"worker crashed (exit code {slot['proc'].exitcode})")
                    continue
                if msg.get("ready"):
                    slot["ready"] = True
                    continue
                slot["task"] = None
                on_result(msg)
            now = time.monotonic()
            for slot in self.slots:
                if slot["task"] is not None and now - slot["since"] > self.timeout:
                    self._replace(slot, on_result, f"timeout: no result within {self.timeout:.0f} s", status="timeout")
                elif slot["task"] is None and not slot["proc"].is_alive():
                    self._replace(slot, on_result, None)

    def _replace(self, slot: dict, on_result, reason: str | None, status: str = "fail") -> None:
        task = slot["task"]
        if slot["proc"].is_alive():
            slot["proc"].kill()
        slot["proc"].join(5)
        slot["conn"].close()
        if task is not None and reason is not None:
            on_result({"name": task["name"], "family": task["family"], "source": task["source"],
                       "status": status, "reason": reason, "seconds": round(time.monotonic() - slot["since"], 1)})
        slot.update(self._start())

    def close(self) -> None:
        for slot in self.slots:
            try:
                slot["conn"].send(None)
            except (OSError, BrokenPipeError):
                pass
            slot["proc"].join(5)
            if slot["proc"].is_alive():
                slot["proc"].kill()


def timm_tasks(sample: int, seed: int) -> tuple[list[dict], str]:
    """The timm models to check (one per family first, then at random) and a sentence that states the sample."""
    import timm

    family_of = {m: mod for mod in timm.list_modules() for m in timm.list_models(module=mod)}
    names = sorted(timm.list_models())
    if sample and sample < len(names):
        rng = random.Random(seed)
        by_family = defaultdict(list)
        for n in names:
            by_family[family_of.get(n, "?")].append(n)
        chosen = {rng.choice(ms) for _, ms in sorted(by_family.items())} if sample >= len(by_family) else set()
        rest = [n for n in names if n not in chosen]
        chosen |= set(rng.sample(rest, max(0, sample - len(chosen))))
        names = sorted(chosen)
        how = (f"a deterministic sample of {len(names)} of the {len(family_of)} timm architectures "
               f"(seed {seed}: one random model per timm module, then uniform at random)")
    else:
        how = f"all {len(names)} timm architectures"
    tasks = [{"source": "timm", "name": n, "family": family_of.get(n, "?")} for n in names]
    return tasks, how


def hf_tasks() -> list[dict]:
    zoo = load_zoo()
    tasks = []
    for p in zoo.ZOO:
        source, name, kwargs, size = p.values
        if source == "hf":
            tasks.append({"source": "hf", "name": name, "family": f"hf:{kwargs['model_type']}",
                          "case": (source, name, kwargs, size)})
    return tasks


def time_conversion(name: str = "vit_base_patch16_224", size: int = 224, threads: int = 2) -> dict:
    """Wall time of the graph pass and of the surgery for one ~100M-parameter model (random weights)."""
    import timm
    import torch

    import midl_convert as mc
    from midl_convert.surgery import apply_plan

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    plan, table = mc.plan_conversion(model, mc.MIDLConfig(keep=0.5), x)
    t1 = time.perf_counter()
    apply_plan(model, plan)
    t2 = time.perf_counter()
    with torch.no_grad():
        model(x)
    return {"model": name, "input": f"1x3x{size}x{size}", "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "layers": len(plan.converted), "method": plan.trace, "graph_s": round(t1 - t0, 2),
            "surgery_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2), "threads": threads,
            "load": round(os.getloadavg()[0], 1), "cpus": os.cpu_count()}


# ----- the report --------------------------------------------------------------------------------
def summarize(results: list[dict], how: str, timing: dict | None, wall: float, args) -> str:
    tested = [r for r in results if r["status"] != "skip"]
    ok = [r for r in tested if r["status"] == "pass"]
    fams: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        fams[r["family"]][r["status"]] += 1
    methods = Counter(r["method"] for r in results if r.get("method"))

    def rate(c: Counter) -> str:
        n = c["pass"] + c["fail"] + c["timeout"]
        return f"{100 * c['pass'] / n:.0f}%" if n else "-"

    lines = [
        "# Zoo coverage",
        "",
        "Generated by `python benchmarks/coverage.py` (random weights; nothing downloaded). Check per model: "
        "keep 1.0 reproduces the original main output (max abs diff <= 1e-4 x max |output|), keep 0.5 converts "
        "at least one layer and gives finite outputs. To halve the cost, the keep-0.5 model is the keep-1.0 one "
        "with every MID-L layer's `keep` set to 0.5 (the plan is otherwise identical; `tests/test_zoo.py` runs "
        "both conversions in full).",
        "",
        f"- timm: {how}; plus {sum(r['source'] == 'hf' for r in results)} Hugging Face families from tiny configs "
        f"(the `hf` rows of `tests/test_zoo.py`).",
        f"- Inputs: {SMALL}x{SMALL} (with `img_size={SMALL}` where the model takes it), else the model's default size; "
        f"`num_classes=10`; all-zero parameters (zero-init heads, layer scales) filled with N(0, 0.02) noise.",
        f"- Per-model timeout {args.timeout:.0f} s, {args.workers} worker(s) x {args.threads} thread(s); "
        f"sweep wall time {wall / 60:.1f} min. Models over {MAX_PARAMS / 1e6:.0f}M parameters are skipped.",
        "",
        "## Summary",
        "",
        f"**Overall: {len(ok)}/{len(tested)} pass ({100 * len(ok) / max(1, len(tested)):.1f}%)**; "
        f"{sum(r['status'] == 'fail' for r in results)} fail, {sum(r['status'] == 'timeout' for r in results)} timeout, "
        f"{sum(r['status'] == 'skip' for r in results)} skipped (too large, or the original model does not build/run).",
        "",
        "| set | pass | tested | rate |",
        "|---|---:|---:|---:|",
    ]
    for src in ("timm", "hf"):
        sub = [r for r in tested if r["source"] == src]
        p = sum(r["status"] == "pass" for r in sub)
        lines.append(f"| {src} | {p} | {len(sub)} | {100 * p / max(1, len(sub)):.1f}% |")
    lines += ["", "Trace method (models that got through the graph pass): "
              + ", ".join(f"{m} {methods.get(m, 0)}" for m in ("export", "fx", "walk")), ""]
    if timing:
        lines += ["## Conversion time of a ~100M-parameter model", "",
                  f"{timing['model']} ({timing['params_M']}M params, input {timing['input']}, random weights, "
                  f"{timing['threads']} torch threads on {timing['cpus']} CPUs, 1-min load average {timing['load']}): graph pass {timing['graph_s']} s + surgery {timing['surgery_s']} s "
                  f"= **{timing['total_s']} s** for {timing['layers']} layers (trace: {timing['method']}).", ""]
    lines += ["## Per family", "", "| family | pass | fail | timeout | skip | rate |", "|---|---:|---:|---:|---:|---:|"]
    for fam, c in sorted(fams.items()):
        lines.append(f"| {fam} | {c['pass']} | {c['fail']} | {c['timeout']} | {c['skip']} | {rate(c)} |")
    failed = [r for r in results if r["status"] in ("fail", "timeout")]
    if failed:
        groups = Counter(re.sub(r"(rel err|within|exit code|\() ?[\d.e+-]+", r"\1 N", r["reason"]) for r in failed)
        lines += ["", "## Failure reasons (grouped)", "", "| reason | models |", "|---|---:|"]
        lines += [f"| {reason.replace('|', '/')} | {n} |" for reason, n in groups.most_common()]
    for title, status in (("Failures", "fail"), ("Timeouts", "timeout"), ("Skipped", "skip")):
        rows = sorted((r for r in results if r["status"] == status), key=lambda r: (r["family"], r["name"]))
        if rows:
            lines += ["", f"## {title}", "", "| model | family | reason |", "|---|---|---|"]
            lines += [f"| {r['name']} | {r['family']} | {r['reason'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=400, help="timm models to check (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per model")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    ap.add_argument("--jsonl", default=str(ROOT / "benchmarks" / "coverage_results.jsonl"),
                    help="per-model results, one JSON object a line (written as the sweep goes)")
    ap.add_argument("--rerun-failed", action="store_true",
                    help="check again only the models that failed or timed out in --jsonl (after a fix), then rebuild the report")
    ap.add_argument("--report-only", action="store_true",
                    help="no sweep: rebuild the report from --jsonl (same --sample/--seed) and re-time the 100M model")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    start = time.monotonic()
    tasks, how = timm_tasks(args.sample, args.seed)
    if not args.no_hf:
        tasks = hf_tasks() + tasks
    results: list[dict] = []
    total = len(tasks)
    if args.report_only:
        rows = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
        results = [r for r in rows if "_wall" not in r]
        wall = next((r["_wall"] for r in rows if "_wall" in r), float("nan"))
        return finish(args, results, how, wall)
    kept: list[dict] = []
    if args.rerun_failed:  # the wall time reported is the first sweep's plus this one's
        start -= next((json.loads(x)["_wall"] for x in Path(args.jsonl).read_text().splitlines() if '"_wall"' in x), 0.0)
        rows = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
        again = {r["name"] for r in rows if r.get("status") in ("fail", "timeout")}
        kept = [r for r in rows if "_wall" not in r and r["name"] not in again]
        tasks, total = [t for t in tasks if t["name"] in again], len(again)
        how += f"; {total} earlier failures checked again after a fix"
    print(f"checking {total} models; {how}", flush=True)
    Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
    log = open(args.jsonl, "w")
    for r in kept:
        results.append(r)
        log.write(json.dumps(r, default=str) + "\n")

    def on_result(r: dict) -> None:
        results.append(r)
        log.write(json.dumps(r, default=str) + "\n")
        log.flush()
        extra = r.get("reason") or f"{r.get('method')} conv={r.get('converted')} err={r.get('rel_err', 0):.1e}"
        print(f"[{len(results):4d}/{total}] {r['status']:7s} {r['name'][:44]:44s} {r.get('seconds', 0):6.1f}s  {extra[:110]}", flush=True)

    pool = Pool(args.workers, args.threads, args.timeout)
    try:
        pool.run(tasks, on_result)
    finally:
        pool.close()
        log.write(json.dumps({"_wall": round(time.monotonic() - start, 1)}) + "\n")
        log.close()
    finish(args, results, how, time.monotonic() - start)


def finish(args, results: list[dict], how: str, wall: float) -> None:
    """Time the ~100M-parameter conversion, then write and print the report."""
    timing = None
    if not args.no_timing:
        try:
            timing = time_conversion(threads=max(1, os.cpu_count() or 1))
            print(f"\nconversion of {timing['model']} ({timing['params_M']}M params, {timing['input']}): graph pass "
                  f"{timing['graph_s']} s + surgery {timing['surgery_s']} s = {timing['total_s']} s "
                  f"({timing['layers']} layers, {timing['method']})", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported, the coverage table still gets written
            print(f"timing failed: {one_line(exc)}", flush=True)
    report = summarize(results, how, timing, wall, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print("\n" + report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
