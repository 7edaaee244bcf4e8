"""The kernels as torch ops: FLOP formulas, compile, export, autocast, the fallbacks, the build key
and the input-side kernel against its reference."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from midl_convert import kernels
from midl_convert.kinds.input.flops import input_flops_parts
from midl_convert.kinds.output.flops import midl_flops_parts
from midl_convert.kinds.output.layer import KERNEL_MAX_ROWS, OutputMIDLinear
from test_kernels import IN, OUT, kernel, make_layer, one_input, run  # noqa: F401 - kernel is a fixture

NAN = float("nan")


def counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def adaptive(layer: OutputMIDLinear, x: torch.Tensor) -> float:
    """Calibrate a threshold that keeps about ``keep`` of the scores of ``x``; returns it."""
    with torch.no_grad():
        s = layer.scores(x @ layer.light_down.T)
    layer.threshold = float(s.flatten().kthvalue(int(s.numel() * (1 - layer.keep))).values)
    layer.adaptive = True
    return layer.threshold


@pytest.mark.parametrize("rank", [0, 8])
@pytest.mark.parametrize("rows", [1, 5])
def test_flop_counter_counts_what_the_output_kernel_runs(kernel, rank, rows):
    layer = make_layer("linear", 0.5, rank, True, 1)
    x = one_input("linear", rows)
    layer.route = "auto"
    expected = midl_flops_parts(IN, OUT, rank, rows, rows, layer.k)
    assert counted(lambda: layer(x)) == sum(expected.values())


def test_flop_counter_counts_adaptive_picks(kernel):
    layer = make_layer("linear", 0.5, 8, True, 1)
    x = one_input("linear", 4)
    threshold = adaptive(layer, x)
    with torch.no_grad():
        picks = (layer.scores(x @ layer.light_down.T) > threshold).sum(-1).clamp_min(1).float().mean().item()
    expected = midl_flops_parts(IN, OUT, 8, 4, 4, picks)
    assert counted(lambda: layer(x)) == sum(expected.values())
    torch.testing.assert_close(run(layer, x, "auto"), run(layer, x, "reference"), atol=1e-5, rtol=0)


def output_args(layer: OutputMIDLinear, x: torch.Tensor, kernel_rows: int = KERNEL_MAX_ROWS) -> tuple:
    bias = layer.bias if layer.bias is not None else torch.empty(0)
    threshold = NAN if layer.threshold is None else layer.threshold
    return (x, layer.weight, bias, layer.light_down, layer.light_up, layer.gate_weight, layer.gate_bias,
            layer.gate_abs, layer.k, threshold, kernel_rows)


def test_op_beyond_the_kernel_rows_runs_and_counts_dense_compute(kernel):
    """More rows than the kernel serves: dense compute plus masking inside the op, counted as such."""
    layer = make_layer("linear", 0.5, 8, True, 1)
    x = one_input("linear", KERNEL_MAX_ROWS + 3)
    with torch.no_grad():
        y = torch.ops.midl.output_rows(*output_args(layer, x))
    torch.testing.assert_close(y, run(layer, x, "reference"), atol=1e-5, rtol=0)
    dense_rows = midl_flops_parts(IN, OUT, 8, len(x), len(x), OUT)
    assert counted(lambda: torch.ops.midl.output_rows(*output_args(layer, x))) == sum(dense_rows.values())


FALLBACK_SCRIPT = """
import math, torch
from torch import nn
from midl_convert import kernels
from midl_convert.kinds.output.layer import OutputMIDLinear
assert kernels.fused_kernel() is None
torch.manual_seed(0)
layer = OutputMIDLinear.from_linear(nn.Linear(48, 64), keep=0.5, rank=8).eval()
with torch.no_grad():
    program = torch.export.export(layer, (torch.randn(4, 48),), dynamic_shapes={"x": {0: torch.export.Dim("b", max=64)}})
    for rows in (1, 20):
        x = torch.randn(rows, 48)
        layer.route = "reference"
        torch.testing.assert_close(program.module()(x), layer(x), atol=1e-5, rtol=0)
    s = torch.randn(6, 50)
    assert torch.equal(torch.ops.midl.top_k_rows(s, 7), s.topk(7).indices.sort().values)
    wt, b, v, u, scale = torch.randn(48, 64), torch.randn(64), torch.randn(4, 48), torch.randn(64, 4), torch.rand(48)
    x = torch.randn(3, 48)
    ref = kernels.input_rows_reference(x, wt, b, v, u, scale, 20, math.nan)
    torch.testing.assert_close(torch.ops.midl.input_rows(x, wt, b, v, u, scale, 20, math.nan), ref)
