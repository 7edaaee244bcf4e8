"""YAML recipes: one pydantic model for a whole run, validated once, with errors that name the key
path and the line in the file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import LayerSettings, MIDLConfig, TargetSettings
from .distill import DistillConfig
from .errors import MIDLError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    spec: str = Field(..., description="timm name, Hugging Face id or local folder")
    weights: str | None = Field(None, description="local weights for a timm architecture (.safetensors or .pth), or a .gguf file")
    random_init: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to timm.create_model or the HF class")


class TargetsSection(TargetSettings):
    """Which layers: ``MIDLConfig``'s target settings, declared there."""


class MidlSection(LayerSettings):
    """How: ``MIDLConfig``'s layer settings, declared there (a new setting is a recipe key at once)."""


class DistillSection(DistillConfig):
    data: str | None = Field(None, description="data spec; default builtin:mixed for text encoders, builtin:text for causal "
                                                "LMs, builtin:images otherwise")
    enabled: bool = True


# Causal LMs this large time their decoding at the end of a run by default (a user's question for an LLM,
# worth its minute or two of compiling); tiny test models do not.
DECODE_SPEED_PARAMS = 50_000_000


class ReportSection(_Strict):
    data: str | None = Field(None, description="held-out data spec; default: the distillation data's held-out part")
    eval_samples: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=1)
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1])
    decode_speed: bool | None = Field(None, description="time batch-1 greedy decoding, dense against converted, on the "
                                                        "CPU (causal LMs; always under speedup); None: for causal LMs of "
                                                        f"at least {DECODE_SPEED_PARAMS // 10**6}M parameters")
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
    seed: int = Field(0, ge=0, lt=2**32, description="seeds torch, Python and NumPy (which takes 32 bits)")
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


MAX_RECIPE_CHARS = 1_000_000
MAX_RECIPE_NODES = 100_000  # values once aliases are expanded: a recipe has hundreds


def _expanded_size(root: yaml.Node | None) -> int:
    """How many nodes the document has with every alias expanded, counted without expanding (a YAML
    "billion laughs" of nested aliases is a few lines that expand to more values than memory holds)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a cycle counts once here; safe_load rejects nothing, the model rejects it
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(n) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        sizes[id(node)] = min(total, MAX_RECIPE_NODES + 1)
        return sizes[id(node)]

    return size(root) if root is not None else 0


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Validate recipe YAML text; any problem is one ``MIDLError`` line with key path and line."""
    if len(text) > MAX_RECIPE_CHARS:
        raise MIDLError(f"{source}: {len(text):,} characters is not a recipe (at most {MAX_RECIPE_CHARS:,}); pass a recipe file "
                        f"(see recipes/)")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if _expanded_size(root) > MAX_RECIPE_NODES:
            raise MIDLError(f"{source}: its aliases expand to more than {MAX_RECIPE_NODES:,} values; a recipe has hundreds, "
                            f"so write the values out (YAML anchors nested this deep are a memory bomb)")
        data = yaml.safe_load(text)
    except RecursionError:
        raise MIDLError(f"{source}: nested too deeply to be a recipe; pass a recipe file (see recipes/)") from None
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
    try:
        if path.stat().st_size > MAX_RECIPE_CHARS * 4:
            raise MIDLError(f"recipe {str(path)!r} is {path.stat().st_size:,} bytes, not a recipe; pass a .yaml recipe (see recipes/)")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MIDLError(f"recipe {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return parse_recipe(text, str(path))


def recipe_schema() -> dict[str, Any]:
    """The recipe's JSON Schema (``midl-convert schema``)."""
    return Recipe.model_json_schema()
