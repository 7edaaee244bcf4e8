"""Saved files of earlier versions, read as this version writes them: every rename of a saved key is
here, once, so ``saving.load`` and ``Report.load`` see only the current names.

Format versions of ``midl_config.json`` and ``report.json`` (``format_version``; a report of version 1
said ``schema_version``):

- 1: a layer's kind choice was ``side``, its module type ``kind``, the report quality's output ``kind``,
  a config's ``select`` could be null ("auto" under a budget, else "output"), and the oldest plans
  called the tracer ``method``;
- 2: ``select``, ``module_type``, ``output``, and ``select`` always stated.

A file newer than this code is refused with one line, never half-read.
"""
from __future__ import annotations

import copy
from typing import Any

from .errors import MIDLError

FORMAT_VERSION = 2
READS = range(1, FORMAT_VERSION + 1)  # the versions this code migrates from


def version_of(data: dict[str, Any], source: str) -> int:
    """The file's format version (a version-1 report said ``schema_version``); one line refuses a
    version newer than this code, or none it knows."""
    version = data.get("format_version", data.get("schema_version"))
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise MIDLError(f"{source} has format_version {version}, newer than this midl-convert reads ({FORMAT_VERSION}); "
                        f"upgrade midl-convert (pip install -U midl-convert)")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READS:
        raise MIDLError(f"{source} has format_version {version!r}; this midl-convert reads {READS.start} to "
                        f"{FORMAT_VERSION}; write it again with midl-convert")
    return version


def plan(data: dict[str, Any]) -> dict[str, Any]:
    """A plan dict in today's keys. Plans also travel without a version (a Hugging Face config's
    ``midl_plan``), so each rename applies wherever its old key is found."""
    data = dict(data)
    if "trace" not in data and "method" in data:  # the oldest plans called the tracer "method"
        data["trace"] = data.pop("method")
    if isinstance(data.get("layers"), list):
        data["layers"] = [_renamed(layer, side="select", kind="module_type") for layer in data["layers"]]
    return data


def config_file(meta: dict[str, Any], source: str) -> dict[str, Any]:
    """``midl_config.json``'s contents at ``FORMAT_VERSION``."""
    version_of(meta, source)
    meta = copy.deepcopy(meta)
    if isinstance(meta.get("plan"), dict):
        meta["plan"] = plan(meta["plan"])
    _state_select(meta.get("recipe"))
    meta["format_version"] = FORMAT_VERSION
    return meta


def report_file(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``report.json``'s contents at ``FORMAT_VERSION``."""
    if version_of(data, source) == 1:
        data = copy.deepcopy(data)
        data.pop("schema_version", None)
        data["format_version"] = FORMAT_VERSION
        if isinstance(data.get("layers"), list):
            data["layers"] = [_renamed(layer, side="select", kind="module_type") for layer in data["layers"]]
        if isinstance(data.get("quality"), dict):
            data["quality"] = _renamed(data["quality"], kind="output")
        settings = data.get("settings")
        if isinstance(settings, dict):
            _state_select(settings.get("recipe"))
            _state_select({"midl": settings.get("config")})
    return data


def _renamed(entry: Any, **renames: str) -> Any:
    """``entry`` with each old key renamed (a key already under its new name wins)."""
    if not isinstance(entry, dict):
        return entry
    out = dict(entry)
    for old, new in renames.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def _state_select(recipe: Any) -> None:
    """A recipe's (or config's) ``select: null`` as version 1 read it: 'auto' under a budget, else 'output'."""
    midl = recipe.get("midl") if isinstance(recipe, dict) else None
    if isinstance(midl, dict) and "select" in midl and midl["select"] is None:
        budgeted = midl.get("flops_ratio") is not None or midl.get("speedup") is not None
        midl["select"] = "auto" if budgeted else "output"


__all__ = ["FORMAT_VERSION", "config_file", "plan", "report_file", "version_of"]
