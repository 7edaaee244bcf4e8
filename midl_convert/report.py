"""The report: what a conversion costs and buys, measured rather than promised.

Per converted layer its settings, measured exact-path share and FLOPs; for the whole model
FLOPs (``flops.py``), parameters, held-out quality (``quality.compare``), latency (median and
IQR of interleaved runs) and peak memory. Saved as ``report.json`` (schema ``REPORT_SCHEMA``),
``report.md`` and ``report.png``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import math
import os
import platform
import sys
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .data import Batch
from .errors import MIDLError
from .files import atomic_path, read_json, write_atomic
from .flops import model_flops, model_flops_over
from .latency import DECODE, is_causal_lm, layer_times, model_step
from .log import progress_bar
from .ran import RanFlops, ran_flops
from .sparse import SparseLayer
from .quality import OUTPUT_KIND, compare, headline, run
from .surgery import Plan, midl_layers

SCHEMA_VERSION = 1
PRINT_ROWS = 20  # per-layer rows printed to the terminal; report.md has them all
WARMUP_S, WARMUP_MAX = 0.25, 100  # warm each model this long (thread pools, caches, cuDNN plans), in at most so many runs
FILES = ("report.json", "report.md", "report.png")

_NUM = {"type": ["number", "null"]}
_INT = {"type": "integer", "minimum": 0}
_TIMING = {
    "type": "object",
    "required": ["median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms"],
    "properties": {k: {"type": "number", "minimum": 0} for k in ("median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms")},
}
_MEMORY = {
    "type": "object",
    "required": ["weights_bytes", "forward_peak_bytes", "peak_bytes"],
    "properties": {k: {"type": ["integer", "null"], "minimum": 0} for k in ("weights_bytes", "forward_peak_bytes", "peak_bytes")},
}
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "midl-convert report",
    "description": "FLOPs are counted on one sample (batch size 1); ratios are dense / MID-L (above 1: fewer FLOPs).",
    "type": "object",
    "required": ["schema_version", "settings", "flops", "parameters", "quality", "latency", "memory", "layers", "skipped", "notes", "history"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "settings": {
            "type": "object",
            "description": "What produced the report; model, config, data and seed are the caller's, versions and device are measured.",
            "required": ["versions", "device"],
            "properties": {
                "model": {"type": ["string", "object", "null"], "description": "a name, or a run's model section"},
                "config": {"type": ["object", "null"]},
                "data": {"type": ["string", "null"]},
                "seed": {"type": ["integer", "null"]},
                "task": {"type": "string"},
                "device": {"type": "string"},
                "versions": {
                    "type": "object",
                    "required": ["python", "torch", "timm", "transformers", "midl_convert"],
                    "additionalProperties": {"type": ["string", "null"]},
                },
            },
        },
        "flops": {
            "type": "object",
            "required": ["input_shapes", "counter", "dense", "midl", "ratio", "converted_dense", "converted_midl", "converted_ratio"],
            "properties": {
                "input_shapes": {"type": "object", "additionalProperties": {"type": "array", "items": _INT}},
                "input": {"type": "string", "description": "which input the FLOPs were counted on"},
                "budget": {"type": ["object", "null"], "description": "the layer budget's target and prediction, when one planned the run"},
                "counter": {"type": "string"},
                "dense": _INT, "midl": _INT, "ratio": _NUM,
                "ran": {**_INT, "description": "FLOPs of the paths that actually ran (midl_convert.ran): a call run as dense "
                                               "compute plus masking counts its dense product"},
                "converted_dense": _INT, "converted_midl": _INT, "converted_ratio": _NUM,
                "heldout": {"type": ["object", "null"], "description": "the same counts summed over the first held-out batches (up to 4) "
                            "(the headline: adaptive masks pick as many neurons as real data makes them)",
                            "properties": {"dense": _INT, "midl": _INT, "ratio": _NUM, "converted_ratio": _NUM,
                                           "batches": _INT}},
            },
        },
        "parameters": {
            "type": "object",
            "required": ["original", "converted", "added"],
            "properties": {"original": _INT, "converted": _INT, "added": {"type": "integer"}},
        },
        "quality": {
            "type": "object",
            "required": ["kind", "headline", "value", "metrics", "batches"],
            "properties": {
                "kind": {"enum": sorted(set(OUTPUT_KIND.values()))},
                "headline": {"type": "string"},
                "value": _NUM,
                "metrics": {"type": "object", "additionalProperties": _NUM},
                "batches": _INT,
            },
        },
        "latency": {
            "type": "object",
            "required": ["device", "timer", "repeats", "results"],
            "properties": {
                "device": {"type": "string"},
                "timer": {"type": "string"},
                "repeats": {"type": "integer", "minimum": 1},
                "results": {"type": "array", "items": {
                    "type": "object",
                    "required": ["batch_size", "warmup_runs", "teacher", "student", "speedup"],
                    "properties": {"batch_size": {"type": "integer", "minimum": 1}, "warmup_runs": _INT,
                                   "teacher": _TIMING, "student": _TIMING, "speedup": _NUM},
                }},
            },
        },
        "memory": {
            "type": "object",
            "description": "peak_bytes = weights_bytes (parameters and buffers) + forward_peak_bytes (tensors allocated during one forward).",
            "required": ["device", "method", "results"],
            "properties": {
                "device": {"type": "string"},
                "method": {"type": "string"},
                "results": {"type": "array", "items": {
                    "type": "object",
                    "required": ["batch_size", "teacher", "student"],
                    "properties": {"batch_size": {"type": "integer", "minimum": 1}, "teacher": _MEMORY, "student": _MEMORY},
                }},
            },
        },
        "layers": {"type": "array", "items": {
            "type": "object",
            "required": ["path", "kind", "in_features", "out_features", "keep", "rank", "granularity", "k", "calls", "rows",
                         "groups", "active_fraction", "dense_flops", "midl_flops", "ratio", "flops_parts"],
            "additionalProperties": False,
            "properties": {
                "path": {"type": "string"},
                "kind": {"enum": ["linear", "conv1d", "conv2d"]},
                "in_features": _INT, "out_features": _INT, "keep": {"type": "number"}, "rank": _INT,
                "granularity": {"enum": ["token", "sequence", "pixel", "sample"]},
                "k": _INT, "calls": _INT, "rows": _INT, "groups": _INT,
                "active_fraction": {**_NUM, "description": "measured on the held-out data (layer stats); null if never recorded"},
                "dense_flops": _INT, "midl_flops": _INT, "ratio": _NUM,
                "flops_parts": {"type": "object", "additionalProperties": _INT},
                "side": {"enum": ["output", "input"], "description": "output: the mask picks rows of W (MID-L); input: columns"},
                "ran_flops": {"type": ["integer", "null"], "minimum": 0},
                "ran_path": {"type": ["string", "null"], "description": "the path most calls took: masked, kernel, sparse, dense"},
                "dense_ms": _NUM, "midl_ms": {**_NUM, "description": "measured per call, interleaved with the dense layer"},
            },
        }},
        "skipped": {"type": "array", "items": {
            "type": "object", "required": ["path", "reason"],
            "properties": {"path": {"type": "string"}, "reason": {"type": ["string", "null"]}},
        }},
        "notes": {"type": "array", "items": {"type": "string"}},
        "history": {
            "type": "object",
            "description": "what the run did before this measurement: calibration (mean relative layer error) and "
                           "distillation (held-out quality before and after, time, steps, the step it resumed from)",
            "properties": {
                "calibration": {"type": "object", "properties": {"layers": _INT, "error_before": _NUM, "error_after": _NUM}},
                "distillation": {"type": "object", "properties": {
                    "steps": _INT, "seconds": _NUM, "resumed_from": {"type": ["integer", "null"]},
                    "train": {"type": "string", "description": "what trained (--train): gates, midl, lora, bias, norms, full"},
                    "trainable_parameters": {**_INT, "description": "parameters trained; LoRA's merge into W when training ends"},
                    "before": {"type": "object", "additionalProperties": _NUM},
                    "after": {"type": "object", "additionalProperties": _NUM},
                    "loss_first": _NUM, "loss_last": _NUM}},
            },
        },
    },
}


@dataclass
class LayerReport:
    """One converted layer: its settings, measured exact-path share and FLOPs on one sample."""

    path: str
    kind: str
    in_features: int
    out_features: int
    keep: float
    rank: int
    granularity: str
    k: int
    calls: int
    rows: int
    groups: int
    active_fraction: float | None
    dense_flops: int
    midl_flops: int
    ratio: float | None
    flops_parts: dict[str, int] = field(default_factory=dict)
    side: str = "output"  # which neurons the mask picks: output rows or input columns of W
    ran_flops: int | None = None  # FLOPs of the paths that ran on the FLOPs input (ran.py)
    ran_path: str | None = None
    dense_ms: float | None = None  # measured per call at the model's call shape, dense against converted
    midl_ms: float | None = None


# Held-out batches the FLOPs are also counted on (two forwards each, one under FlopCounterMode): enough
# for adaptive masks' mean picks, without doubling a large model's report time.
HELDOUT_FLOPS_BATCHES = 4


@dataclass
class Report:
    """Everything ``build_report`` measured; ``to_dict`` follows ``REPORT_SCHEMA``."""

    settings: dict[str, Any]
    flops: dict[str, Any]
    parameters: dict[str, int]
    quality: dict[str, Any]
    latency: dict[str, Any]
    memory: dict[str, Any]
    layers: list[LayerReport]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    history: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        if data.get("schema_version") != SCHEMA_VERSION:
            raise MIDLError(
                f"report schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}; rebuild the report with this midl-convert"
            )
        fields = dict(data)
        fields["layers"] = [LayerReport(**layer) for layer in data["layers"]]
        return cls(**fields)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write report.json, report.md and report.png into ``directory``, each atomically."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "report.json", json.dumps(self.to_dict(), indent=2, allow_nan=False))
        write_atomic(out / "report.md", self.markdown())
        with atomic_path(out / "report.png") as tmp, open(tmp, "wb") as f:
            self._plot(f)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Report":
        path = Path(directory) / "report.json"
        if not path.is_file():
            raise MIDLError(f"no report.json in {str(directory)!r}; pass the folder that Report.save wrote")
        fix = "rerun midl-convert to write the report again"
        data = read_json(path, fix)
        import jsonschema

        if data.get("schema_version") == SCHEMA_VERSION:  # an older version's report gets from_dict's own line
            error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(REPORT_SCHEMA).iter_errors(data))
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
                raise MIDLError(f"{str(path)!r} is not a valid midl-convert report (at {where}: {error.message[:160]}); {fix}")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise MIDLError(f"{str(path)!r} is not a midl-convert report ({type(exc).__name__}: {exc}); {fix}") from None

    # ----- rendering ---------------------------------------------------------------------
    def summary_rows(self) -> list[tuple[str, str]]:
        """The headline numbers as (label, value) pairs, shared by the terminal and markdown."""
        f, p, q = self.flops, self.parameters, self.quality
        held = f.get("heldout")
        rows = [
            *([(f"FLOPs ratio, whole model, held-out data ({held['batches']} batches)", _fmt(held["ratio"])),
               ("FLOPs ratio, converted layers, held-out data", _fmt(held["converted_ratio"]))] if held else []),
            (f"FLOPs dense ({f.get('input', '1 sample')})", _si(f["dense"])),
            (f"FLOPs MID-L ({f.get('input', '1 sample')})", _si(f["midl"])),
            *([(f"FLOPs that ran ({f.get('input', '1 sample')}; paths as run)", _si(f["ran"]))] if f.get("ran") is not None else []),
            (f"FLOPs ratio, whole model ({f.get('input', '1 sample')}; dense / MID-L)", _fmt(f["ratio"])),
            (f"FLOPs ratio, converted layers ({f.get('input', '1 sample')})", _fmt(f["converted_ratio"])),
            *([(f"Layer budget: target / predicted {'speed-up (measured time)' if f['budget'].get('axis') == 'time' else 'ratio'}",
                f"{_fmt(f['budget']['target'])} / {_fmt(f['budget']['predicted_ratio'])}")] if f.get("budget") else []),
            ("Converted layers", str(len(self.layers))),
            ("Parameters original / converted", f"{p['original']:,} / {p['converted']:,}"),
            (f"Quality: {q['headline']}", _fmt(q["value"])),
        ]
        call = self.latency.get("call_shape")
        if call:
            rows.append((f"Latency at the call shape ({call['call']}, {call['threads']} threads), dense / converted",
                         f"{call['dense_ms']:.3f} / {call['converted_ms']:.3f} ms"))
            rows.append(("Speed-up at the call shape (measured)", _fmt(call["speedup"])))
            if call.get("dense_tokens_per_s") is not None:
                rows.append((f"Greedy generate, tokens/s dense / converted ({call['generate_tokens']} new tokens)",
                             f"{call['dense_tokens_per_s']:.1f} / {call['converted_tokens_per_s']:.1f} "
                             f"({_fmt(call['tokens_per_s_speedup'])}x)"))
        mem = {m["batch_size"]: m for m in self.memory["results"]}
        for lat in self.latency["results"]:
            b, t, s = lat["batch_size"], lat["teacher"], lat["student"]
            rows.append((f"Latency batch {b}, teacher / student (median ± IQR, {self.latency['device']})",
                         f"{t['median_ms']:.3f} ± {t['iqr_ms']:.3f} / {s['median_ms']:.3f} ± {s['iqr_ms']:.3f} ms"))
            rows.append((f"Speed-up batch {b}", _fmt(lat["speedup"])))
            if b in mem:
                rows.append((f"Peak memory batch {b}, teacher / student",
                             f"{_bytes(mem[b]['teacher']['peak_bytes'])} / {_bytes(mem[b]['student']['peak_bytes'])}"))
        return rows

    def layer_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["layer", "kind", "in", "out", "side", "keep", "rank", "granularity", "active", "dense FLOPs", "MID-L FLOPs", "ratio",
                  "ran FLOPs", "ran as", "dense ms", "MID-L ms"]
        rows = [[lr.path, lr.kind, str(lr.in_features), str(lr.out_features), lr.side, f"{lr.keep:g}", str(lr.rank), lr.granularity,
                 _fmt(lr.active_fraction), _si(lr.dense_flops), _si(lr.midl_flops), _fmt(lr.ratio), _si(lr.ran_flops),
                 lr.ran_path or "n/a", _ms(lr.dense_ms), _ms(lr.midl_ms)] for lr in self.layers]
        return header, rows

    @property
    def slower(self) -> str | None:
        """One line saying the converted model ran slower than dense, and why; None when it did not."""
        return self.latency.get("slower")

    def markdown(self) -> str:
        header, rows = self.layer_rows()
        lines = ["# midl-convert report", "", *([f"**{self.slower}**", ""] if self.slower else []), "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.summary_rows()]
        lines += ["", f"Memory: {self.memory['method']}", "", "## Converted layers", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        if self.skipped:
            lines += ["", "## Left dense", "", "| layer | reason |", "|---|---|"]
            lines += [f"| {s['path']} | {s['reason']} |" for s in self.skipped]
        lines += self.history_lines()
        lines += ["", "## Settings", "", "```json", json.dumps(self.settings, indent=2), "```"]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def history_lines(self) -> list[str]:
        """The run's history as markdown: calibration, then held-out quality before and after distillation."""
        lines = []
        if cal := self.history.get("calibration"):
            lines += ["", "## History", "", f"Calibration: {cal['layers']} layers, mean relative layer error "
                      f"{_g(cal['error_before'])} -> {_g(cal['error_after'])}"]
        if d := self.history.get("distillation"):
            lines += [] if cal else ["", "## History"]
            resumed = f", resumed at step {d['resumed_from']}" if d.get("resumed_from") else ""
            trained = (f"; trained {d['train']} ({d['trainable_parameters']:,} parameters)"
                       if d.get("trainable_parameters") is not None else "")
            lines += ["", f"Distillation: {d['steps']} steps in {d['seconds']:.1f} s{resumed}{trained}; loss "
                      f"{_g(d['loss_first'])} -> {_g(d['loss_last'])}", "",
                      "| held-out | after calibration | after distillation |", "|---|---|---|"]
            lines += [f"| {k} | {_g(v)} | {_g(d['after'].get(k))} |" for k, v in d["before"].items()]
        return lines

    def print(self, console: Any = None) -> None:
        """Rich tables on the terminal: the summary, then the first ``PRINT_ROWS`` layers."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        summary = Table(title="midl-convert report", show_header=False)
        summary.add_column(style="bold")
        summary.add_column(justify="right")
        for label, value in self.summary_rows():
            summary.add_row(label, value)
        console.print(summary)
        if self.slower:
            console.print(f"[yellow]{self.slower}[/yellow]", highlight=False, soft_wrap=True)
        console.print(f"[dim]Memory: {self.memory['method']}[/dim]")
        header, rows = self.layer_rows()
        layers = Table(title="Converted layers")
        for i, name in enumerate(header):
            layers.add_column(name, justify="left" if i in (0, 1, 6) else "right")
        for row in rows[:PRINT_ROWS]:
            layers.add_row(*row)
        console.print(layers)
        if len(rows) > PRINT_ROWS:
            console.print(f"... {len(rows) - PRINT_ROWS} more layers (see report.md)")
        for note in self.notes:
            console.print(f"[dim]{note}[/dim]")

    def _plot(self, f: io.BufferedWriter) -> None:
        from matplotlib.figure import Figure

        names = [lr.path for lr in self.layers] or ["(none)"]
        n, y = len(names), list(range(len(names)))
        fig = Figure(figsize=(13, max(4.0, 0.28 * n + 1.8)), dpi=100, layout="constrained")
        ax_f, ax_a, ax_t = fig.subplots(1, 3, sharey=True, width_ratios=(3, 2, 2))
        ax_f.barh([i - 0.2 for i in y], [lr.dense_flops for lr in self.layers] or [0], 0.4, label="dense")
        ax_f.barh([i + 0.2 for i in y], [lr.midl_flops for lr in self.layers] or [0], 0.4, label="MID-L")
        ax_f.set(yticks=y, xlabel="FLOPs per sample", title=f"FLOPs per layer (converted ratio {_fmt(self.flops['converted_ratio'])})")
        ax_f.set_yticklabels(names, fontsize=8)
        ax_f.invert_yaxis()
        top = max([lr.dense_flops for lr in self.layers] + [lr.midl_flops for lr in self.layers] + [1])
        ax_f.set_xlim(0, top * 1.3)  # headroom on the right: the legend covers no bar
        ax_f.legend(loc="lower right")
        active = [lr.active_fraction if lr.active_fraction is not None else math.nan for lr in self.layers] or [math.nan]
        ax_a.barh(y, active, 0.6, color="tab:green", label="measured")
        ax_a.scatter([lr.keep for lr in self.layers] or [math.nan], y, marker="|", s=120, color="black", label="keep", zorder=3)
        ax_a.set(xlim=(0, 1.35), xticks=[0, 0.25, 0.5, 0.75, 1.0], xlabel="share of neurons on the exact path",
                 title="Active fraction (held-out data)")
        ax_a.legend(loc="lower right")
        self._plot_times(ax_t, y)
        fig.savefig(f, format="png")

    def _plot_times(self, ax: Any, y: list[int]) -> None:
        """Each converted layer's measured time per call, dense against converted."""
        dense = [lr.dense_ms if lr.dense_ms is not None else math.nan for lr in self.layers] or [math.nan]
        midl = [lr.midl_ms if lr.midl_ms is not None else math.nan for lr in self.layers] or [math.nan]
        ax.barh([i - 0.2 for i in y], dense, 0.4, label="dense")
        ax.barh([i + 0.2 for i in y], midl, 0.4, label="MID-L")
        ax.set(xlabel=f"ms per call ({self.latency.get('layer_call', 'the FLOPs input')})", title="Measured time per layer")
        finite = [v for v in dense + midl if math.isfinite(v)]
        ax.set_xlim(0, (max(finite) if finite else 1.0) * 1.3)
        ax.legend(loc="lower right")


