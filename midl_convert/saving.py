"""Save and load converted models as a config plus safetensors, never a pickle.

A saved folder holds ``model.safetensors``, ``midl_config.json`` (how to rebuild the base model,
the plan, the resolved recipe) and, for Hugging Face models, ``config.json`` (with the plan in
``midl_plan`` and a marker that makes a dense ``from_pretrained`` raise, ``marker.py``),
``generation_config.json`` and the tokenizer. ``load`` rebuilds the base architecture, replays
the plan and loads the weights (as Torch-Pruning replays its pruning history); it is the one
supported way back, for Hugging Face, timm and custom models alike. Folders are written under a
temporary name and renamed into place, so a killed run leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from .errors import MIDLError
from .marker import PLAN_KEY, mark
from .sparse import SparseLayer
from .surgery import LayerPlan, Plan, apply_plan

FORMAT_VERSION = 1
CONFIG_FILE = "midl_config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"


def plan_of(model: nn.Module) -> Plan:
    """The plan that a converted model embodies, read off its MID-L layers."""
    layers: dict[int, LayerPlan] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, SparseLayer):
            continue
        if id(mod) in layers:
            layers[id(mod)].aliases.append(path)
            continue
        layers[id(mod)] = LayerPlan(path, mod.target_kind, mod.in_features, mod.out_features, 0, True, mod.keep, mod.rank,
                                    mod.granularity, norm=mod.downstream[0], activation=mod.downstream[1],
                                    adaptive=mod.adaptive, side=mod.side)
    if not layers:
        raise MIDLError(f"{type(model).__name__} has no MID-L layers to save; convert it first (midl_convert.convert)")
    return Plan(list(layers.values()), method="saved")


def write_atomic_dir(directory: str | Path, write: Any) -> Path:
    """Call ``write(tmp_dir)`` then move the folder into place in one rename (replacing an old one)."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save(
    model: nn.Module,
    directory: str | Path,
    build: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    tokenizer: Any = None,
    extra: Any = None,
) -> Path:
    """Save a converted model to ``directory`` (config + safetensors); returns the folder.

    ``build`` says how to rebuild the base model (``{"source": "timm", "name": ..., "kwargs": ...}``;
    Hugging Face models rebuild from the saved ``config.json``); ``extra(tmp_dir)`` may add files
    (the report) inside the same atomic write.
    """
    from safetensors.torch import save_model

    plan = plan_of(model)
    hf_config = getattr(model, "config", None)
    is_hf = hf_config is not None and hasattr(hf_config, "save_pretrained")
    build = dict(build or {"source": "custom"})
    if is_hf:
        build["source"] = "hf"

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / WEIGHTS_FILE))
        if is_hf:
            mark(hf_config, plan.to_dict())
            hf_config.architectures = hf_config.architectures or [type(model).__name__]  # as save_pretrained records
            hf_config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        meta = {"format_version": FORMAT_VERSION, "build": build, "plan": plan.to_dict(), "recipe": recipe}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if extra is not None:
            extra(tmp)

    return write_atomic_dir(directory, write)


def _rebuild(folder: Path, build: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    from .models import check_remote_code, load_model

    source = build.get("source")
    if source == "hf":
        return load_model(str(folder), random_init=True, trust_remote_code=trust_remote_code).model
    if source == "timm":
        import timm

        kwargs = check_remote_code(build.get("kwargs", {}), trust_remote_code)
        return timm.create_model(build["name"], pretrained=False, **kwargs).eval()
    raise MIDLError(f"{folder} holds a custom model: pass the base model, midl_convert.load({str(folder)!r}, model=MyModel())")


def _folder(directory: str | Path) -> Path:
    """A local folder, or a Hugging Face id fetched into the hub cache (as ``from_pretrained`` does)."""
    folder = Path(directory)
    if folder.exists() or not isinstance(directory, str) or directory.count("/") != 1 or directory.startswith((".", "/")):
        return folder
    from .models import hub_folder

    return hub_folder(directory)


def load(directory: str | Path, model: nn.Module | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a saved converted model: base architecture, the recorded plan replayed, then the weights.

    ``directory`` is a folder or a Hugging Face id. Pass ``model`` (an unconverted instance of the
    same architecture) for custom models. Only safetensors are read: nothing is unpickled, and a
    repository's own code runs only with ``trust_remote_code=True``.
    """
    from safetensors.torch import load_file

    folder = _folder(directory)
    meta_file, hf_file = folder / CONFIG_FILE, folder / "config.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise MIDLError(f"{meta_file} has format_version {meta.get('format_version')!r}; this midl-convert reads {FORMAT_VERSION}")
        plan, build = Plan.from_dict(meta["plan"]), meta["build"]
    elif hf_file.is_file() and PLAN_KEY in json.loads(hf_file.read_text()):  # a save_pretrained folder
        plan, build = Plan.from_dict(json.loads(hf_file.read_text())[PLAN_KEY]), {"source": "hf"}
    else:
        raise MIDLError(f"{str(folder)!r} is not a saved midl-convert model (no {CONFIG_FILE}, no config.json with {PLAN_KEY})")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise MIDLError(f"{str(weights)!r} is missing; save the model again with midl_convert.save")
    base = model if model is not None else _rebuild(folder, build, trust_remote_code)
    apply_plan(base, plan, init=False)
    if (folder / GENERATION_FILE).is_file() and hasattr(base, "generation_config"):
        from transformers import GenerationConfig

        base.generation_config = GenerationConfig.from_pretrained(folder)
    state = load_file(str(weights))
    missing, unexpected = base.load_state_dict(state, strict=False)
    own = base.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]  # tied copies are fine
    if untied or unexpected:
        first = (untied or unexpected)[0]
        raise MIDLError(f"weights in {str(weights)!r} do not fit the rebuilt model: {'missing' if untied else 'unexpected'} "
                        f"key {first!r}; was it saved from another architecture?")
    return base.eval()
