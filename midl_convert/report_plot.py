"""The report as a picture, ``report.png``: per converted layer its FLOPs, active fraction and time."""
from __future__ import annotations

import math
from typing import IO, TYPE_CHECKING, Any

from .report_render import fmt

if TYPE_CHECKING:
    from .report import Report


def plot(report: Report, f: IO[bytes]) -> None:
    """Write the PNG to ``f``: three panels sharing the layer axis (matplotlib loads only here)."""
    from matplotlib.figure import Figure

    layers = report.layers
    names = [lr.path for lr in layers] or ["(none)"]
    n, y = len(names), list(range(len(names)))
    fig = Figure(figsize=(13, max(4.0, 0.28 * n + 1.8)), dpi=100, layout="constrained")
    ax_f, ax_a, ax_t = fig.subplots(1, 3, sharey=True, width_ratios=(3, 2, 2))
    ax_f.barh([i - 0.2 for i in y], [lr.dense_flops for lr in layers] or [0], 0.4, label="dense")
    ax_f.barh([i + 0.2 for i in y], [lr.midl_flops for lr in layers] or [0], 0.4, label="MID-L")
    ax_f.set(yticks=y, xlabel="FLOPs per sample", title=f"FLOPs per layer (converted ratio {fmt(report.flops['converted_ratio'])})")
    ax_f.set_yticklabels(names, fontsize=8)
    ax_f.invert_yaxis()
    top = max([lr.dense_flops for lr in layers] + [lr.midl_flops for lr in layers] + [1])
    ax_f.set_xlim(0, top * 1.3)  # headroom on the right: the legend covers no bar
    ax_f.legend(loc="lower right")
    active = [lr.active_fraction if lr.active_fraction is not None else math.nan for lr in layers] or [math.nan]
    ax_a.barh(y, active, 0.6, color="tab:green", label="measured")
    ax_a.scatter([lr.keep for lr in layers] or [math.nan], y, marker="|", s=120, color="black", label="keep", zorder=3)
    ax_a.set(xlim=(0, 1.35), xticks=[0, 0.25, 0.5, 0.75, 1.0], xlabel="share of neurons on the exact path",
             title="Active fraction (held-out data)")
    ax_a.legend(loc="lower right")
    _plot_times(report, ax_t, y)
    fig.savefig(f, format="png")


def _plot_times(report: Report, ax: Any, y: list[int]) -> None:
    """Each converted layer's measured time per call, dense against converted."""
    dense = [lr.dense_ms if lr.dense_ms is not None else math.nan for lr in report.layers] or [math.nan]
    midl = [lr.midl_ms if lr.midl_ms is not None else math.nan for lr in report.layers] or [math.nan]
    ax.barh([i - 0.2 for i in y], dense, 0.4, label="dense")
    ax.barh([i + 0.2 for i in y], midl, 0.4, label="MID-L")
    ax.set(xlabel=f"ms per call ({report.latency.get('layer_call', 'the FLOPs input')})", title="Measured time per layer")
    finite = [v for v in dense + midl if math.isfinite(v)]
    ax.set_xlim(0, (max(finite) if finite else 1.0) * 1.3)
    ax.legend(loc="lower right")


__all__ = ["plot"]
