"""midl-convert: swap a pretrained model's Linear and 1x1 conv layers for MID-L layers.

    import midl_convert as mc
    model, plan = mc.convert(model, mc.MIDLConfig(keep=0.5), example_inputs)
"""
from .config import LayerOverride, MIDLConfig
from .errors import MIDLError
from .graph import Target, TargetTable, find_targets
from .layers import MIDLConv2d, MIDLinear
from .models import LoadedModel, load_model
from .surgery import LayerPlan, Plan, apply_plan, convert, merge_and_unload, midl_layers, plan_conversion

__version__ = "0.1.0"

__all__ = [
    "LayerOverride", "LayerPlan", "LoadedModel", "load_model", "MIDLConfig", "MIDLConv2d", "MIDLError", "MIDLinear", "Plan", "Target",
    "TargetTable", "apply_plan", "convert", "find_targets", "merge_and_unload", "midl_layers", "plan_conversion",
]
