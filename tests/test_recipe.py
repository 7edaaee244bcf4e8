"""Recipes: every shipped recipe validates; malformed ones give one line with key path and line."""
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from midl_convert import MIDLError
from midl_convert.recipe import Recipe, load_recipe, parse_recipe, recipe_schema

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_expected_recipes_ship():
    assert {p.name for p in RECIPES} >= {"resnet50.yaml", "vit_small.yaml", "bert_base.yaml",
                                         "llama_style_decoder.yaml", "minilm_offline.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    cfg = recipe.midl_config()
    assert 0 < cfg.keep <= 1 and recipe.model.spec


@pytest.mark.parametrize("text,message", [
    ("model: {spec: resnet18}\nmidl:\n  keep: 1.5\n", r"^r.yaml, line 3: midl.keep: .*keep must be in \(0, 1\]"),
    ("model:\n  spec: resnet18\n  wieghts: x\n", r"^r.yaml, line 3: model.wieghts: unknown key"),
    ("model: {spec: resnet18}\ndistill:\n  steps: many\n", r"^r.yaml, line 3: distill.steps: Input should be a valid integer"),
    ("model: {spec: resnet18}\ntargets:\n  overrides:\n    - match: fc\n      keep: 0\n",
     r"^r.yaml, line 5: targets.overrides.0.keep: .*keep must be in"),
    ("model: {spec: resnet18}\nmidl: {granularity: rows}\n", r"^r.yaml, line 2: midl.granularity"),
    ("midl: {keep: 0.5}\n", r"^r.yaml, line 1: model: Field required"),
    ("- a\n", r"^r.yaml: a recipe is a YAML mapping"),
    ("model: [1, 2\n", r"^r.yaml, line \d+: not valid YAML"),
])
def test_bad_recipes_name_key_and_line(text, message):
    with pytest.raises(MIDLError, match=message) as err:
        parse_recipe(text, "r.yaml")
    assert "\n" not in str(err.value)


def test_missing_recipe_file():
    with pytest.raises(MIDLError, match=r"recipe 'nope.yaml' does not exist"):
        load_recipe("nope.yaml")


def test_schema_lists_sections():
    schema = recipe_schema()
    assert set(schema["properties"]) >= {"model", "targets", "midl", "distill", "report", "output"}
    assert schema["additionalProperties"] is False
    Recipe.model_validate({"model": {"spec": "resnet18"}})


yaml_scalars = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=8),
                         st.booleans(), st.none())
sections = st.sampled_from(["model", "targets", "midl", "distill", "report", "output", "seed", "device", "bogus"])
keys = st.sampled_from(["spec", "keep", "rank", "steps", "lr", "include", "exclude", "granularity", "dir", "overrides",
                        "weights", "typo", "batch_size", "data"])


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(sections, st.one_of(yaml_scalars, st.dictionaries(keys, st.one_of(yaml_scalars, st.lists(yaml_scalars, max_size=3)), max_size=4)), max_size=5))
def test_malformed_recipes_never_traceback(data):
    import yaml

    text = yaml.safe_dump(data)
    try:
        parse_recipe(text, "h.yaml")
    except MIDLError as exc:
        assert str(exc).startswith("h.yaml") and "\n" not in str(exc)


def test_every_midl_config_setting_is_a_recipe_key():
    """budget_input_keeps and budget_input_ranks, documented in the README, were refused as unknown keys."""
    import yaml

    from midl_convert.config import MIDLConfig

    values = {"keep": 0.7, "rank": 0, "granularity": "sequence", "select": "auto", "adaptive": True, "flops_ratio": 1.4,
              "budget_keeps": [0.5], "budget_ranks": [8], "budget_input_keeps": [0.6, 0.8], "budget_input_ranks": [0],
              "budget_judge": 0, "budget_batches": 2, "budget_fit_batches": 1, "budget_batch_size": 4, "weight_dtype": "bfloat16", "centre": "median",
              "include": ["fc"], "exclude": ["head"], "min_size": 10, "skip_head": False,
              "overrides": [{"match": "fc", "keep": 0.9}]}
    targets = {"include", "exclude", "overrides", "min_size", "skip_head"}
    extra = set(MIDLConfig.model_fields) - set(values) - {"speedup"}  # speedup excludes flops_ratio: its own check below
    body = {"model": {"spec": "resnet18"}, "midl": {k: v for k, v in values.items() if k not in targets},
            "targets": {k: v for k, v in values.items() if k in targets}}
    cfg = parse_recipe(yaml.safe_dump(body), "r.yaml").midl_config()
    for key, value in values.items():
        got = getattr(cfg, key)
        assert (got if key != "overrides" else [o.model_dump(exclude_none=True) for o in got]) == value, key
    assert not extra, f"MIDLConfig settings this test does not set in a recipe: {sorted(extra)}"
    body["midl"] = {"speedup": 1.2}
    assert parse_recipe(yaml.safe_dump(body), "r.yaml").midl_config().speedup == 1.2
