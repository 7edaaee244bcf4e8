"""A short teacher-student fine-tune: the original model teaches its converted copy.

``train`` names what learns (``recovery.py``): by default the gates and light paths; ``lora``, ``bias``
and ``norms`` add capacity that costs nothing at run time (a LoRA delta merged into ``W`` when training
ends, the biases, the norms' scales), ``full`` trains every weight at its own, lower learning rate. The
loss matches the teacher at the output and, with ``block_weight``, block by block. AdamW, linear
warm-up then cosine decay, gradient clipping, optional bf16 autocast; devices and data parallelism through
``accelerate`` (``accelerate launch`` / ``torchrun`` need no code change: each process takes its
share of every global batch, so the averaged gradient equals the single-process one).
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from . import log as _log
from . import lora
from .calibrate import fit_thresholds
from .data import CALIBRATION_OFFSET, Batch, Data
from .errors import MIDLError
from .files import atomic_path, make_own_dir
from .recovery import parse_train, parts, select
from .sparse import SparseLayer
from .quality import TASK_OUTPUT, compare, distill_loss, headline, model_output, positions

CHECKPOINT = "distill_checkpoint.pt"
CHECKPOINT_PURPOSE = "checkpoints"  # the marker of a checkpoint folder this tool made (files.make_own_dir)
EXPLODING = 10.0  # a loss this many times the run's first (or 1e-3) is diverging: no checkpoint keeps it
NOT_RESULT = {"log_every", "checkpoint_every"}  # settings that leave the trained weights unchanged


class DistillConfig(BaseModel):
    """Settings of the fine-tune (also the ``distill`` section of a recipe)."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(100, ge=0)
    lr: float = Field(1e-3, gt=0)
    base_lr: float = Field(1e-5, gt=0, description="learning rate of the original weights when train='full'")
    batch_size: int = Field(16, ge=1)
    train: str = Field("all", validate_default=True,
                       description="what trains (recovery.py): gates, midl, lora, bias, norms, all, full, or a comma list "
                                   "such as 'midl,lora'; 'all' (gates, light paths, LoRA deltas merged into W, biases, "
                                   "norms) recovered most on MiniLM and SmolLM2, where 'midl' alone moved held-out "
                                   "quality half as much or not at all")
    lora_rank: int = Field(8, ge=1, description="rank of the LoRA delta on each sparse layer's W (train 'lora' or 'all')")
    lora_alpha: Optional[float] = Field(None, gt=0, description="LoRA scale alpha / rank; default alpha = rank")
    lora_lr: Optional[float] = Field(None, gt=0, description="learning rate of the LoRA deltas, biases and norms; default lr")
    temperature: float = Field(2.0, gt=0)
    output_weight: float = Field(1.0, ge=0)
    layer_weight: float = Field(0.0, ge=0, description="weight of each MID-L layer's output error against its dense output")
    block_weight: float = Field(0.0, ge=0, description="weight of each block's hidden state error against the teacher's")
    warmup: float = Field(0.05, ge=0, le=1, description="share of steps spent warming up")
    grad_clip: float = Field(1.0, gt=0)
    bf16: bool = False
    calibration_batches: int = Field(4, ge=0)
    checkpoint_every: int = Field(50, ge=0, description="steps between resumable checkpoints when a run has a checkpoint "
                                                        "folder (the CLI's is beside --out); 0 = none")
    log_every: int = Field(10, ge=1)
    seed: int = 0

    @field_validator("train")
    @classmethod
    def _train(cls, value: str) -> str:
        return parse_train(value)


@dataclass
class DistillResult:
    steps: int
    losses: list[float]
    before: dict[str, float]
    after: dict[str, float]
    seconds: float
    resumed_from: int | None = None
    checkpoint: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    train: str = "midl"
    trainable: int = 0  # parameters trained (LoRA's included; they merge into W when training ends)


def trainable(model: nn.Module, cfg: DistillConfig) -> list[dict]:
    """The optimizer's parameter groups for ``cfg.train``; every other parameter is frozen. With ``lora``
    this attaches the LoRA deltas (``lora.merge`` folds them into ``W``)."""
    groups = select(model, cfg.train)
    extra = cfg.lora_lr or cfg.lr
    for p in model.parameters():
        p.requires_grad_(False)
    if "lora" in parts(cfg.train):
        groups["lora"] = lora.attach(model, cfg.lora_rank, cfg.lora_alpha)
    rates = {"midl": cfg.lr, "lora": extra, "bias": extra, "norms": extra, "base": cfg.base_lr}
    out = []
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(True)
        if params:
            out.append({"params": params, "lr": rates[name], "name": name})
    return out


def _schedule(step: int, total: int, warmup: float) -> float:
    warm = max(1, int(total * warmup))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _shard(batch: Batch, rank: int, world: int) -> Batch:
    return batch if world == 1 else batch.map(lambda t: t[rank::world])


