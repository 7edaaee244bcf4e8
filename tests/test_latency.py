"""The budget in measured time (``--speedup``): the latency cache's key, allocation on seconds (the brute-force
check on both axes is in test_budget.py), an
unreachable speed-up failing before any damage is measured, the causal-LM call shape, and the
report's line when the converted model is slower. No assertion depends on a timing."""
import copy
import io
from dataclasses import replace

import pytest
import torch
from rich.console import Console
from torch import nn

import midl_convert as mc
from midl_convert import LayerPlan, MIDLConfig, MIDLError, budget_damage, budget_knapsack, budget_options, latency, plan_conversion
from midl_convert.budget import LayerCost, Measurements, Option, allocate, predicted_ratio
from midl_convert.data import Batch
from midl_convert.report import Report, build_report, slower_reason


class Stack(nn.Module):
    def __init__(self, width: int = 32, blocks: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, 8)

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def batches(n: int = 2, width: int = 32) -> list[Batch]:
    gen = torch.Generator().manual_seed(0)
    return [Batch((torch.randn(16, width, generator=gen),)) for _ in range(n)]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


SMALL_GRID = dict(budget_keeps=[0.5], budget_ranks=[2], budget_input_keeps=[0.5], budget_input_ranks=[0])


# ----- the cache ---------------------------------------------------------------------------------
def test_cache_key_changes_with_thread_count_cpu_kernel_and_cache_version(monkeypatch):
    entry = {"layer": {"module_type": "linear", "in_features": 32, "out_features": 32}, "call": [1, 1, 32], "option": "dense"}
    key = latency.cache_key(entry, threads=2, cpu="Intel Xeon A")
    assert key == latency.cache_key(entry, threads=2, cpu="Intel Xeon A")
    assert key != latency.cache_key(entry, threads=1, cpu="Intel Xeon A")
    assert key != latency.cache_key(entry, threads=2, cpu="AMD EPYC B")
    assert key != latency.cache_key({**entry, "call": [1, 16, 32]}, threads=2, cpu="Intel Xeon A")
    assert set(latency.machine()) == {"cpu", "capability", "threads", "torch", "kernel"}
    monkeypatch.setattr(latency, "KERNEL_VERSION", latency.KERNEL_VERSION - 1)  # times of an older kernel: not read
    assert key != latency.cache_key(entry, threads=2, cpu="Intel Xeon A")
    monkeypatch.undo()
    monkeypatch.setattr(latency, "CACHE_VERSION", latency.CACHE_VERSION - 1)  # an older version's entries: not read
    assert key != latency.cache_key(entry, threads=2, cpu="Intel Xeon A")


def test_timings_are_written_atomically_and_read_back(cache, monkeypatch):
    shape = latency.LayerShape("linear", 32, 32, True)
    option = LayerPlan("x", "linear", 32, 32, 0, True, keep=0.5, rank=2, granularity="token")
    first = latency.time_options(shape, (1, 1, 32), [option], repeats=3)
    assert latency.cache_file().is_file() and not list(cache.glob("budget/*.tmp*"))
    monkeypatch.setattr(latency, "interleaved", lambda *a, **k: pytest.fail("timed again despite the cache"))
    assert latency.time_options(shape, (1, 1, 32), [option]) == first


# ----- allocation on seconds ---------------------------------------------------------------------
def test_time_allocation_takes_the_harmless_option_and_never_a_slower_one():
    harmless = Option(0.5, 0, 10, 0.001, "input", seconds=0.5e-3)
    harmful = Option(0.25, 0, 5, 0.9, "input", seconds=0.3e-3)
    slower = Option(0.75, 0, 20, 0.0, "output", seconds=2e-3)  # no damage, but slower than dense
    m = Measurements(100, {"a": LayerCost("a", 40, [harmless, harmful, slower], dense_seconds=1e-3)}, 0, 0.0, "k",
                     axis="time", dense_time=2e-3)
    choice = allocate(m, 1.25)  # needs 0.4 ms saved: the harmless option saves 0.5 ms
    assert choice["a"] is harmless
    assert predicted_ratio(m, choice) == pytest.approx(2e-3 / 1.5e-3)
    with pytest.raises(MIDLError, match=r"speedup 3 cannot be reached .* highest reachable whole-model speed-up is 1\.538x"):
        allocate(m, 3.0)