# ----- measurement -----------------------------------------------------------------------------
def build_report(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Batch],
    task: str,
    plan: Plan | None = None,
    settings: dict[str, Any] | None = None,
    latency_batch_sizes: Sequence[int] = (1,),
    repeats: int = 20,
    example_inputs: Any = None,
    progress: bool = True,
    call_latency: dict[str, Any] | None = None,
) -> Report:
    """Measure a converted ``student`` against its original ``teacher`` on held-out ``batches``.

    ``task`` is a ``LoadedModel.task``; FLOPs are counted on ``example_inputs`` when given (the
    input a layer budget was planned on), else on one sample of the first batch; latency and
    memory run on the device the student's weights are on; ``progress=False`` hides the timing bar.
    ``call_latency`` is ``latency.end_to_end``'s measurement at the model's real call shape (the
    pipeline's, under ``speedup``); on the CPU each layer's time per call is measured there, dense
    against converted.
    """
    if task not in OUTPUT_KIND:
        raise MIDLError(f"unknown task {task!r}; use one of {', '.join(OUTPUT_KIND)}")
    if not batches:
        raise MIDLError("build_report needs at least one held-out batch; pass Data.heldout_batches(...)")
    if repeats < 1 or any(b < 1 for b in latency_batch_sizes):
        raise MIDLError(f"repeats and latency batch sizes must be >= 1, got repeats={repeats}, sizes={tuple(latency_batch_sizes)}")
    layers = midl_layers(student)
    if not layers:
        raise MIDLError(f"{type(student).__name__} has no MID-L layers; convert it first (midl_convert.convert)")
    device = _device(student)
    if _device(teacher) != device:
        raise MIDLError(f"student is on {device} and teacher on {_device(teacher)}; move both to one device to compare them")
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        batches = [b.to(device) for b in batches]
        one = _resize(batches[0], 1)
        flops_inputs = example_inputs if example_inputs is not None else one.inputs
        counted = model_flops(student, teacher, flops_inputs)
        ran = ran_flops(student, flops_inputs)
        quality, active = _quality_and_activity(layers, student, teacher, batches, task)
        held = model_flops_over(student, teacher, [b.inputs for b in batches[:HELDOUT_FLOPS_BATCHES]])
        with progress_bar("latency", len(latency_batch_sizes) * repeats, progress) as advance:
            latency, memory = _runtime(student, teacher, batches[0], latency_batch_sizes, repeats, device, advance)
        times = layer_times(student, model_step(student, flops_inputs)) if device.type == "cpu" else {}
        at_call = ran_flops(student, None, model_step(student, flops_inputs)) if is_causal_lm(student) else ran
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    kinds = {lp.path: lp.kind for lp in plan.layers} if plan is not None else {}
    layer_reports = [_layer_report(path, layer, kinds, counted.layers[path], active[path]) for path, layer in layers.items()]
    for lr in layer_reports:
        lr.ran_flops, lr.ran_path = ran.layers.get(lr.path), ran.route_of(lr.path)
        if lr.path in times:
            lr.dense_ms, lr.midl_ms = (t * 1e3 for t in times[lr.path])
    if call_latency is not None:
        latency["call_shape"] = call_latency
    latency["slower"] = slower_reason(latency, layer_reports, at_call)
    latency["layer_call"] = DECODE if is_causal_lm(student) else "the FLOPs input"
    n_orig, n_conv = _count_params(teacher), _count_params(student)
    key, value = headline(quality)
    return Report(
        settings={**_jsonable(settings or {}), "task": task, "device": _device_name(device), "versions": versions()},
        flops={
            "input_shapes": {k: list(v.shape) for k, v in _tensors(flops_inputs).items()},
            "input": "example input" if example_inputs is not None else "one held-out sample",
            "budget": plan.budget if plan is not None else None,
            "counter": "torch.utils.flop_counter.FlopCounterMode (original); midl_convert.flops formulas (converted layers)",
            "dense": counted.dense, "midl": counted.midl, "ratio": counted.ratio, "ran": ran.total,
            "converted_dense": counted.converted_dense, "converted_midl": counted.converted_midl,
            "converted_ratio": counted.converted_ratio,
            "heldout": {"dense": held.dense, "midl": held.midl, "ratio": held.ratio, "converted_ratio": held.converted_ratio,
                        "batches": min(len(batches), HELDOUT_FLOPS_BATCHES)},
        },
        parameters={"original": n_orig, "converted": n_conv, "added": n_conv - n_orig},
        quality={"kind": OUTPUT_KIND[task], "headline": key, "value": value, "metrics": quality, "batches": len(batches)},
        latency=latency,
        memory=memory,
        layers=layer_reports,
        skipped=[{"path": lp.path, "reason": lp.reason} for lp in plan.layers if not lp.convert] if plan is not None else [],
        notes=[
            f"FLOPs: {'the example input' if example_inputs is not None else 'one sample of the first held-out batch'}; 2 per multiply-add, 1 per elementwise op or top-k element; "
            "attention counted on SDPA's math backend.",
            "Active fraction: mean share of neurons on the exact path over the held-out batches (layer stats).",
            *(["Layers at keep 1.0 run the original matmul and no gate: their ratio is exactly 1."]
              if any(m.keep >= 1.0 for m in layers.values()) else []),
        ],
    )


