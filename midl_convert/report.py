"""The report: what a conversion costs and buys, measured rather than promised.

Per converted layer its settings, measured exact-path share and FLOPs; for the whole model
FLOPs (``flops.py``), parameters, held-out quality (``quality.compare``), latency (median and
IQR of interleaved runs) and peak memory (``runtime.py``). Saved as ``report.json`` (schema
``REPORT_SCHEMA``, derived from the classes below), ``report.md`` and ``report.png``
(``report_render.py``, ``report_plot.py``).
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import ConfigDict, Field, NonNegativeFloat, NonNegativeInt, TypeAdapter
from torch import nn
from typing_extensions import Annotated, NotRequired, Required, TypedDict

from . import migrate, report_plot, report_render
from .data import Batch
from .errors import MIDLError
from .files import atomic_path, read_json, write_atomic
from .flops import model_flops, model_flops_over
from .latency import DECODE, is_causal_lm, layer_times, model_step
from .log import progress_bar
from .quality import TASK_OUTPUT, compare, headline
from .ran import RanFlops, ran_flops
from .runtime import device_name, measure
from .sparse import SparseLayer
from .surgery import Plan, midl_layers

FORMAT_VERSION = migrate.FORMAT_VERSION  # as midl_config.json's; a version-1 report said schema_version
FILES = ("report.json", "report.md", "report.png")

# ----- what report.json holds: the classes REPORT_SCHEMA is derived from -------------------------
# Nested sections are TypedDicts (plain dicts at run time, typed for the schema). A section admits
# keys it does not name, as the hand-written schema did; Report and LayerReport admit none.
Count = NonNegativeInt
Ratio = float | None  # null where a ratio has no value (nothing converted, NaN)
BatchSize = Annotated[int, Field(ge=1)]
ModelOutput = Literal[tuple(sorted(set(TASK_OUTPUT.values())))]  # type: ignore[valid-type]
_OPEN = ConfigDict(extra="ignore")  # each section's own: sections do not inherit the top level's extra="forbid"


def _about(text: str) -> Any:
    return Field(description=text)


class Versions(TypedDict):
    # other libraries' versions may follow, each a string or null (PEP 728's extra_items says so from typing_extensions 4.13)
    __pydantic_config__ = ConfigDict(json_schema_extra={"additionalProperties": {"type": ["string", "null"]}})  # type: ignore[misc]

    python: str | None
    torch: str | None
    timm: str | None
    transformers: str | None
    midl_convert: str | None


class Settings(TypedDict, total=False):
    """What produced the report; model, config, data and seed are the caller's, versions and device are measured."""

    __pydantic_config__ = _OPEN  # type: ignore[misc]

    model: Annotated[str | dict[str, Any] | None, _about("a name, or a run's model section")]
    config: dict[str, Any] | None
    data: str | None
    seed: int | None
    task: str
    device: Required[str]
    versions: Required[Versions]


class HeldoutFlops(TypedDict, total=False):
    """The same counts summed over the first held-out batches (up to 4) (the headline: adaptive masks
    pick as many neurons as real data makes them)."""

    __pydantic_config__ = _OPEN  # type: ignore[misc]

    dense: Count
    midl: Count
    ratio: Ratio
    converted_ratio: Ratio
    batches: Count


class Flops(TypedDict):
    __pydantic_config__ = _OPEN  # type: ignore[misc]

    input_shapes: dict[str, list[Count]]
    input: NotRequired[Annotated[str, _about("which input the FLOPs were counted on")]]
    budget: NotRequired[Annotated[dict[str, Any] | None, _about("the layer budget's target and prediction, when one planned the run")]]
    counter: str
    dense: Count
    midl: Count
    ratio: Ratio
    ran: NotRequired[Annotated[Count, _about("FLOPs of the paths that actually ran (midl_convert.ran): a call run as dense "
                                             "compute plus masking counts its dense product")]]
    converted_dense: Count
    converted_midl: Count
    converted_ratio: Ratio
    heldout: NotRequired[HeldoutFlops | None]


class Parameters(TypedDict):
    __pydantic_config__ = _OPEN  # type: ignore[misc]

    original: Count
    converted: Count
    added: int