# ----- the budget on a model ---------------------------------------------------------------------
def test_unreachable_speedup_fails_before_any_damage_is_measured(monkeypatch):
    monkeypatch.setattr(budget_damage, "measure_damage", lambda *a, **k: pytest.fail("damage measured for an unreachable target"))
    config = MIDLConfig(speedup=50.0, **SMALL_GRID)
    with pytest.raises(MIDLError, match=r"speedup 50 cannot be reached on this machine .* highest reachable whole-model "
                                        r"speed-up is \d+\.\d+x"):
        plan_conversion(Stack(), config, (torch.randn(16, 32),), batches())


def fake_clock(monkeypatch, factor: dict[str, float]):
    """Options take ``factor[select]`` of the dense layer's 1 ms; the model takes 1 ms more than its layers."""
    calls, sets = [], []
    monkeypatch.setattr(latency, "working_sets", sets, raising=False)

    def time_options(shape, call, options, use_cache=True, working_set=0):
        calls.append(tuple(call))
        sets.append(working_set)
        return 1e-3, [factor[o.select] * 1e-3 for o in options]

    monkeypatch.setattr(latency, "time_options", time_options)
    monkeypatch.setattr(latency, "model_time", lambda model, inputs: 1e-3 + 1e-3 * len(model.blocks))
    return calls


def test_speedup_budget_allocates_on_measured_time(monkeypatch):
    calls = fake_clock(monkeypatch, {"output": 1.5, "input": 0.5})  # output side slower than dense: never measured
    measured = []
    real = budget_damage.measure_damage
    monkeypatch.setattr(budget_damage, "measure_damage", lambda m, todo, *a, **k: measured.append(todo) or real(m, todo, *a, **k))
    plan, _ = plan_conversion(Stack(), MIDLConfig(speedup=1.2, **SMALL_GRID), (torch.randn(16, 32),), batches())
    assert plan.budget["axis"] == "time" and plan.budget["predicted_ratio"] >= 1.2
    assert plan.budget["call"] == "example input" and set(calls) == {(16, 32)}
    weights = sum(p.numel() * 4 for p in Stack().parameters())
    assert set(latency.working_sets) == {weights}  # each option timed over the model's weights, not hot
    assert all(lp.select == "input" for todo in measured for options in todo.values() for lp in options)
    assert all(lp.select == "input" for lp in plan.converted)


def test_speedup_budget_checks_reach_on_time_only(monkeypatch):
    """Under ``speedup`` reachability is checked on measured time alone: options that cost more FLOPs than
    dense but run faster are allocated, and no FLOPs check counts the example input a second time."""
    fake_clock(monkeypatch, {"output": 1.5, "input": 0.5})
    axes, counted = [], []
    real_ratio, real_shapes = budget_knapsack.max_ratio, budget_options.input_shapes
    monkeypatch.setattr(budget_knapsack, "max_ratio", lambda m, *a, **k: axes.append(m.axis) or real_ratio(m, *a, **k))
    monkeypatch.setattr(budget_options, "input_shapes", lambda *a: counted.append(1) or real_shapes(*a))
    grid = dict(SMALL_GRID, budget_input_keeps=[0.9], budget_input_ranks=[16])  # input side: more FLOPs than dense
    plan, _ = plan_conversion(Stack(), MIDLConfig(speedup=1.2, **grid), (torch.randn(16, 32),), batches())
    assert plan.budget["predicted_ratio"] >= 1.2 and plan.budget["predicted_flops_ratio"] < 1.0
    assert axes and set(axes) == {"time"} and counted == [1]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_causal_lm_is_timed_at_batch_1_decode_and_measured_end_to_end(monkeypatch):
    model = tiny_llama()
    inputs = {"input_ids": torch.randint(0, 64, (1, 8))}
    assert latency.is_causal_lm(model)
    step = latency.model_step(model, inputs)
    with torch.inference_mode():
        first, second = step().logits, step().logits
    assert torch.equal(first, second)  # the cache is cropped back: every step decodes the same position
    calls = []
    monkeypatch.setattr(latency, "time_options", lambda s, call, options, use_cache=True, working_set=0: calls.append(call) or
                        (1e-3, [0.5e-3] * len(options)))
    monkeypatch.setattr(latency, "model_time", lambda m, i: 10e-3)
    data = [Batch({"input_ids": torch.randint(0, 64, (2, 8))}) for _ in range(2)]
    plan, _ = plan_conversion(model, MIDLConfig(speedup=1.1, **SMALL_GRID), inputs, data, "logits")
    assert plan.budget["call"] == latency.DECODE
    assert all(call[:-1] == (1, 1) for call in calls)  # one row per Linear
    student = mc.apply_plan(copy.deepcopy(model), plan)
    out = latency.end_to_end(model, student, inputs, repeats=2, new_tokens=3)
    assert out["call"] == latency.DECODE and out["generate_tokens"] == 3
    assert out["dense_tokens_per_s"] > 0 and out["converted_tokens_per_s"] > 0
    assert out["decoder"] == "lean: static KV cache, compiled step"
    assert out["compile_s"]["dense"] > 0 and out["compile_s"]["converted"] > 0
    hf = latency.end_to_end(model, student, inputs, repeats=2, new_tokens=3, decoder="hf")
    assert hf["decoder"] == "HF generate" and "compile_s" not in hf and hf["tokens_per_s_speedup"] > 0


