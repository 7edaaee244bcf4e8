"""Save and load converted models as a config plus safetensors, never a pickle.

A saved folder holds ``model.safetensors``, ``midl_config.json`` (how to rebuild the base model,
the plan, the resolved recipe) and, for Hugging Face models, ``config.json`` (with the plan in
``midl_plan`` and a marker that makes a dense ``from_pretrained`` raise, ``marker.py``),
``generation_config.json`` and the tokenizer. ``load`` rebuilds the base architecture, replays
the plan and loads the weights (as Torch-Pruning replays its pruning history); it is the one
supported way back, for Hugging Face, timm and custom models alike. Folders are written under a
temporary name beside the target and renamed into place (``write_run``), so a killed run leaves
nothing half-written; an existing folder must be an earlier save, or be named with ``overwrite``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from . import migrate
from .errors import MIDLError
from .files import MARKER_FILE, cache_dir, clean_stale, file_mode, read_json, temp_dir
from .marker import PLAN_KEY, mark
from .models import check_remote_code, hub_folder, load_model, read_state_dict, shape_mismatch
from .sparse import SparseLayer
from .surgery import LayerPlan, Plan, apply_plan
from .weight_dtype import WEIGHT_DTYPES, set_weight_dtype, weight_dtype_of

FORMAT_VERSION = migrate.FORMAT_VERSION
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
        layers[id(mod)] = LayerPlan(path, mod.module_type, mod.in_features, mod.out_features, 0, True, mod.keep, mod.rank,
                                    mod.granularity, norm=mod.downstream[0], activation=mod.downstream[1],
                                    adaptive=mod.adaptive, select=mod.select, centre=getattr(mod, "centring", "none"))
    if not layers:
        raise MIDLError(f"{type(model).__name__} has no MID-L layers to save; convert it first (midl_convert.convert)")
    return Plan(list(layers.values()), trace="saved", weight_dtype=weight_dtype_of(model))


# What a run writes: its own files, a Hugging Face config, a tokenizer's files and the report. A name
# in an earlier run's list outside these is never taken as the tool's, whatever the list says.
RUN_FILES = re.compile(r"(model\.safetensors|midl_config\.json|config\.json|generation_config\.json|report\.(json|md|png)"
                       r"|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json"
                       r"|vocab\.(txt|json)|merges\.txt|chat_template\.(jinja|json)|(sentencepiece|spiece)\.(bpe\.)?model)")


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def written_by_run(folder: Path) -> tuple[set[str], bool]:
    """The files in ``folder`` that an earlier run provably wrote, and whether it holds nothing else.

    A file counts only when its earlier run's ``midl_config.json`` lists it under ``written`` by a plain
    name that a run writes (no separators, no ``..``), it is a regular file and its size and mtime are
    those the run recorded: a list proves nothing by itself (anyone can write one), so a user's file
    of the same name, or a path outside the folder, is never taken for the tool's.
    """
    try:
        meta = read_json(folder / CONFIG_FILE, "")
    except (MIDLError, OSError):
        return set(), False
    written = meta.get("written")
    own: set[str] = set()
    if isinstance(written, dict) and meta.get("format_version") in migrate.READS:  # an earlier version's run too
        for name, stamp in written.items():
            path = folder / name
            if (isinstance(name, str) and RUN_FILES.fullmatch(name) and name != CONFIG_FILE and isinstance(stamp, dict)
                    and not path.is_symlink() and path.is_file() and _stamp(path) == stamp):
                own.add(name)
    if not own and not isinstance(written, dict):
        return set(), False  # not this tool's config (or one written before runs recorded their files)
    config = folder / CONFIG_FILE
    own_config = config.is_file() and not config.is_symlink()
    if own_config:
        own.add(CONFIG_FILE)
    return own, own_config and {p.name for p in folder.iterdir()} <= own


def previous_run(folder: Path) -> list[str] | None:
    """The files an earlier midl-convert run wrote in ``folder``, or ``None`` when the folder holds
    anything that run cannot be proven to have written (``written_by_run``)."""
    own, whole = written_by_run(folder)
    return sorted(own) if whole else None


def check_output(directory: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any long work, an output folder that would destroy the user's files or cannot be written.

    A new or empty folder, or an earlier run of this tool, is fine; anything else needs ``overwrite``
    (which replaces only files of the names a run writes, never others, and never a folder or link).
    """
    final = Path(os.path.abspath(directory))
    if final.is_symlink() and not final.exists():
        raise MIDLError(f"--out {str(directory)!r} is a link to {os.readlink(final)!r}, which does not exist; "
                        f"create that folder or pass another --out")
    if final.exists() and not final.is_dir():
        raise MIDLError(f"--out {str(directory)!r} is a file, not a folder; pass a new folder (or an earlier run's) as --out")
    existing = next(p for p in [final.parent, *final.parent.parents] if p.exists())
    try:
        own, whole = written_by_run(final) if final.is_dir() else (set(), True)
        if not overwrite and not whole and any(final.iterdir()):
            raise MIDLError(f"--out {str(directory)!r} exists and is not an earlier midl-convert run (or holds files that "
                            f"run did not write, or that changed since); pass a new folder, or --overwrite to write into it "
                            f"(files of the same names are replaced, others kept)")
        _check_clashes(final, [CONFIG_FILE, WEIGHTS_FILE, "config.json", "report.json"], own)
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        tempfile.TemporaryDirectory(dir=existing).cleanup()
        if final.is_dir():
            tempfile.TemporaryFile(dir=final).close()
    except OSError as exc:
        raise MIDLError(f"cannot write --out {str(directory)!r} ({exc.strerror or exc}); pass a folder you can write "
                        f"to as --out") from None
    return final


