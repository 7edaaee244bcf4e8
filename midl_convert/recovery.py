"""What distillation trains: ``--train`` names the parts, alone or as a comma list.

- ``gates``: each sparse layer's gate (the selection; straight-through gradients);
- ``midl``: the gates and the light paths ``U, V``;
- ``lora``: a low-rank delta on each sparse layer's exact ``W`` (``lora.py``), merged into ``W`` when training ends;
- ``bias``: each sparse layer's bias (and its centre, where the layer has one);
- ``norms``: the scale and shift of every normalisation layer (LayerNorm, RMSNorm, BatchNorm affine);
- ``all``: all of the above;
- ``full``: ``midl`` plus every other weight of the model at ``base_lr`` (a full fine-tune: the saved
  model keeps its shapes, but nothing stays exact).

Everything but ``full`` leaves a model of the same parameters, shapes and speed as without training.
"""
from __future__ import annotations

from torch import nn

from .sparse import SparseLayer

PARTS = ("gates", "midl", "lora", "bias", "norms", "full")
ALL = ("midl", "lora", "bias", "norms")
CHOICES = (*PARTS, "all")
CENTRE_NAMES = ("centre", "center")  # an input-side layer's centre, where the layer has one


def parse_train(value: str | tuple[str, ...] | list[str]) -> str:
    """The canonical form of a ``--train`` value (parts in a fixed order, comma-separated); ``ValueError``
    naming the choices for anything else."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    bad = [n for n in names if n not in CHOICES]
    if bad or not names:
        raise ValueError(f"train must be one or more of {', '.join(CHOICES)} (comma-separated, e.g. 'midl,lora'), "
                         f"got {value!r}")
    parts = {p for n in names for p in (ALL if n == "all" else (n,))}
    if "midl" in parts:
        parts.discard("gates")  # midl includes the gates
    return ",".join(p for p in PARTS if p in parts)


def parts(train: str) -> set[str]:
    return set(parse_train(train).split(","))


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (torch's, Hugging Face's RMSNorm, timm's BatchNormAct2d / LayerNorm2d)."""
    return "Norm" in type(module).__name__ and not isinstance(module, SparseLayer)


def select(model: nn.Module, train: str) -> dict[str, list[nn.Parameter]]:
    """The parameters each group trains: ``midl`` (gates, light paths), ``bias`` (biases, centres), ``norms``
    and ``base`` (``full``: the rest). LoRA's parameters are made by ``lora.attach``, not chosen here."""
    chosen = parts(train)
    groups: dict[str, list[nn.Parameter]] = {"midl": [], "bias": [], "norms": [], "base": []}
    seen: set[int] = set()

    def take(group: str, p: nn.Parameter | None) -> None:
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            groups[group].append(p)

    for mod in model.modules():
        if isinstance(mod, SparseLayer):
            if chosen & {"gates", "midl"}:
                names = mod.trainable_names("midl" if "midl" in chosen else "gates")
                for name in names:
                    take("midl", mod._parameters.get(name))
            if "bias" in chosen:
                for name in ("bias", *CENTRE_NAMES):
                    take("bias", mod._parameters.get(name))
        elif "norms" in chosen and is_norm(mod):
            for p in mod.parameters(recurse=False):
                take("norms", p)
    if "full" in chosen:
        for p in model.parameters():
            take("base", p)
    return groups