def slower_reason(latency: dict[str, Any], layers: Sequence[LayerReport], ran: RanFlops | None = None) -> str | None:
    """"slower than dense: <why>" when any measured speed-up is below 1, else None. The paths are
    ``ran``'s (those of the timed call shape, e.g. batch-1 decode), else the layers' own."""
    call = latency.get("call_shape") or {}
    ratios = [r["speedup"] for r in latency["results"]] + [call.get("speedup"), call.get("tokens_per_s_speedup")]
    worst = min((r for r in ratios if r is not None), default=None)
    if worst is None or worst >= 1.0:
        return None
    path_of = ran.route_of if ran is not None else {lr.path: lr.ran_path for lr in layers}.get
    masked = [lr for lr in layers if path_of(lr.path) == "masked"]
    slow = [lr for lr in layers if lr.dense_ms is not None and lr.midl_ms is not None and lr.midl_ms > lr.dense_ms]
    if masked:
        rows = sorted({r for lr in masked for r in ran.rows[lr.path]} if ran is not None
                      else {lr.rows // max(1, lr.calls) for lr in masked})
        unit = {"token": "token", "pixel": "pixel"}.get(masked[0].granularity, "sample")
        why = (f"per-{unit} masks on "
               f"{'/'.join(map(str, rows))}-row calls run as dense compute plus masking ({len(masked)} of {len(layers)} "
               f"converted layers)")
    elif slow:
        why = (f"{len(slow)} of {len(layers)} converted layers measured slower than their dense layer (gate, selection and "
               f"light path cost more than the skipped work at this shape)")
    else:
        why = "the time the converted layers save is less than the gates, selections and light paths add end to end"
    return f"slower than dense ({worst:.3f}x): {why}"


def versions() -> dict[str, str | None]:
    """Versions of the libraries a report's numbers depend on."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("timm", "timm"), ("transformers", "transformers"), ("midl_convert", "midl-convert")):
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _layer_report(path: str, layer: SparseLayer, kinds: dict[str, str], f: Any, active: float | None) -> LayerReport:
    kind = kinds.get(path) or layer.target_kind
    return LayerReport(
        path=path, kind=kind, in_features=layer.in_features, out_features=layer.out_features, keep=layer.keep,
        rank=layer.rank, granularity=layer.granularity, k=layer.k, side=layer.side, calls=len(f.calls), rows=sum(r for r, _ in f.calls),
        groups=sum(g for _, g in f.calls), active_fraction=active, dense_flops=f.dense, midl_flops=f.midl,
        ratio=f.ratio, flops_parts=dict(f.parts),
    )


def _quality_and_activity(
    layers: dict[str, SparseLayer], student: nn.Module, teacher: nn.Module, batches: list[Batch], task: str
) -> tuple[dict[str, float], dict[str, float | None]]:
    """Quality on the held-out batches, with each layer's exact-path share recorded along the way."""
    saved = {p: m.track_stats for p, m in layers.items()}
    for m in layers.values():
        m.track_stats = True
        m.reset_stats()
    try:
        quality = compare(student, teacher, batches, OUTPUT_KIND[task])
        active = {p: m.active_fraction for p, m in layers.items()}
    finally:
        for p, m in layers.items():
            m.track_stats = saved[p]
    # keep >= 1 runs the dense layer and records nothing: every neuron is exact by construction
    active.update({p: 1.0 for p, m in layers.items() if active[p] is None and m.keep >= 1.0})
    return quality, active


def _runtime(
    student: nn.Module, teacher: nn.Module, batch: Batch, sizes: Sequence[int], repeats: int, device: torch.device,
    advance: Callable[[], None] = lambda: None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Latency (interleaved teacher/student runs) and peak memory at each batch size."""
    lat, mem = [], []
    for size in sizes:
        b = _resize(batch, size)
        warm = _warm_up((teacher, student), b, device)
        times = _interleaved(teacher, student, b, repeats, device, advance)
        t, s = _timing(times[0]), _timing(times[1])
        lat.append({"batch_size": size, "warmup_runs": warm, "teacher": t, "student": s,
                    "speedup": t["median_ms"] / s["median_ms"] if s["median_ms"] else None})
        mem.append({"batch_size": size, "teacher": _peak_memory(teacher, b, device), "student": _peak_memory(student, b, device)})
    name = _device_name(device)
    timer = "time.perf_counter" + (" with torch.cuda.synchronize" if device.type == "cuda" else "")
    method = (
        "torch.cuda.max_memory_allocated minus memory allocated before the forward, plus parameter and buffer bytes"
        if device.type == "cuda" else
        "torch.profiler (profile_memory=True): peak of the running sum of CPU tensor allocations during one forward, "
        "plus parameter and buffer bytes"
    )
    return ({"device": name, "timer": timer, "repeats": repeats, "results": lat},
            {"device": name, "method": method, "results": mem})


@torch.no_grad()
def _interleaved(teacher: nn.Module, student: nn.Module, batch: Batch, repeats: int, device: torch.device,
                 advance: Callable[[], None] = lambda: None) -> tuple[list[float], list[float]]:
    """Milliseconds per forward, teacher and student alternating (order flipped each round) so drift hits both."""
    models = (teacher, student)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            _sync(device)
            start = time.perf_counter()
            run(models[j], batch)
            _sync(device)
            times[j].append((time.perf_counter() - start) * 1e3)
        advance()
    return times


@torch.no_grad()
def _warm_up(models: Sequence[nn.Module], batch: Batch, device: torch.device) -> int:
    """Run the models in turn for ``WARMUP_S`` seconds (at least twice each): the first calls are slow."""
    start, runs = time.perf_counter(), 0
    while runs < 2 or (time.perf_counter() - start < WARMUP_S and runs < WARMUP_MAX):
        for m in models:
            run(m, batch)
        _sync(device)
        runs += 1
    return runs


def _timing(ms: list[float]) -> dict[str, float]:
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "min_ms": min(ms)}


@torch.no_grad()
def _peak_memory(model: nn.Module, batch: Batch, device: torch.device) -> dict[str, int | None]:
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run(model, batch)
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        extra = _cpu_forward_peak(model, batch)
    return {"weights_bytes": weights, "forward_peak_bytes": extra, "peak_bytes": weights + extra}


def _cpu_forward_peak(model: nn.Module, batch: Batch) -> int:
    """Peak bytes of CPU tensors alive at once during one forward, from the profiler's allocation events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(model, batch)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler library's own C++ log lines (profiler_start, gpuGetDeviceCount) on fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ----- small helpers ---------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _tensors(inputs: Any) -> dict[str, torch.Tensor]:
    items = inputs.items() if isinstance(inputs, dict) else enumerate(inputs)
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor)}


def _resize(batch: Batch, size: int) -> Batch:
    """The first ``size`` samples of ``batch``, repeated when it holds fewer."""
    def fit(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            return t
        return t.repeat(math.ceil(size / t.shape[0]), *[1] * (t.dim() - 1))[:size] if t.shape[0] < size else t[:size]

    return batch.map(fit)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _jsonable(value: Any) -> Any:
    """Plain JSON values from settings (pydantic configs, paths, tuples)."""
    if hasattr(value, "model_dump"):
        return _jsonable(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _finite(value: Any) -> Any:
    """NaN and infinity become null: report.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _g(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def _si(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


__all__ = ["REPORT_SCHEMA", "SCHEMA_VERSION", "LayerReport", "Report", "build_report", "versions"]