def test_speedup_and_flops_ratio_together_are_refused():
    from pydantic import ValidationError

    from midl_convert.cli import build_recipe

    with pytest.raises(ValidationError, match="pass one of them"):
        MIDLConfig(speedup=1.3, flops_ratio=1.5)
    with pytest.raises(MIDLError, match=r"--flops-ratio\) and speedup \(--speedup\) both set"):
        build_recipe("resnet50", None, {"speedup": 1.3, "flops_ratio": 1.5}, False)


def test_cli_refuses_both_targets_in_one_line():
    from typer.testing import CliRunner

    from midl_convert.cli import app

    result = CliRunner().invoke(app, ["convert", "resnet50", "--random-init", "--speedup", "1.2", "--flops-ratio", "1.3"])
    assert result.exit_code == 2 and "pass one of them" in result.output and "Traceback" not in result.output


# ----- the report --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_report():
    """Per-token masks on 16-row calls: every layer runs as dense compute plus masking."""
    torch.manual_seed(0)
    teacher = Stack().eval()
    held = [Batch((torch.randn(16, 32),)) for _ in range(2)]
    student, plan = mc.convert(copy.deepcopy(teacher), MIDLConfig(keep=0.5, rank=2), held[0].inputs)
    report = build_report(student, teacher, held, "classifier", plan=plan, repeats=3, example_inputs=held[0].inputs)
    return report


def test_report_counts_the_paths_that_ran(token_report):
    f = token_report.flops
    assert all(lr.ran_path == "masked" for lr in token_report.layers)
    assert f["ran"] > f["midl"]  # the dense products ran, then the masks
    assert all(lr.ran_flops >= lr.dense_flops for lr in token_report.layers)
    assert all(lr.dense_ms > 0 and lr.midl_ms > 0 for lr in token_report.layers)


def test_report_says_slower_with_the_reason(token_report):
    slow = {"results": [{"speedup": 0.8}]}
    line = slower_reason(slow, token_report.layers)
    assert line.startswith("slower than dense (0.800x): per-token masks on 16-row calls run as dense compute plus masking")
    assert slower_reason({"results": [{"speedup": 1.2}], "call_shape": {"speedup": 1.1}}, token_report.layers) is None
    # a decoder: slower on its example sentence, faster decoding; the line names which, with the sentence's reason
    mixed = slower_reason({"results": [{"speedup": 0.38}], "call_shape": {"speedup": 1.4, "tokens_per_s_speedup": 1.15}},
                          token_report.layers)
    assert mixed == ("slower than dense (0.380x batch 1 on the example input): per-token masks on 16-row calls run as "
                     "dense compute plus masking (3 of 3 converted layers); faster at the call shape 1.400x, "
                     "in greedy decode 1.150x")
    report = Report.from_dict({**token_report.to_dict(), "latency": {**token_report.latency, "slower": line}})
    assert line in report.markdown()
    buf = io.StringIO()
    report.print(Console(file=buf, width=300))
    assert "slower than dense (0.800x)" in buf.getvalue()


