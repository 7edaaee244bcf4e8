"""The report as text: ``report.md`` and the rich tables on the terminal, from the same rows."""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import Report

PRINT_ROWS = 20  # per-layer rows printed to the terminal; report.md has them all


def summary_rows(report: Report) -> list[tuple[str, str]]:
    """The headline numbers as (label, value) pairs, shared by the terminal and markdown."""
    f, p, q = report.flops, report.parameters, report.quality
    held = f.get("heldout")
    rows = [
        *([(f"FLOPs ratio, whole model, held-out data ({held['batches']} batches)", fmt(held["ratio"])),
           ("FLOPs ratio, converted layers, held-out data", fmt(held["converted_ratio"]))] if held else []),
        (f"FLOPs dense ({f.get('input', '1 sample')})", _si(f["dense"])),
        (f"FLOPs MID-L ({f.get('input', '1 sample')})", _si(f["midl"])),
        *([(f"FLOPs that ran ({f.get('input', '1 sample')}; paths as run)", _si(f["ran"]))] if f.get("ran") is not None else []),
        (f"FLOPs ratio, whole model ({f.get('input', '1 sample')}; dense / MID-L)", fmt(f["ratio"])),
        (f"FLOPs ratio, converted layers ({f.get('input', '1 sample')})", fmt(f["converted_ratio"])),
        *([(f"Layer budget: target / predicted {'speed-up (measured time)' if f['budget'].get('axis') == 'time' else 'ratio'}",
            f"{fmt(f['budget']['target'])} / {fmt(f['budget']['predicted_ratio'])}")] if f.get("budget") else []),
        ("Converted layers", str(len(report.layers))),
        ("Parameters original / converted", f"{p['original']:,} / {p['converted']:,}"),
        (f"Quality: {q['headline']}", fmt(q["value"])),
        *([(f"Perplexity on held-out text, dense / converted ({q['metrics']['next_tokens']:.0f} next tokens)",
            f"{q['metrics']['teacher_perplexity']:.2f} / {q['metrics']['perplexity']:.2f} "
            f"({q['metrics']['perplexity'] / q['metrics']['teacher_perplexity'] - 1:+.1%})")]
          if q["metrics"].get("perplexity") is not None else []),
    ]
    call = report.latency.get("call_shape")
    if call:
        rows.append((f"Latency at the call shape ({call['call']}, {call['threads']} threads), dense / converted",
                     f"{call['dense_ms']:.3f} / {call['converted_ms']:.3f} ms"))
        rows.append(("Speed-up at the call shape (measured)", fmt(call["speedup"])))
        if call.get("dense_tokens_per_s") is not None:
            rows.append((f"Greedy decode ({call.get('decoder', 'HF generate')}), tokens/s dense / converted "
                         f"({call['generate_tokens']} new tokens)",
                         f"{call['dense_tokens_per_s']:.1f} / {call['converted_tokens_per_s']:.1f} "
                         f"({fmt(call['tokens_per_s_speedup'])}x)"))
        if call.get("llama_cpp_tokens_per_s") is not None:
            rows.append((f"Greedy decode, llama.cpp on the same {call['llama_cpp']} file, tokens/s; converted / llama.cpp",
                         f"{call['llama_cpp_tokens_per_s']:.1f}; {fmt(call['converted_per_llama_cpp'])}x"))
        elif call.get("llama_cpp_missing"):
            rows.append(("Greedy decode, llama.cpp on the same file", f"not timed: {call['llama_cpp_missing']}"))
    mem = {m["batch_size"]: m for m in report.memory["results"]}
    for lat in report.latency["results"]:
        b, t, s = lat["batch_size"], lat["teacher"], lat["student"]
        rows.append((f"Latency batch {b}, teacher / student (median ± IQR, {report.latency['device']})",
                     f"{t['median_ms']:.3f} ± {t['iqr_ms']:.3f} / {s['median_ms']:.3f} ± {s['iqr_ms']:.3f} ms"))
        rows.append((f"Speed-up batch {b}", fmt(lat["speedup"])))
        if b in mem:
            rows.append((f"Peak memory batch {b}, teacher / student",
                         f"{_bytes(mem[b]['teacher']['peak_bytes'])} / {_bytes(mem[b]['student']['peak_bytes'])}"))
    return rows


