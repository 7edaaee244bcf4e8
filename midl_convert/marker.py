"""How a converted Hugging Face model's config says so, so that a dense load fails instead of lying.

The config carries the plan (``midl_plan``) and a ``quantization_config`` without a
``quant_method``: ``from_pretrained`` of any transformers class then raises before it reads a
weight (a plain ``AutoModelForCausalLM.from_pretrained`` of a converted Llama used to load
silently as a dense model with other outputs). ``midl_convert.load(folder)`` strips both and
replays the plan. Quantized models mark themselves the same way, which is why transformers checks it.
"""
from __future__ import annotations

from typing import Any

from .errors import MIDLError

PLAN_KEY = "midl_plan"
MARKER_KEY = "midl_convert"
MARKER = {MARKER_KEY: "this model has MID-L layers, not dense ones: load it with midl_convert.load(folder), "
                      "not from_pretrained (pip install midl-convert)"}


def mark(config: Any, plan: dict[str, Any]) -> None:
    """Record ``plan`` on a Hugging Face config and make a dense ``from_pretrained`` of it raise."""
    config.midl_plan = plan
    original = getattr(config, "quantization_config", None)
    if original is not None and not is_marked(config):
        raise MIDLError("this model is quantized (config.quantization_config); convert the unquantized model")
    config.quantization_config = dict(MARKER)


def unmark(config: Any) -> None:
    """Remove the plan and the marker (the model is dense again, or the plan is about to be replayed)."""
    if hasattr(config, PLAN_KEY):
        del config.midl_plan
    if is_marked(config):
        del config.quantization_config


def is_marked(config: Any) -> bool:
    """True for a config (object or ``config.json`` dict) that a converted model wrote."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    quant = get("quantization_config")
    return get(PLAN_KEY) is not None or (isinstance(quant, dict) and MARKER_KEY in quant)
