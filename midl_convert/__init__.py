"""midl-convert: swap a pretrained model's Linear and 1x1 conv layers for MID-L layers.

    import midl_convert as mc
    model, plan = mc.convert(model, mc.MIDLConfig(keep=0.5), example_inputs)
    model, plan = mc.convert(model, mc.MIDLConfig(keep=0.7, rank=0, select="input"), example_inputs)  # input side
    model, plan = mc.convert(model, mc.MIDLConfig(flops_ratio=1.3), example_inputs, batches)  # a budget, each layer's side chosen
    with mc.dense(model): teacher_out = model(x)  # the converted model as its own teacher
    mc.calibrate(model, batches); mc.distill(model, teacher, data)
    mc.calibrate(model, batches, output="embedding")  # gates weigh each neuron's error by its reach to the output
    mc.cap_thresholds(model, example_inputs)  # adaptive masks under a budget: the example costs at most what was counted
    mc.set_weight_dtype(model, "int8")  # last: bfloat16 or int8 weights (MIDLConfig(weight_dtype=...) does it in convert)
    mc.save(model, "out")

Heavy libraries (timm, transformers, accelerate, matplotlib) load when first used.
"""
from .budget import budget_plan
from .calibrate import calibrate, cap_thresholds
from .config import LayerOverride, MIDLConfig
from .data import Batch, load_data
from .decoding import LeanDecoder
from .distill import DistillConfig, distill
from .deprecation import renamed_attributes
from .errors import MIDLError
from .graph import Target, TargetTable, find_targets
from .kinds import Kind, build_layer, kind_for, kind_names, register_kind
from .kinds.input import InputMIDLConv2d, InputMIDLinear
from .kinds.output import OutputMIDLConv2d, OutputMIDLinear
from .kinds.output import layer as _output_layer
from .kinds.prune import PruneConv2d, PruneLinear
from .models import LoadedModel, load_model
from .report import Report
from .report import build_report as report
from .saving import load, save
from .sensitivity import neuron_sensitivity
from .sparse import SparseLayer, dense
from .conversion import convert, plan_conversion
from .surgery import LayerPlan, Plan, apply_plan, merge_and_unload, midl_layers
from .weight_dtype import Bf16Linear, Int8Linear, set_weight_dtype

__version__ = "0.1.0"
__getattr__ = renamed_attributes(__name__, _output_layer.OLD_NAMES, vars(_output_layer))  # old names, for one version

__all__ = [
    "Batch", "DistillConfig", "InputMIDLConv2d", "InputMIDLinear", "LayerOverride", "LayerPlan", "LoadedModel", "MIDLConfig", "OutputMIDLConv2d",
    "Bf16Linear", "Int8Linear", "Kind", "LeanDecoder", "MIDLError", "OutputMIDLinear", "PruneConv2d", "PruneLinear", "SparseLayer", "build_layer", "kind_for",
    "kind_names", "register_kind",
    "Plan", "Report", "Target", "TargetTable", "apply_plan", "budget_plan", "calibrate", "cap_thresholds", "convert", "dense", "distill", "find_targets", "load",
    "load_data", "load_model", "merge_and_unload", "midl_layers", "neuron_sensitivity", "plan_conversion", "report", "save",
    "set_weight_dtype",
]
