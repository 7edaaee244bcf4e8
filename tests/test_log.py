"""What the library tells its user: log lines through logging, bars only when asked and on a terminal."""
import io
import logging

import torch
from rich.console import Console

import midl_convert as mc
from midl_convert import log
from helpers import TinyNet, tiny_data


def _terminal(monkeypatch) -> io.StringIO:
    buffer = io.StringIO()
    monkeypatch.setattr(log, "_console", Console(file=buffer, force_terminal=True, width=120))
    return buffer


def test_progress_argument_turns_the_calibration_bar_off(monkeypatch):
    model = TinyNet()
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=2), torch.randn(1, 16))
    batches = [tiny_data().train_batch(0, 16)]
    shown = _terminal(monkeypatch)
    mc.calibrate(model, batches, progress=False)
    assert shown.getvalue() == ""
    mc.calibrate(model, batches)
    assert "calibrating" in shown.getvalue() and "2/2" in shown.getvalue()


def test_setup_routes_the_library_logger_through_rich(monkeypatch):
    shown = _terminal(monkeypatch)
    log.setup(logging.WARNING)
    log.logger.info("hidden line")
    log.logger.warning("shown line")
    with log.progress_bar("bar", 3) as advance:  # --quiet: no bars either
        advance()
    assert "shown line" in shown.getvalue() and "hidden line" not in shown.getvalue() and "bar" not in shown.getvalue()
    log.setup(logging.INFO)
