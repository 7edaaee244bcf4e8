"""YAML recipes: one pydantic model for a whole run, validated once, with errors that name the key
path and the line in the file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import (BUDGET_KEEPS, BUDGET_RANKS, Centring, Granularity, LayerOverride, MIDLConfig, Select, check_keep_list,
                     check_rank_list, check_rank_setting)
from .layers import check_keep
from .distill import DistillConfig
from .errors import MIDLError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    spec: str = Field(..., description="timm name, Hugging Face id or local folder")
    weights: str | None = Field(None, description="local weights for a timm architecture (.safetensors or .pth), or a .gguf file")
    random_init: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to timm.create_model or the HF class")


class TargetsSection(_Strict):
    include: Union[list[str], Literal["all-linear"], None] = None
    exclude: list[str] = Field(default_factory=list)
    overrides: list[LayerOverride] = Field(default_factory=list)
    skip_head: bool = True
    min_size: int = Field(0, ge=0)


class MidlSection(_Strict):
    keep: float = 0.5
    rank: Union[int, float] = 32
    granularity: Granularity = "token"
    select: Select | None = Field(None, description=MIDLConfig.model_fields["select"].description)
    adaptive: bool = Field(False, description=MIDLConfig.model_fields["adaptive"].description)
    centre: Centring = Field("auto", description=MIDLConfig.model_fields["centre"].description)
    flops_ratio: float | None = Field(None, gt=1.0, description=MIDLConfig.model_fields["flops_ratio"].description)
    speedup: float | None = Field(None, gt=1.0, description=MIDLConfig.model_fields["speedup"].description)
    budget_keeps: list[float] = Field(default_factory=lambda: list(BUDGET_KEEPS))
    budget_ranks: list[Union[int, float]] = Field(default_factory=lambda: list(BUDGET_RANKS))
    budget_judge: Optional[int] = Field(None, ge=0, description=MIDLConfig.model_fields["budget_judge"].description)
    budget_batches: Optional[int] = Field(None, ge=1, description=MIDLConfig.model_fields["budget_batches"].description)
    budget_fit_batches: int = Field(4, ge=0, description=MIDLConfig.model_fields["budget_fit_batches"].description)
    budget_batch_size: int = Field(8, ge=1, description=MIDLConfig.model_fields["budget_batch_size"].description)

    _keep = field_validator("keep")(lambda v: check_keep(v))
    _rank = field_validator("rank")(check_rank_setting)
    _budget_keeps = field_validator("budget_keeps")(check_keep_list)
    _budget_ranks = field_validator("budget_ranks")(check_rank_list)

    @model_validator(mode="after")
    def _settings_agree(self) -> "MidlSection":
        """MIDLConfig's checks across fields (select='auto' needs a budget, one budget target) fail here, at the edge."""
        try:
            MIDLConfig(**self.model_dump())
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return self


class DistillSection(DistillConfig):
    data: str | None = Field(None, description="data spec; default builtin:text for text models, builtin:images otherwise")
    enabled: bool = True


class ReportSection(_Strict):
    data: str | None = Field(None, description="held-out data spec; default: the distillation data's held-out part")
    eval_samples: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=1)
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1])
    enabled: bool = True


class OutputSection(_Strict):
    dir: str = "midl-out"
    overwrite: bool = Field(False, description="write into an existing folder that is not an earlier midl-convert run "
                                               "(files of the same names are replaced, others kept)")


class Recipe(_Strict):
    """A whole run: model -> targets -> conversion -> distillation -> report -> output."""

    model: ModelSection
    targets: TargetsSection = Field(default_factory=TargetsSection)
    midl: MidlSection = Field(default_factory=MidlSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    report: ReportSection = Field(default_factory=ReportSection)
    output: OutputSection = Field(default_factory=OutputSection)
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:0, ...")

    def midl_config(self) -> MIDLConfig:
        """The conversion settings, validated as one MIDLConfig."""
        return MIDLConfig(**self.midl.model_dump(exclude_unset=True), **self.targets.model_dump())  # unset: a rank
        # the recipe does not name leaves the layer budget's rank grid in place


def _node_at(node: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """The deepest YAML node along a pydantic error location (for its line number)."""
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == str(key)), None)
            if nxt is None:
                nxt = next((k for k, _ in node.value if k.value == str(key)), None)  # unknown key: point at it
                return nxt or node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
    return node


def _describe(err: ValidationError, root: yaml.Node | None, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(x for x in first["loc"] if not (isinstance(x, str) and x.startswith(("function-", "literal["))))
    path = ".".join(str(x) for x in loc) or "(top level)"
    node = _node_at(root, loc)
    where = f"{source}, line {node.start_mark.line + 1}" if node is not None else source
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; `midl-convert schema` lists the keys)"
    return f"{where}: {path}: {msg}"


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Validate recipe YAML text; any problem is one ``MIDLError`` line with key path and line."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise MIDLError(f"{source}{line}: not valid YAML ({getattr(exc, 'problem', None) or 'parse error'})") from exc
    if not isinstance(data, dict):
        raise MIDLError(f"{source}: a recipe is a YAML mapping with at least `model: {{spec: ...}}`")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise MIDLError(_describe(exc, root, source)) from exc


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise MIDLError(f"recipe {str(path)!r} does not exist; pass the path of a .yaml file (see recipes/)")
    return parse_recipe(path.read_text(encoding="utf-8"), str(path))


def recipe_schema() -> dict[str, Any]:
    """The recipe's JSON Schema (``midl-convert schema``)."""
    return Recipe.model_json_schema()
