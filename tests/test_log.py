"""What the library tells its user: log lines through logging, bars only when asked and on a terminal."""
import io
import logging

import pytest
import torch
from rich.console import Console

import midl_convert as mc
from midl_convert import log
from helpers import TinyNet, tiny_data


def _terminal(monkeypatch) -> io.StringIO:
    buffer = io.StringIO()
    monkeypatch.setattr(log, "_console", Console(file=buffer, force_terminal=True, width=120))
    return buffer


def _budget(model, batches, progress):
    mc.convert(model, mc.MIDLConfig(flops_ratio=1.2, rank=2, budget_ranks=[2], budget_keeps=[0.5], budget_fit_batches=0),
               torch.randn(1, 16), batches, output="logits", progress=progress)


def _calibrate(model, batches, progress):
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=2), torch.randn(1, 16))
    mc.calibrate(model, batches, progress=progress)


def _latency(model, batches, progress):
    teacher = TinyNet()
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=2), torch.randn(1, 16))
    mc.report(model, teacher, batches, "classifier", repeats=3, progress=progress)


@pytest.mark.parametrize("step,label", [(_budget, "layer budget"), (_calibrate, "calibrating"), (_latency, "latency")])
def test_progress_argument_turns_each_long_steps_bar_off(monkeypatch, tmp_path, step, label):
    monkeypatch.setenv("MIDL_CACHE_DIR", str(tmp_path))
    batches = [tiny_data().train_batch(0, 16)]
    shown = _terminal(monkeypatch)
    step(TinyNet(), batches, progress=False)
    assert label not in shown.getvalue()
    step(TinyNet(), batches, progress=True)
    assert label in shown.getvalue()


def test_setup_routes_the_library_logger_through_rich(monkeypatch):
    shown = _terminal(monkeypatch)
    log.setup(logging.WARNING)
    log.logger.info("hidden line")
    log.logger.warning("shown line")
    with log.progress_bar("bar", 3) as advance:  # --quiet: no bars either
        advance()
    assert "shown line" in shown.getvalue() and "hidden line" not in shown.getvalue() and "bar" not in shown.getvalue()
    log.setup(logging.INFO)