print("ok")
"""


def test_ops_and_exported_graphs_run_without_the_extension():
    """With MIDL_NO_KERNEL=1 (or no compiler) the ops run their pure-torch implementations."""
    env = {**os.environ, "MIDL_NO_KERNEL": "1"}
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def graph_ops(graphs: list) -> list:
    return [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]


def test_compile_keeps_the_op_at_batch_one(kernel):
    torch._dynamo.reset()
    layer = OutputMIDLinear.from_linear(nn.Linear(IN, OUT), keep=0.5, rank=8).eval()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = one_input("linear")
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    with torch.no_grad():
        expected, got = layer(x), compiled(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    ops = graph_ops(graphs)
    assert ops.count("midl.output_rows.default") == 1 and not any("topk" in op for op in ops), ops


def test_export_with_a_dynamic_batch_crosses_the_kernel_switch(kernel):
    layer = OutputMIDLinear.from_linear(nn.Linear(IN, OUT), keep=0.5, rank=8).eval()
    batch = torch.export.Dim("batch", max=1024)
    with torch.no_grad():
        program = torch.export.export(layer, (torch.randn(4, IN),), dynamic_shapes={"x": {0: batch}})
    assert "midl.output_rows.default" in graph_ops([program.graph_module])
    module = program.module()
    for rows in (1, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 40):
        x = torch.randn(rows, IN)
        with torch.no_grad():
            torch.testing.assert_close(module(x), run(layer, x, "reference"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS])
def test_bf16_autocast_runs_the_kernel_in_float32(kernel, rows):
    """Under CPU autocast the op casts to float32 (it used to fail with a dtype error)."""
    layer = make_layer("linear", 0.5, 8, True, 1)
    x = one_input("linear", rows)
    expected = run(layer, x, "reference")
    for given in (x, x.bfloat16()):  # the model's input, or a previous layer's autocast output
        layer.route = "auto"
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            assert layer.compute_route(layer.groups_of(given)) == "kernel"
            y = layer(given)
        torch.testing.assert_close(y.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        reference = run(layer, x.bfloat16(), "reference")
    torch.testing.assert_close(reference.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0)


def test_build_name_is_keyed_on_version_and_instruction_set():
    avx512 = "x86_64 AVX512 avx2 avx512f fma"
    avx2 = "x86_64 AVX2 avx2 fma"
    assert kernels.extension_name(16, avx512) == kernels.extension_name(16, avx512)
    names = {kernels.extension_name(16, avx512), kernels.extension_name(16, avx2), kernels.extension_name(17, avx512)}
    assert len(names) == 3 and all(n.isidentifier() for n in names)
    isa = kernels.cpu_isa()
    assert torch.backends.cpu.get_cpu_capability() in isa.split()


# ----- the input side ----------------------------------------------------------------------------
INPUT_CASES = [
    # (in, out, rank, bias, k, adaptive)
    (48, 64, 8, True, 24, False),
    (48, 64, 0, True, 24, False),
    (48, 64, 8, False, 24, False),
    (48, 64, 8, True, 48, False),
    (48, 64, 8, True, 1, False),
    (48, 64, 8, True, 24, True),
    (300, 70, 0, False, 150, True),
    (96, 1000, 16, True, 40, False),
]


def input_layer(in_f: int, out_f: int, rank: int, bias: bool, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    wt = torch.randn(in_f, out_f, generator=gen) / in_f**0.5
    b = torch.randn(out_f, generator=gen) if bias else torch.empty(0)
    v = torch.randn(rank, in_f, generator=gen) / in_f**0.5
    u = torch.randn(out_f, rank, generator=gen) / max(rank, 1) ** 0.5
    scale = torch.rand(in_f, generator=gen) + 0.5
    return wt, b, v, u, scale


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5 of the output's scale (relative)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 4])  # the last: the masked GEMM
@pytest.mark.parametrize("case", INPUT_CASES, ids=["-".join(map(str, c)) for c in INPUT_CASES])
def test_input_kernel_equals_reference(kernel, case, rows):
    in_f, out_f, rank, bias, k, is_adaptive = case
    wt, b, v, u, scale = input_layer(in_f, out_f, rank, bias)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1))
    threshold = float((x.abs() * scale).flatten().median()) if is_adaptive else NAN
    expected = kernels.input_rows_reference(x, wt, b, v, u, scale, k, threshold)
    close(torch.ops.midl.input_rows(x, wt, b, v, u, scale, k, threshold), expected)


def test_input_reference_is_the_formula():
    """Exactly k inputs by |x| scale, W on them, the light path on the rest."""
    wt, b, v, u, scale = input_layer(12, 5, 3, True)
    x = torch.randn(1, 12)
    sel = (x.abs() * scale).topk(4).indices[0]
    rest = x.clone()
    rest[0, sel] = 0
    expected = b + x[0, sel] @ wt[sel] + u @ (v @ rest[0])
    close(kernels.input_rows_reference(x, wt, b, v, u, scale, 4, NAN)[0], expected)
    everything = kernels.input_rows_reference(x, wt, b, v, u, scale, 12, NAN)  # k = in: the dense layer
    close(everything, x @ wt + b)


@pytest.mark.parametrize("rows,is_adaptive", [(1, False), (3, False), (2, True)])
def test_input_kernel_threads_split_the_work_the_same(kernel, rows, is_adaptive):
    """Layers with enough work run on all torch threads: the split must not change a number."""
    wt, b, v, u, scale = input_layer(512, 1000, 16, True)
    x = torch.randn(rows, 512)
    threshold = float((x.abs() * scale).flatten().median()) if is_adaptive else NAN
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fused = torch.ops.midl.input_rows(x, wt, b, v, u, scale, 256, threshold)
    finally:
        torch.set_num_threads(before)
    close(fused, kernels.input_rows_reference(x, wt, b, v, u, scale, 256, threshold))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_adaptive", [False, True])
def test_many_rows_pick_in_one_pass_as_the_reference(kernel, dtype, is_adaptive):
    """Many rows run one pass of selection in C++ before the GEMM: the same inputs as the
    reference's top-k or threshold, a row with no score above the threshold keeping its best, and a
    NaN input kept (so the row's output is NaN, as the reference's)."""
    rows, in_f, out_f, k = KERNEL_MAX_ROWS + 5, 96, 64, 30
    wt, b, v, u, scale = (t.to(dtype) if i < 4 else t for i, t in enumerate(input_layer(in_f, out_f, 0, True)))
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[1] *= 1e-3  # nothing above the threshold: only its best
    x[2, 5] = float("nan")
    s = x.float().abs() * scale
    threshold = float(s[3:].flatten().median()) if is_adaptive else NAN
    y = torch.ops.midl.input_rows(x, wt, b, v, u, scale, k, threshold)
    expected = kernels.input_rows_reference(x, wt, b, v, u, scale, k, threshold)
    assert y[2].isnan().all() and expected[2].isnan().all()
    keep = torch.ones(rows, dtype=torch.bool)
    keep[2] = False
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y[keep].float(), expected[keep].float(), rtol=0, atol=tol * expected[keep].abs().max().item())
    if is_adaptive:  # row 1 is its best input alone through W
        best = s[1].argmax()
        torch.testing.assert_close(y[1].float(), (x[1, best] * wt[best] + b).float(), rtol=0, atol=1e-2)


@pytest.mark.parametrize("rows,is_adaptive", [(1, False), (4, True), (KERNEL_MAX_ROWS + 2, False)])
def test_flop_counter_counts_what_the_input_op_runs(kernel, rows, is_adaptive):
    in_f, out_f, rank, k = 48, 64, 8, 20
    wt, b, v, u, scale = input_layer(in_f, out_f, rank, True)
    x = torch.randn(rows, in_f)
    s = x.abs() * scale
    threshold = float(s.flatten().median()) if is_adaptive else NAN
    if rows > KERNEL_MAX_ROWS:  # the masked GEMM: every input through W
        picks = in_f
    else:
        picks = (s > threshold).sum(-1).clamp_min(1).float().mean().item() if is_adaptive else k
    expected = sum(input_flops_parts(in_f, out_f, rank, rows, rows, picks).values())
    assert counted(lambda: torch.ops.midl.input_rows(x, wt, b, v, u, scale, k, threshold)) == expected


def test_input_op_under_autocast_and_fake_tensors(kernel):
    wt, b, v, u, scale = input_layer(48, 64, 8, True)
    x = torch.randn(2, 48)
    expected = kernels.input_rows_reference(x, wt, b, v, u, scale, 24, NAN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.midl.input_rows(x.bfloat16(), wt, b, v, u, scale, 24, NAN)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=0.05 * expected.abs().max().item())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.midl.input_rows(*(mode.from_tensor(t) for t in (x, wt, b, v, u, scale)), 24, NAN)
    assert fake.shape == (2, 64)