def layer_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """The per-layer table: its header and one row of text per converted layer."""
    header = ["layer", "module type", "in", "out", "select", "keep", "rank", "granularity", "active", "dense FLOPs", "MID-L FLOPs", "ratio",
              "ran FLOPs", "ran as", "dense ms", "MID-L ms"]
    rows = [[lr.path, lr.module_type, str(lr.in_features), str(lr.out_features), lr.select, f"{lr.keep:g}", str(lr.rank), lr.granularity,
             fmt(lr.active_fraction), _si(lr.dense_flops), _si(lr.midl_flops), fmt(lr.ratio), _si(lr.ran_flops),
             lr.ran_path or "n/a", _ms(lr.dense_ms), _ms(lr.midl_ms)] for lr in report.layers]
    return header, rows


def markdown(report: Report) -> str:
    """``report.md``: the summary, every converted layer, the layers left dense, the history and the settings."""
    header, rows = layer_rows(report)
    lines = ["# midl-convert report", "", *([f"**{report.slower}**", ""] if report.slower else []), "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(report)]
    lines += ["", f"Memory: {report.memory['method']}", "", "## Converted layers", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if report.skipped:
        lines += ["", "## Left dense", "", "| layer | reason |", "|---|---|"]
        lines += [f"| {s['path']} | {s['reason']} |" for s in report.skipped]
    lines += _history_lines(report)
    lines += ["", "## Settings", "", "```json", json.dumps(report.settings, indent=2), "```"]
    lines += [""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def print_report(report: Report, console: Any = None) -> None:
    """Rich tables on the terminal: the summary, then the first ``PRINT_ROWS`` layers."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    summary = Table(title="midl-convert report", show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    for label, value in summary_rows(report):
        summary.add_row(label, value)
    console.print(summary)
    if report.slower:
        console.print(f"[yellow]{report.slower}[/yellow]", highlight=False, soft_wrap=True)
    console.print(f"[dim]Memory: {report.memory['method']}[/dim]")
    header, rows = layer_rows(report)
    layers = Table(title="Converted layers")
    for i, name in enumerate(header):
        layers.add_column(name, justify="left" if i in (0, 1, 6) else "right")
    for row in rows[:PRINT_ROWS]:
        layers.add_row(*row)
    console.print(layers)
    if len(rows) > PRINT_ROWS:
        console.print(f"... {len(rows) - PRINT_ROWS} more layers (see report.md)")
    for note in report.notes:
        console.print(f"[dim]{note}[/dim]")


def _history_lines(report: Report) -> list[str]:
    """The run's history as markdown: calibration, then held-out quality before and after distillation."""
    lines = []
    if cal := report.history.get("calibration"):
        lines += ["", "## History", "", f"Calibration: {cal['layers']} layers, mean relative layer error "
                  f"{_g(cal['error_before'])} -> {_g(cal['error_after'])}"]
    if d := report.history.get("distillation"):
        lines += [] if cal else ["", "## History"]
        resumed = f", resumed at step {d['resumed_from']}" if d.get("resumed_from") else ""
        trained = (f"; trained {d['train']} ({d['trainable_parameters']:,} parameters)"
                   if d.get("trainable_parameters") is not None else "")
        lines += ["", f"Distillation: {d['steps']} steps in {d['seconds']:.1f} s{resumed}{trained}; loss "
                  f"{_g(d['loss_first'])} -> {_g(d['loss_last'])}", "",
                  "| held-out | after calibration | after distillation |", "|---|---|---|"]
        lines += [f"| {k} | {_g(v)} | {_g(d['after'].get(k))} |" for k, v in d["before"].items()]
    return lines


def fmt(x: float | None) -> str:
    """A ratio or score to three decimals; n/a when it was not measured or not finite."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def _g(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


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


__all__ = ["PRINT_ROWS", "fmt", "layer_rows", "markdown", "print_report", "summary_rows"]
