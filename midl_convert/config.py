"""What to convert and how: one typed config, validated once at the edge and passed down."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .kinds import kind_names
from .sparse import check_keep
from .weight_dtype import WeightDtype

# Per position (a mask per token / pixel) or per sample (one mask per sequence / image).
Granularity = Literal["token", "sequence", "pixel", "sample"]
PER_SAMPLE = {"sequence", "sample"}
# Which neurons a mask picks: a registered kind's name (``kinds/``: "output", the paper's MID-L; "input";
# "prune"), or "auto" under a budget: per layer, by measured damage.
Select = str


def select_choices() -> tuple[str, ...]:
    """What ``select`` accepts: every registered kind, and "auto"."""
    return (*kind_names(), "auto")


def check_select(value: str | None, auto: bool = True) -> str | None:
    allowed = select_choices() if auto else kind_names()
    if value is not None and value not in allowed:
        raise ValueError(f"select must be one of {', '.join(allowed)}, got {value!r}")
    return value
# How input-side layers centre their inputs before picking (kinds.input.CENTRINGS).
Centring = Literal["auto", "mean", "median", "none"]
# The layer budget's grid: 3 keeps x 3 ranks that scale with the layer (1/32, 1/16, 1/8 of min(in, out);
# 12 / 24 / 48 on a 384-wide encoder), each measured on every candidate layer.
BUDGET_KEEPS = (0.25, 0.5, 0.75)
BUDGET_RANKS = (1 / 32, 1 / 16, 1 / 8)
# The input side's grid: rank 0 (pure input sparsity) and a small light path, at finer keeps; on
# MiniLM's 384-wide layers keep 0.65 at rank 0 beat keep 0.55 at rank 24 at equal FLOPs.
BUDGET_INPUT_KEEPS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BUDGET_INPUT_RANKS = (0, 1 / 16)


def check_keep_list(values: list[float]) -> list[float]:
    if not values:
        raise ValueError("budget_keeps needs at least one keep, e.g. [0.25, 0.5, 0.75]")
    return [check_keep(k) for k in values]


def check_rank_list(values: list[Union[int, float]]) -> list[Union[int, float]]:
    if not values:
        raise ValueError("budget_ranks needs at least one rank, e.g. [16, 32] or [0.0625, 0.125]")
    return [check_rank_setting(r) for r in values]


def check_rank_setting(value: Union[int, float, None]) -> Union[int, float, None]:
    if value is None:
        return value
    if isinstance(value, bool) or (isinstance(value, int) and value < 0):
        raise ValueError(f"rank must be an int >= 0 or a fraction in (0, 1) of min(in, out), got {value!r}")
    if isinstance(value, float) and value == 1.0:  # an int and a share must not look alike
        raise ValueError("rank 1.0 would be a share (the full rank of min(in, out)), not rank 1; write the int 1 for "
                         "rank one, or a share below 1 such as 0.0625")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise ValueError(f"a fractional rank must be in (0, 1) (share of min(in, out)), got {value!r}")
    return value


class LayerOverride(BaseModel):
    """Different settings for the layers whose path matches ``match`` (exact, suffix or regex)."""

    model_config = ConfigDict(extra="forbid")
    match: str
    keep: float | None = None
    rank: Union[int, float, None] = None
    granularity: Granularity | None = None
    select: Select | None = None  # None: the config's own select

    _keep = field_validator("keep")(lambda v: None if v is None else check_keep(v))
    _select = field_validator("select")(lambda v: check_select(v, auto=False))
    _rank = field_validator("rank")(check_rank_setting)


class TargetSettings(BaseModel):
    """Which layers are converted (a recipe's ``targets`` section): ``include`` is a list of patterns
    (PEFT style: exact path, dotted suffix, or full-match regex) or ``"all-linear"``; ``None`` means
    every target."""

    model_config = ConfigDict(extra="forbid")
    include: Union[list[str], Literal["all-linear"], None] = None
    exclude: list[str] = Field(default_factory=list)
    overrides: list[LayerOverride] = Field(default_factory=list)
    min_size: int = Field(0, ge=0, description="skip layers with fewer than this many weights (in*out)")
    skip_head: bool = True


class LayerSettings(BaseModel):
    """How each converted layer is built, or how the layer budget chooses (a recipe's ``midl`` section).

    ``rank`` is an int, or a float in (0, 1) taken as a share of ``min(in, out)``; an int larger
    than a layer allows is clipped to ``min(in, out)``. ``granularity`` ``token``/``pixel`` gives a
    mask per position, ``sequence``/``sample`` one mask per sample; each module type takes the
    equivalent of its own.
    """

    model_config = ConfigDict(extra="forbid")
    keep: float = 0.5
    rank: Union[int, float] = 32
    granularity: Granularity = "token"
    select: Select | None = Field(
        None, description="which neurons each mask picks: 'output' (MID-L: rows of W, gate on V x), 'input' (columns "
                          "of W by |x| times column norm), 'prune' (one fixed set of columns: a peer), or 'auto' (the budget "
                          "measures each kind in its auto grid per layer); left out, it is filled: "
                          "'auto' under flops_ratio or speedup, else 'output'")
    adaptive: bool = Field(False, description="masks whose size follows the input: each layer keeps the neurons whose "
                                              "score passes a threshold calibrated to keep `keep` of them on average")
    centre: Centring = Field("auto", description="input side: subtract a per-input centre fitted in calibration before "
                                                 "picking, and fold what it carries into the bias: 'mean', 'median', "
                                                 "'auto' (per layer, whichever of no centre, the mean and the median "
                                                 "leaves the lower output error on calibration rows it was not fitted "
                                                 "on) or 'none'")
    flops_ratio: float | None = Field(
        None, gt=1.0, description="whole-model FLOPs target (dense / converted, e.g. 1.5): each layer's keep and rank "
                                  "(or dense) are chosen from measured damage; keep and rank are then ignored")
    speedup: float | None = Field(
        None, gt=1.0, description="whole-model speed-up target measured on this machine (dense time / converted time on "
                                  "the model's call shape: batch-1 decode for a causal LM, else the example input): the "
                                  "layer budget spends measured seconds instead of FLOPs; an alternative to flops_ratio")
    budget_keeps: list[float] = Field(default_factory=lambda: list(BUDGET_KEEPS),
                                      description="keeps the layer budget tries on each layer")
    budget_ranks: list[Union[int, float]] = Field(default_factory=lambda: list(BUDGET_RANKS),
                                                  description="ranks the layer budget tries (ints, or shares of min(in, out))")
    budget_input_keeps: list[float] = Field(default_factory=lambda: list(BUDGET_INPUT_KEEPS),
                                            description="keeps the layer budget tries on the input side")
    budget_input_ranks: list[Union[int, float]] = Field(default_factory=lambda: list(BUDGET_INPUT_RANKS),
                                                        description="ranks the layer budget tries on the input side")
    budget_judge: Optional[int] = Field(None, ge=0, description="options per layer the layer budget judges at the model's "
                                        "output, the rest screened out by the layer's own error; 0: judge every option; "
                                        "None: every option up to 1000 in all, else 6 per layer")
    budget_batches: Optional[int] = Field(None, ge=1, description="batches the layer budget measures each option's damage "
                                          "on (each option costs one forward of them); None: 2 when the model takes "
                                          "images, 1 otherwise")
    budget_fit_batches: int = Field(4, ge=0, description="other batches each option's light path and gate are fitted on "
                                                         "first (0: fit on the measured batches, which flatters every option)")
    budget_batch_size: int = Field(8, ge=1, description="samples per budget batch")
    weight_dtype: WeightDtype = Field(
        "float32", description="the weights' dtype after conversion (its last step): 'float32', 'bfloat16' (the whole model, "
                               "activations too) or 'int8' (weight-only, a scale per output channel: input-side layers and "
                               "the dense Linears left; output-side layers, norms and embeddings stay float32)")

    _keep = field_validator("keep")(lambda v: check_keep(v))
    _rank = field_validator("rank")(check_rank_setting)
    _select = field_validator("select")(check_select)

    @model_validator(mode="after")
    def _auto_needs_budget(self) -> "LayerSettings":
        if self.flops_ratio is not None and self.speedup is not None:
            raise ValueError("flops_ratio (--flops-ratio) and speedup (--speedup) both set the layer budget's target; "
                             "pass one of them")
        if self.select == "auto" and not self.budgeted:
            raise ValueError("select='auto' chooses each layer's side from measured damage, so it needs flops_ratio or "
                             "speedup; use select='input' or 'output' with a fixed keep")
        if self.select is None:  # filled, not set: a recipe merged with flags later is filled again from the merge
            self.__dict__["select"] = "auto" if self.budgeted else "output"
            self.__pydantic_fields_set__.discard("select")
        return self

    @property
    def fixed_rank(self) -> Union[int, float, None]:
        """The rank the user named (``rank=...``, ``--rank``), or None where it is the default: a named
        rank is the only rank the layer budget tries, on both sides."""
        return self.rank if "rank" in self.model_fields_set else None

    @property
    def budgeted(self) -> bool:
        """True when the layer budget picks each layer's settings (a FLOPs or a speed-up target)."""
        return self.flops_ratio is not None or self.speedup is not None

    @property
    def target(self) -> tuple[str, float] | None:
        """The budget's cost axis and target: ("flops", ratio), ("time", speed-up), or None without a budget."""
        if self.speedup is not None:
            return "time", self.speedup
        return None if self.flops_ratio is None else ("flops", self.flops_ratio)

    _budget_keeps = field_validator("budget_keeps")(check_keep_list)
    _budget_ranks = field_validator("budget_ranks")(check_rank_list)
    _budget_input_keeps = field_validator("budget_input_keeps")(check_keep_list)
    _budget_input_ranks = field_validator("budget_input_ranks")(check_rank_list)


class MIDLConfig(LayerSettings, TargetSettings):
    """Settings of a conversion: which layers (``TargetSettings``) and how (``LayerSettings``); a recipe's
    ``targets`` and ``midl`` sections are those two halves, so every setting is declared once."""

    model_config = ConfigDict(extra="forbid")


def resolve_rank(rank: Union[int, float], in_features: int, out_features: int) -> int:
    """The integer rank a layer gets from a config value (int clipped, or share of min(in, out))."""
    limit = min(in_features, out_features)
    if isinstance(rank, float):
        return max(1, min(limit, round(rank * limit)))
    return min(rank, limit)


def granularity_for(module_type: str, granularity: str) -> str:
    """Map a config granularity onto the names a module type uses (token<->pixel, sequence<->sample)."""
    per_sample = granularity in PER_SAMPLE
    if module_type == "conv2d":
        return "sample" if per_sample else "pixel"
    return "sequence" if per_sample else "token"
