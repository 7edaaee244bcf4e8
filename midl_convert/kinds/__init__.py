"""Every kind of sparse layer, one folder each, registered on import (as PEFT's tuners).

    kinds/registry.py  Kind, register_kind, kind_for, build_layer
    kinds/output/      MID-L as the paper has it: a mask picks output neurons
    kinds/input/       a mask picks input neurons (columns of W)
    kinds/prune/       static pruning: one fixed set of input columns for every input (a peer)

A new kind is one more folder here whose ``__init__`` calls ``register_kind``: every sub-package is
imported below, so no other file names it.
"""
import importlib
import pkgutil

from .registry import WEIGHTS, Kind, all_kinds, build_layer, kind_for, kind_names, register_kind

# The paper's kind first, then the input side (the budget's "auto" grid keeps this order), then the rest.
_FIRST = ("output", "input")
for _name in sorted((m.name for m in pkgutil.iter_modules(__path__) if m.ispkg),
                    key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n)):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["WEIGHTS", "Kind", "all_kinds", "build_layer", "kind_for", "kind_names", "register_kind"]