class Quality(TypedDict):
    __pydantic_config__ = _OPEN  # type: ignore[misc]

    output: ModelOutput
    headline: str
    value: Ratio
    metrics: dict[str, float | None]
    batches: Count


class Timing(TypedDict):
    __pydantic_config__ = _OPEN  # type: ignore[misc]

    median_ms: NonNegativeFloat
    q1_ms: NonNegativeFloat
    q3_ms: NonNegativeFloat
    iqr_ms: NonNegativeFloat
    min_ms: NonNegativeFloat


class LatencyResult(TypedDict):
    __pydantic_config__ = _OPEN  # type: ignore[misc]

    batch_size: BatchSize
    warmup_runs: Count
    teacher: Timing
    student: Timing
    speedup: Ratio


class Latency(TypedDict):
    __pydantic_config__ = _OPEN  # type: ignore[misc]

    device: str
    timer: str
    repeats: BatchSize
    results: list[LatencyResult]
    call_shape: NotRequired[Annotated[dict[str, Any], _about("latency.end_to_end at the model's real call shape")]]
    slower: NotRequired[str | None]
    layer_call: NotRequired[str]


class MemoryUse(TypedDict):
    __pydantic_config__ = _OPEN  # type: ignore[misc]

    weights_bytes: Count | None
    forward_peak_bytes: Count | None
    peak_bytes: Count | None


class MemoryResult(TypedDict):
    __pydantic_config__ = _OPEN  # type: ignore[misc]

    batch_size: BatchSize
    teacher: MemoryUse
    student: MemoryUse


class Memory(TypedDict):
    """peak_bytes = weights_bytes (parameters and buffers) + forward_peak_bytes (tensors allocated during one forward)."""

    __pydantic_config__ = _OPEN  # type: ignore[misc]

    device: str
    method: str
    results: list[MemoryResult]


class Skipped(TypedDict):
    __pydantic_config__ = _OPEN  # type: ignore[misc]

    path: str
    reason: str | None


class Calibration(TypedDict, total=False):
    __pydantic_config__ = _OPEN  # type: ignore[misc]

    layers: Count
    error_before: Ratio
    error_after: Ratio


class Distillation(TypedDict, total=False):
    __pydantic_config__ = _OPEN  # type: ignore[misc]

    steps: Count
    seconds: float | None
    resumed_from: int | None
    train: Annotated[str, _about("what trained (--train): gates, midl, lora, bias, norms, full")]
    trainable_parameters: Annotated[Count, _about("parameters trained; LoRA's merge into W when training ends")]
    before: dict[str, float | None]
    after: dict[str, float | None]
    loss_first: float | None
    loss_last: float | None


class History(TypedDict, total=False):
    """What the run did before this measurement: calibration (mean relative layer error) and
    distillation (held-out quality before and after, time, steps, the step it resumed from)."""

    __pydantic_config__ = _OPEN  # type: ignore[misc]

    calibration: Calibration
    distillation: Distillation