class _LayerLoss:
    """Each MID-L layer's output against the original layer's output on the same input (hooks)."""

    def __init__(self, model: nn.Module) -> None:
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, SparseLayer)]

    def _hook(self, mod: SparseLayer, inputs: tuple, out: torch.Tensor) -> None:
        with torch.no_grad():
            ref = mod.dense_forward(inputs[0])
        self.terms.append(F.mse_loss(out.float(), ref.float()) / ref.float().pow(2).mean().clamp_min(1e-8))

    def pop(self) -> torch.Tensor | None:
        terms, self.terms = self.terms, []
        return torch.stack(terms).mean() if terms else None

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def blocks(model: nn.Module) -> list[str]:
    """Names of the model's blocks: the children of the ``ModuleList`` / ``Sequential`` with the most
    children that hold sparse layers (a transformer's layers, a CNN's stages); ``[]`` when none holds two."""
    best: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)):
            kids = [c for c in mod.children() if any(isinstance(m, SparseLayer) for m in c.modules())]
            if len(kids) > len(best) and len(kids) >= 2:
                best = [f"{name}.{child}" if name else child for child, _ in mod.named_children()]
    return best


class _BlockLoss:
    """Each block's output hidden state against the teacher's on the same batch (hooks on both models):
    mean squared error over real tokens, relative to the teacher's mean square."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        self.outs: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        names = blocks(student)  # the teacher is the dense original: its blocks by the same names
        self.handles = [h for n in names for h in (student.get_submodule(n).register_forward_hook(self._keep("student")),
                                                   teacher.get_submodule(n).register_forward_hook(self._keep("teacher")))]

    def _keep(self, side: str):
        def hook(mod: nn.Module, inputs: tuple, out: object) -> None:
            self.outs[side].append(out if isinstance(out, torch.Tensor) else out[0])
        return hook

    def pop(self, batch: Batch) -> torch.Tensor:
        s, t = self.outs["student"], self.outs["teacher"]
        self.outs = {"student": [], "teacher": []}
        terms = []
        for a, b in zip(s, t):
            if a.dim() == 3:  # (batch, tokens, width): real tokens only
                a, b = positions(a, batch), positions(b, batch)
            b = b.detach().float()
            terms.append(F.mse_loss(a.float(), b) / b.pow(2).mean().clamp_min(1e-8))
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def run_settings(cfg: DistillConfig, data: Data, task: str) -> dict:
    """What a checkpoint must have been trained with to be resumed: every setting that changes the result."""
    return {**cfg.model_dump(exclude=NOT_RESULT), "data": data.spec, "data_seed": data.seed, "train_items": len(data.train),
            "task": task}


def weights_digest(model: nn.Module) -> str:
    """A hash of every tensor of ``model`` (names, shapes, bytes): the plan, the weights and the calibration."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _resumable(path: Path, key: dict) -> dict | None:
    """The checkpoint at ``path`` when it was written by a run with the same ``key``; else one line says why not."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file is not resumed, whatever torch raises
        _say(f"checkpoint {path} cannot be read ({type(exc).__name__}); starting distillation over")
        return None
    old = state.get("key", {}) if isinstance(state, dict) else {}
    if old == key:
        return state
    changed = [f"{k} {old.get('settings', {}).get(k)!r} -> {v!r}" for k, v in key["settings"].items()
               if old.get("settings", {}).get(k) != v]
    if old.get("weights") != key["weights"]:
        changed.append("the converted model (plan, weights or calibration)")
    _say(f"checkpoint {path} is from a run with other settings ({', '.join(changed)}); starting distillation over")
    return None


def _healthy(losses: list[float], since: int, params: list[nn.Parameter]) -> bool:
    """A checkpoint is kept only of a run whose recent losses are finite and not exploding, and whose weights are finite."""
    window = losses[since:]
    return (all(math.isfinite(x) for x in window) and max(window, default=0.0) <= EXPLODING * max(losses[0], 1e-3)
            and all(bool(torch.isfinite(p).all()) for p in params))


def _say(line: str) -> None:
    """A line the user must see even under --quiet: a resume, or a checkpoint that is not used."""
    print(line, file=sys.stderr, flush=True)


def _reporter(total: int, log_every: int):
    """A rich progress bar on a terminal (not under --quiet); a log line every ``log_every`` steps otherwise."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = _log.console()
    if console.is_terminal and _log.bars_shown():
        progress = Progress(TextColumn("distil"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=console)
        task = progress.add_task("distil", total=total, loss=float("nan"))
        progress.start()
        return (lambda step, loss: progress.update(task, completed=step, loss=loss)), progress.stop
    def log(step: int, loss: float) -> None:
        if step % log_every == 0 or step == total:
            _log.logger.info(f"distil step {step}/{total} loss {loss:.5f}")
    return log, (lambda: None)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Data,
    task: str = "classifier",
    config: DistillConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    eval_batches: list[Batch] | None = None,
    device: str | None = None,
    **overrides,
) -> DistillResult:
    """Train ``student`` to match ``teacher`` on ``data``; returns the loss curve and held-out agreement.

    ``overrides`` set any ``DistillConfig`` field (``steps=300, lr=1e-3``). ``device="cpu"`` keeps
    the run on the CPU even where a GPU exists; otherwise ``accelerate`` picks the device. With ``checkpoint_dir``
    a checkpoint is written atomically every ``checkpoint_every`` steps (only while the loss is finite
    and not exploding) and a rerun with the same settings and starting weights resumes from it with the
    same result as an uninterrupted run; a checkpoint of other settings is set aside with one line.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cfg = (config or DistillConfig()).model_copy(update=overrides)
    cfg = DistillConfig.model_validate(cfg.model_dump())
    output = TASK_OUTPUT[task]
    acc = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if cfg.bf16 else "no",
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(cfg.seed)
    teacher.eval().requires_grad_(False).to(acc.device)
    student.to(acc.device)
    eval_batches = eval_batches if eval_batches is not None else data.heldout_batches(cfg.batch_size)
    eval_batches = [b.to(acc.device) for b in eval_batches]
    before = compare(student.eval(), teacher, eval_batches, output)
    # the digest is taken before the LoRA deltas attach: their seeded start is a setting, not the model
    digest = weights_digest(student) if checkpoint_dir else None
    groups = trainable(student, cfg)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.steps, cfg.warmup))
    start, losses, resumed = 0, [], None
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    key = {"settings": run_settings(cfg, data, task), "weights": digest} if ckpt is not None else {}
    state = _resumable(ckpt, key) if ckpt is not None and ckpt.is_file() else None
    if state is not None:
        student.load_state_dict(state["student"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, losses, resumed = state["step"], list(state["losses"]), state["step"]
        if acc.is_main_process:
            _say(f"resuming distillation at step {start} of {cfg.steps} from {ckpt}")
    elif ckpt is not None:
        ckpt.unlink(missing_ok=True)  # another run's checkpoint is never the "last good" one of this run
    model, opt = acc.prepare(student, opt)
    student.eval()  # dropout off: a run is deterministic, so resuming reproduces it
    for m in student.modules():
        if isinstance(m, SparseLayer):
            m.train()  # Top-k with the straight-through gate gradient
    layer_loss = _LayerLoss(student) if cfg.layer_weight > 0 else None
    block_loss = _BlockLoss(student, teacher) if cfg.block_weight > 0 else None
    update, finish = _reporter(cfg.steps, cfg.log_every) if acc.is_main_process else ((lambda *a: None), (lambda: None))
    t0 = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            batch = _shard(data.train_batch(step, cfg.batch_size), acc.process_index, acc.num_processes).to(acc.device)
            with torch.no_grad():
                target = model_output(teacher, batch, output)
            with acc.autocast():
                out = model_output(model, batch, output)
                loss = cfg.output_weight * distill_loss(out, target, output, batch, cfg.temperature)
                if layer_loss is not None:
                    loss = loss + cfg.layer_weight * layer_loss.pop()
                if block_loss is not None:
                    loss = loss + cfg.block_weight * block_loss.pop(batch)
            if not torch.isfinite(loss):
                kept = f"the last good checkpoint is {ckpt}" if ckpt is not None and ckpt.is_file() else "no checkpoint was written"
                raise MIDLError(f"distillation loss became {loss.item()} at step {step}; {kept}; lower --lr or disable bf16 "
                                f"(a run with other settings starts over)")
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            acc.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(acc.reduce(loss.detach(), "mean")))
            update(step + 1, losses[-1])
            every = cfg.checkpoint_every
            if (ckpt is not None and every and (step + 1) % every == 0 and acc.is_main_process
                    and _healthy(losses, max(0, step + 1 - every), params)):
                if not ckpt.parent.exists():
                    make_own_dir(ckpt.parent, CHECKPOINT_PURPOSE)
                trained = {n for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}
                with atomic_path(ckpt) as tmp:
                    torch.save({
                        "student": {k: v.detach().cpu() for k, v in acc.unwrap_model(model).state_dict().items() if k in trained},
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step + 1, "losses": losses,
                        "key": key,
                    }, tmp)
    except BaseException:
        lora.merge(acc.unwrap_model(model), keep=False)  # a failed run leaves the model as it came
        raise
    finally:
        finish()
        for extra in (layer_loss, block_loss):
            if extra is not None:
                extra.close()
    student = acc.unwrap_model(model)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    lora.merge(student)  # the deltas fold into W: the saved model has its original parameters and speed
    if any(m.adaptive for m in student.modules() if isinstance(m, SparseLayer)):
        # Training moved the gates: refit the thresholds so each layer keeps the share its FLOPs count.
        dev = next(student.parameters()).device
        fit_thresholds(student, [data.train_batch(CALIBRATION_OFFSET + i, cfg.batch_size).to(dev)
                                 for i in range(max(1, cfg.calibration_batches))])
    after = compare(student, teacher, eval_batches, output)
    return DistillResult(cfg.steps, losses, before, after, time.perf_counter() - t0, resumed,
                         str(ckpt) if ckpt is not None and ckpt.is_file() else None, train=cfg.train,
                         trainable=sum(p.numel() for p in params))


def summary(result: DistillResult) -> str:
    key, before = headline(result.before)
    return f"{key} {before:.4f} -> {result.after[key]:.4f} after {result.steps} steps ({result.seconds:.1f}s)"
