"""Work shared across processes: under ``accelerate launch`` (or ``torchrun``) each process takes its
share of a list of jobs and the results are gathered on every process, so the layer budget's damage
pass, the other long step beside distillation, spreads over machines as distillation does.

A single process (no launcher) is rank 0 of 1 and nothing is initialised or sent.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.distributed as dist


def rank_and_size() -> tuple[int, int]:
    """This process's index and the number of processes (``(0, 1)`` without a launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    # joins the process group the launcher's environment describes; without cpu=True accelerate runs
    # each CPU process alone (gloo is what CPUs share work over, as distillation does)
    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes


def my_share(jobs: Sequence[Any]) -> list[Any]:
    """Every ``size``-th job from this process's rank: with jobs in a fixed order the shares are disjoint
    and together whole."""
    rank, size = rank_and_size()
    return list(jobs[rank::size])


def gather(part: dict[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """Each process's ``part`` merged, on every process, in the order of ``order``."""
    rank, size = rank_and_size()
    if size == 1:
        return {k: part[k] for k in order if k in part}
    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, part)
    merged = {k: v for p in parts for k, v in p.items()}
    return {k: merged[k] for k in order if k in merged}