@dataclass
class LayerReport:
    """One converted layer: its settings, measured exact-path share and FLOPs on one sample."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    path: str
    module_type: Literal["linear", "conv1d", "conv2d"]
    in_features: Count
    out_features: Count
    keep: float
    rank: Count
    granularity: Literal["token", "sequence", "pixel", "sample"]
    k: Count
    calls: Count
    rows: Count
    groups: Count
    active_fraction: Annotated[Ratio, _about("measured on the held-out data (layer stats); null if never recorded")]
    dense_flops: Count
    midl_flops: Count
    ratio: Ratio
    flops_parts: dict[str, Count]
    select: Annotated[str, _about("the layer's kind (midl_convert/kinds): output picks rows of W (MID-L), input columns, "
                                  "prune one fixed set of columns")] = "output"
    ran_flops: Count | None = None  # FLOPs of the paths that ran on the FLOPs input (ran.py)
    ran_path: Annotated[str | None, _about("the path most calls took: masked, kernel, sparse, dense")] = None
    dense_ms: float | None = None  # measured per call at the model's call shape, dense against converted
    midl_ms: Annotated[float | None, _about("measured per call, interleaved with the dense layer")] = None


# Held-out batches the FLOPs are also counted on (two forwards each, one under FlopCounterMode): enough
# for adaptive masks' mean picks, without doubling a large model's report time.
HELDOUT_FLOPS_BATCHES = 4


def _require_all(schema: dict[str, Any]) -> None:
    """report.json always carries every top-level field, those with defaults too (``to_dict``)."""
    schema["required"] = list(schema["properties"])


@dataclass
class Report:
    """A midl-convert report. FLOPs are counted on one sample (batch size 1); ratios are dense / MID-L
    (above 1: fewer FLOPs)."""

    __pydantic_config__ = ConfigDict(extra="forbid", json_schema_extra=_require_all)

    settings: Settings
    flops: Flops
    parameters: Parameters
    quality: Quality
    latency: Latency
    memory: Memory
    layers: list[LayerReport]
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    format_version: Literal[FORMAT_VERSION] = FORMAT_VERSION  # type: ignore[valid-type]
    history: History = field(default_factory=dict)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        """A report from ``report.json``'s contents, an earlier version's keys renamed (``migrate.py``)."""
        fields = dict(migrate.report_file(data, "the report"))
        fields["layers"] = [LayerReport(**layer) for layer in fields["layers"]]
        return cls(**fields)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write report.json, report.md and report.png into ``directory``, each atomically."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "report.json", json.dumps(self.to_dict(), indent=2, allow_nan=False))
        write_atomic(out / "report.md", self.markdown())
        with atomic_path(out / "report.png") as tmp, open(tmp, "wb") as f:
            report_plot.plot(self, f)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Report":
        path = Path(directory) / "report.json"
        if not path.is_file():
            raise MIDLError(f"no report.json in {str(directory)!r}; pass the folder that Report.save wrote")
        fix = "rerun midl-convert to write the report again"
        import jsonschema

        data = migrate.report_file(read_json(path, fix), repr(str(path)))  # a newer version is refused in one line
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(REPORT_SCHEMA).iter_errors(data))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
            raise MIDLError(f"{str(path)!r} is not a valid midl-convert report (at {where}: {error.message[:160]}); {fix}")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise MIDLError(f"{str(path)!r} is not a midl-convert report ({type(exc).__name__}: {exc}); {fix}") from None

    @property
    def slower(self) -> str | None:
        """One line saying the converted model ran slower than dense, and why; None when it did not."""
        return self.latency.get("slower")

    def markdown(self) -> str:
        """``report.md``'s text (``report_render.markdown``)."""
        return report_render.markdown(self)

    def print(self, console: Any = None) -> None:
        """Rich tables on the terminal: the summary, then the first ``report_render.PRINT_ROWS`` layers."""
        report_render.print_report(self, console)


REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **TypeAdapter(Report).json_schema(),
    "title": "midl-convert report",
}


# ----- building: measure the student against the teacher -------------------------------------
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
    if task not in TASK_OUTPUT:
        raise MIDLError(f"unknown task {task!r}; use one of {', '.join(TASK_OUTPUT)}")
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
        one = batches[0].resized(1)
        flops_inputs = example_inputs if example_inputs is not None else one.inputs
        counted = model_flops(student, teacher, flops_inputs)
        ran = ran_flops(student, flops_inputs)
        quality, active = _quality_and_activity(layers, student, teacher, batches, task)
        held = model_flops_over(student, teacher, [b.inputs for b in batches[:HELDOUT_FLOPS_BATCHES]])
        with progress_bar("latency", len(latency_batch_sizes) * repeats, progress) as advance:
            latency, memory = measure(student, teacher, batches[0], latency_batch_sizes, repeats, device, advance)
        times = layer_times(student, model_step(student, flops_inputs)) if device.type == "cpu" else {}
        at_call = ran_flops(student, None, model_step(student, flops_inputs)) if is_causal_lm(student) else ran
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    types = {lp.path: lp.module_type for lp in plan.layers} if plan is not None else {}
    layer_reports = [_layer_report(path, layer, types, counted.layers[path], active[path]) for path, layer in layers.items()]
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
        settings={**_jsonable(settings or {}), "task": task, "device": device_name(device), "versions": versions()},
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
        quality={"output": TASK_OUTPUT[task], "headline": key, "value": value, "metrics": quality, "batches": len(batches)},
        latency=latency,
        memory=memory,
        layers=layer_reports,
        skipped=[{"path": lp.path, "reason": lp.reason} for lp in plan.layers if not lp.convert] if plan is not None else [],
        notes=[
            f"FLOPs: {'the example input' if example_inputs is not None else 'one sample of the first held-out batch'}; 2 per multiply-add, 1 per elementwise op or top-k element; "
            "attention counted on SDPA's math backend.",
            "Active fraction: mean share of neurons on the exact path over the held-out batches (layer stats).",
            *(["Layers at keep 1.0 run the original matmul and no gate: their ratio is exactly 1."]
              if any(m.keeps_all for m in layers.values()) else []),
        ],
    )


