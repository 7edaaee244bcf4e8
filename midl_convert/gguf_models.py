"""GGUF checkpoints (llama.cpp's format) as plain float32 Hugging Face causal LMs.

transformers reads a ``.gguf`` through the ``gguf`` package and dequantises it, but the model it
returns still calls itself quantized (``save_pretrained`` refuses it) and records no
``architectures`` (a saved copy would rebuild as a bare ``LlamaModel``). Both are put right here,
once, at load.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from torch import nn

from .errors import MIDLError

GGUF_SUFFIX = ".gguf"


def is_gguf(path: str | Path | None) -> bool:
    return path is not None and str(path).lower().endswith(GGUF_SUFFIX)


def plain_float_model(model: nn.Module) -> nn.Module:
    """Drop the quantization marks a dequantised model keeps and record its class in the config."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if not config.architectures:
        config.architectures = [type(model).__name__]
    return model


def read_gguf(file: str | Path, random_init: bool = False, **model_kwargs: Any) -> tuple[nn.Module, Any]:
    """The causal LM (float32) and tokenizer stored in a ``.gguf`` file; ``random_init`` keeps only its shape."""
    file = Path(file)
    if not file.is_file():
        raise MIDLError(f"GGUF file {str(file)!r} does not exist; pass the path of a .gguf file")
    if importlib.util.find_spec("gguf") is None:
        raise MIDLError(f"reading {file.name} needs the gguf package: pip install gguf (or pip install 'midl-convert[demo]')")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": str(file.parent), "gguf_file": file.name}
    try:
        if random_init:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(**where), **model_kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(**where, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except (ValueError, OSError, KeyError) as exc:
        raise MIDLError(f"transformers cannot read {file.name} as a causal LM: {str(exc).splitlines()[0][:200]}") from exc
    return plain_float_model(model).eval(), tokenizer