def _check_clashes(final: Path, names: list[str], own: set[str]) -> None:
    """Refuse names the run would write where the folder holds a folder or a link of that name (not the tool's)."""
    for name in names:
        target = final / name
        if name not in own and (target.is_symlink() or (target.exists() and not target.is_file())):
            what = "a link" if target.is_symlink() else "a folder"
            raise MIDLError(f"--out {str(final)!r} holds {what} named {name!r}, where the run writes a file; move it "
                            f"or pass another --out")


@contextmanager
def output_lock(directory: str | Path) -> Iterator[None]:
    """Hold a lock on an output folder for a whole run: a second run writing the same folder is refused.

    The lock is an ``flock`` on a file in the cache folder (``MIDL_CACHE_DIR``), so nothing is
    written beside the user's files and a killed run's lock goes with its process.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    final = os.path.abspath(directory)
    locks = cache_dir().parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / (hashlib.sha256(final.encode()).hexdigest()[:24] + ".lock"), os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MIDLError(f"another midl-convert run is writing {final}; wait for it to finish or pass another --out") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_run(directory: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` on a sibling temporary folder, then put its files in place.

    A new folder arrives in one rename. An existing one (an earlier run, or any folder with
    ``overwrite``) gets the new files one rename each, ``midl_config.json`` last so a killed save
    never leaves a loadable mix (the old one is set aside in the temporary folder and put back if
    a rename fails), then the earlier run's other files go, those it provably wrote only; the folder
    itself stays (so ``--out .`` works) and files this tool did not write stay too.
    """
    final = check_output(directory, overwrite)
    clean_stale(final)
    tmp = temp_dir(final)
    try:
        write(tmp)
        (tmp / MARKER_FILE).unlink()
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, file_mode())  # the user's umask, whatever wrote the file
        if not os.path.lexists(final):
            os.replace(tmp, final)
            return final
        own = written_by_run(final)[0]
        new = sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_FILE)
        _check_clashes(final, [p.name for p in new], own)
        if not overwrite and (taken := [p.name for p in new if (final / p.name).exists() and p.name not in own]):
            raise MIDLError(f"--out {str(final)!r} holds {taken[0]!r}, which no earlier run of this tool wrote; move it, or "
                            f"pass --overwrite to replace it")
        aside = tmp / f".old-{CONFIG_FILE}"
        if (final / CONFIG_FILE).is_file():
            os.replace(final / CONFIG_FILE, aside)
        try:
            for entry in new:
                _move(entry, final / entry.name)
        except BaseException:
            if aside.exists() and not (final / CONFIG_FILE).exists():
                os.replace(aside, final / CONFIG_FILE)
            raise
        for name in own - {p.name for p in new} - {CONFIG_FILE}:
            (final / name).unlink(missing_ok=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _move(entry: Path, target: Path) -> None:
    try:
        os.replace(entry, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.move(entry, target)  # `--out` is a mount point: its parent is another file system


def save(
    model: nn.Module,
    directory: str | Path,
    build: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    tokenizer: Any = None,
    extra: Any = None,
    overwrite: bool = False,
) -> Path:
    """Save a converted model to ``directory`` (config + safetensors); returns the folder.

    ``build`` says how to rebuild the base model (``{"source": "timm", "name": ..., "kwargs": ...}``;
    Hugging Face models rebuild from the saved ``config.json``); ``extra(tmp_dir)`` may add files
    (the report) inside the same atomic write. An existing folder that is not an earlier save
    is refused unless ``overwrite`` (see ``write_run``).
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
        if extra is not None:
            extra(tmp)
        mine = sorted(p for p in tmp.iterdir() if p.name != MARKER_FILE)
        files = [p.name for p in mine] + [CONFIG_FILE]
        # size and mtime of each file (a rename keeps both): what proves to a later run that it wrote them
        written = {p.name: _stamp(p) for p in mine if p.is_file()}
        meta = {"format_version": FORMAT_VERSION, "build": build, "plan": plan.to_dict(), "recipe": recipe, "files": files,
                "written": written}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))

    return write_run(directory, write, overwrite)


def _rebuild(folder: Path, build: dict[str, Any], trust_remote_code: bool) -> nn.Module:
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
    return hub_folder(directory)


def load(directory: str | Path, model: nn.Module | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a saved converted model: base architecture, the recorded plan replayed, then the weights.

    ``directory`` is a folder or a Hugging Face id. Pass ``model`` (an unconverted instance of the
    same architecture) for custom models. Only safetensors are read: nothing is unpickled, and a
    repository's own code runs only with ``trust_remote_code=True``.
    """
    folder = _folder(directory)
    meta_file, hf_file = folder / CONFIG_FILE, folder / "config.json"
    fix = "save the model again with midl_convert.save"
    if meta_file.is_file():
        meta = migrate.config_file(read_json(meta_file, fix), str(meta_file))  # refuses a newer version in one line
        plan, build, source = _plan(meta.get("plan"), meta_file, fix), meta.get("build"), meta_file
        if not isinstance(build, dict):
            raise MIDLError(f"{str(meta_file)!r} does not say how to rebuild the model (no 'build' object); {fix}")
    elif hf_file.is_file() and PLAN_KEY in (hf := read_json(hf_file, fix)):  # a save_pretrained folder
        plan, build, source = _plan(hf[PLAN_KEY], hf_file, fix), {"source": "hf"}, hf_file
    else:
        raise MIDLError(f"{str(folder)!r} is not a saved midl-convert model (no {CONFIG_FILE}, no config.json with {PLAN_KEY})")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise MIDLError(f"{str(weights)!r} is missing; {fix}")
    state = read_state_dict(weights)
    base = model if model is not None else _rebuild(folder, build, trust_remote_code)
    apply_plan(base, plan, init=False)
    if plan.weight_dtype not in WEIGHT_DTYPES:
        raise MIDLError(f"{source} names weight_dtype {plan.weight_dtype!r}; this midl-convert reads {', '.join(WEIGHT_DTYPES)}")
    set_weight_dtype(base, plan.weight_dtype)  # the same modules and dtypes as were saved, before their weights load
    if (folder / GENERATION_FILE).is_file() and hasattr(base, "generation_config"):
        from transformers import GenerationConfig

        base.generation_config = GenerationConfig.from_pretrained(folder)
    own = base.state_dict()
    if (bad := shape_mismatch(state, own)) is not None:
        raise MIDLError(f"weights in {str(weights)!r} do not fit the plan in {source.name}: {bad}; the folder mixes two "
                        f"runs, {fix}")
    missing, unexpected = base.load_state_dict(state, strict=False)
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]  # tied copies are fine
    if untied or unexpected:
        first = (untied or unexpected)[0]
        raise MIDLError(f"weights in {str(weights)!r} do not fit the rebuilt model: {'missing' if untied else 'unexpected'} "
                        f"key {first!r}; was it saved from another architecture?")
    return base.eval()


def _plan(data: Any, source: Path, fix: str) -> Plan:
    try:
        return Plan.from_dict(data)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise MIDLError(f"{str(source)!r} holds no valid plan ({type(exc).__name__}: {exc}); {fix}") from None