def slower_reason(latency: dict[str, Any], layers: Sequence[LayerReport], ran: RanFlops | None = None) -> str | None:
    """"slower than dense: <why>" when any measured speed-up is below 1, else None. The reason is
    that of the slowest measurement: batch-1 latency runs the example input (the layers' own
    paths), the call shape and greedy decode run ``ran``'s paths (e.g. batch-1 decode). A causal LM
    can be slower on its example sentence (many rows per call, dense compute plus masking) and
    faster where it is used, decoding: the line then says both."""
    call = latency.get("call_shape") or {}
    measured = [("batch 1 on the example input", r["speedup"], None) for r in latency["results"]]
    measured += [("at the call shape", call.get("speedup"), ran), ("in greedy decode", call.get("tokens_per_s_speedup"), ran)]
    measured = [m for m in measured if m[1] is not None]
    if not measured or min(m[1] for m in measured) >= 1.0:
        return None
    where, worst, routes = min(measured, key=lambda m: m[1])
    route_of = routes.route_of if routes is not None else {lr.path: lr.ran_path for lr in layers}.get
    masked = [lr for lr in layers if route_of(lr.path) == "masked"]
    slow = [lr for lr in layers if lr.dense_ms is not None and lr.midl_ms is not None and lr.midl_ms > lr.dense_ms]
    if masked:
        rows = sorted({r for lr in masked for r in routes.rows[lr.path]} if routes is not None
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
    faster = [f"{w} {r:.3f}x" for w, r, _ in measured if r >= 1.0]
    label = f"{worst:.3f}x" if len(measured) == 1 else f"{worst:.3f}x {where}"
    return f"slower than dense ({label}): {why}" + (f"; faster {', '.join(faster)}" if faster else "")


def versions() -> dict[str, str | None]:
    """Versions of the libraries a report's numbers depend on."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("timm", "timm"), ("transformers", "transformers"), ("midl_convert", "midl-convert")):
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _layer_report(path: str, layer: SparseLayer, types: dict[str, str], f: Any, active: float | None) -> LayerReport:
    return LayerReport(
        path=path, module_type=types.get(path) or layer.module_type, in_features=layer.in_features, out_features=layer.out_features, keep=layer.keep,
        rank=layer.rank, granularity=layer.granularity, k=layer.k, select=layer.select, calls=len(f.calls), rows=sum(r for r, _ in f.calls),
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
        quality = compare(student, teacher, batches, TASK_OUTPUT[task], next_token=task == "causal-lm")
        active = {p: m.active_fraction for p, m in layers.items()}
    finally:
        for p, m in layers.items():
            m.track_stats = saved[p]
    # keep >= 1 runs the dense layer and records nothing: every neuron is exact by construction
    active.update({p: 1.0 for p, m in layers.items() if active[p] is None and m.keeps_all})
    return quality, active


# ----- small helpers ---------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _tensors(inputs: Any) -> dict[str, torch.Tensor]:
    items = inputs.items() if isinstance(inputs, dict) else enumerate(inputs)
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor)}


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


__all__ = ["FORMAT_VERSION", "REPORT_SCHEMA", "LayerReport", "Report", "build_report", "versions"]