def test_kernel_calls_are_counted_by_formula_and_masked_calls_by_what_ran():
    from midl_convert.flops import layer_flops
    from midl_convert.kernels import fused_kernel
    from midl_convert.ran import ran_flops

    if fused_kernel() is None:
        pytest.skip("the fused kernel is not built here")
    torch.manual_seed(0)
    one_row = (torch.randn(1, 1, 32),)
    student, _ = mc.convert(Stack().eval(), MIDLConfig(keep=0.5, rank=2), one_row)
    ran = ran_flops(student, one_row)
    layers = mc.midl_layers(student)
    assert len(layers) == 3
    for path, layer in layers.items():
        assert ran.route_of(path) == "kernel"
        assert ran.layers[path] == layer_flops(layer, [(1, 1)]).midl
    decode = ran_flops(student, None, lambda: student(torch.randn(1, 1, 32)))  # a step callable, as for decode
    assert decode.total == ran.total and all(decode.route_of(p) == "kernel" for p in decode.layers)


@pytest.mark.slow  # a whole run on the random test ViT: about 16 s on 2 shared cores
def test_cli_speedup_run_measures_prints_and_stores_the_speedup(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from midl_convert import models
    from midl_convert.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.hub_reachable.cache_clear()
    monkeypatch.setattr(latency, "time_options", lambda s, call, options, use_cache=True, working_set=0: (1e-3, [
        (0.4e-3 if o.select == "input" else 2e-3) for o in options]))
    monkeypatch.setattr(latency, "model_time", lambda m, i: 0.1)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["convert", "test_vit", "--random-init", "--speedup", "1.05", "--no-distill",
                                   "--batch-size", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "measured speed-up at the call shape (example input" in res.output
    saved = Report.load(out)
    assert saved.flops["budget"]["axis"] == "time" and saved.flops["budget"]["measured"]["speedup"] > 0
    assert saved.latency["call_shape"]["call"] == "example input"
    assert saved.flops["ran"] > 0 and all(lr.dense_ms is not None for lr in saved.layers)


def test_layers_are_timed_over_the_working_set_of_the_model(monkeypatch):
    layer = torch.nn.Linear(64, 32)
    size = (64 * 32 + 32) * 4
    assert len(latency._copies(layer, 0)) == 1
    copies = latency._copies(layer, 10 * size + 1)
    assert len(copies) == 11 and copies[0] is layer and copies[1] is not layer
    assert torch.equal(copies[5].weight, layer.weight) and copies[5].weight.data_ptr() != layer.weight.data_ptr()
    assert len(latency._copies(layer, 1 << 40)) == latency.MAX_COPIES
    seen = []
    monkeypatch.setattr(latency, "interleaved", lambda fns, repeats: [seen.append(f()) or 1.0 for f in fns])
    shape = latency.LayerShape("linear", 32, 32, True)
    option = replace(plan_conversion(Stack(), MIDLConfig(), (torch.randn(1, 32),))[0].converted[0], keep=0.5, rank=0,
                            select="input")
    dense, times = latency.time_options(shape, (1, 1, 32), [option, option], use_cache=False, working_set=4 * size)
    assert dense == 1.0 and times == [1.0, 1.0] and len(seen) == 4  # each option against dense, in its own run


def test_timed_copies_are_each_called_once_first_and_built_outside_inference_mode(monkeypatch):
    """A sample may reach each copy once, so a layer's first call (building what it remembers) is made
    before timing; and the layers are built as a model's are, with version counters to trust."""
    calls = []

    class Counted(torch.nn.Linear):
        def forward(self, x):
            calls.append(self)
            return super().forward(x)

    copies = latency._copies(Counted(8, 4), 5 * (8 * 4 + 4) * 4)
    step = latency._in_turn(copies, torch.randn(1, 8))
    assert len(calls) == 5 and {id(m) for m in calls} == {id(m) for m in copies}
    step()
    assert calls[-1] is copies[0]
    built = []
    real = latency.build_layer
    monkeypatch.setattr(latency, "build_layer", lambda *a: built.append(real(*a)) or built[-1])
    monkeypatch.setattr(latency, "interleaved", lambda fns, repeats: [1.0 for _ in fns])
    option = replace(plan_conversion(Stack(), MIDLConfig(), (torch.randn(1, 32),))[0].converted[0], keep=0.5, rank=0,
                            select="input")
    latency.time_options(latency.LayerShape("linear", 32, 32, True), (1, 1, 32), [option], use_cache=False)
    assert built and not any(t.is_inference() for t in built[0].parameters())
