"""The fused kernel: the reference path's numbers, the dispatch that picks it, and the fallbacks."""
import itertools
import logging
import shutil

import pytest
import torch
from torch import nn

from midl_convert import kernels
from midl_convert.kinds.output.layer import KERNEL_MAX_ROWS, OutputMIDLConv2d, OutputMIDLinear

IN, OUT = 48, 64


@pytest.fixture(scope="module")
def kernel():
    """The built kernel; a machine without a C++ toolchain skips, one with it must build."""
    module = kernels.fused_kernel()
    if module is None:
        if shutil.which("c++") and shutil.which("ninja") and not kernels.kernel_disabled():
            pytest.fail("a compiler and ninja are here, but the fused kernel did not build (see the debug log)")
        pytest.skip("no C++ toolchain: the fused kernel cannot be built here")
    return module


def make_layer(module_type: str, keep: float, rank: int, bias: bool, gate_abs: int) -> nn.Module:
    """A converted layer with a random gate, so scores are distinct floats (no ties)."""
    torch.manual_seed(0)
    if module_type == "linear":
        layer = OutputMIDLinear.from_linear(nn.Linear(IN, OUT, bias=bias), keep=keep, rank=rank)
    else:
        layer = OutputMIDLConv2d.from_conv(nn.Conv2d(IN, OUT, 1, bias=bias), keep=keep, rank=rank, granularity="pixel")
    with torch.no_grad():
        layer.gate_weight.normal_()
        layer.gate_bias.normal_()
    layer.gate_mode = "abs" if gate_abs else "linear"
    return layer.eval()


def one_input(module_type: str, rows: int = 1) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(rows, IN) if module_type == "linear" else torch.randn(rows, IN, 1, 1)


def run(layer: nn.Module, x: torch.Tensor, path: str) -> torch.Tensor:
    layer.route = path
    with torch.no_grad():
        return layer(x)


CASES = list(itertools.product(("linear", "conv"), (0.25, 0.5, 0.75), (0, 8, 32), (True, False), (0, 1)))


@pytest.mark.parametrize("module_type,keep,rank,bias,gate_abs", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_kernel_equals_reference_at_batch_one(kernel, module_type, keep, rank, bias, gate_abs):
    layer = make_layer(module_type, keep, rank, bias, gate_abs)
    x = one_input(module_type)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.testing.assert_close(run(layer, x, "kernel"), run(layer, x, "reference"), atol=1e-5, rtol=0)
    for name, value in layer.state_dict().items():  # the kernel writes only its own outputs
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("rows", [2, 5, KERNEL_MAX_ROWS, kernels.KERNEL_ROW_LIMIT])
@pytest.mark.parametrize("rank", [0, 8])
def test_kernel_equals_reference_for_rows_with_their_own_masks(kernel, rows, rank):
    layer = make_layer("linear", 0.5, rank, True, 1)
    x = one_input("linear", rows)
    torch.testing.assert_close(run(layer, x, "kernel"), run(layer, x, "reference"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [1, 3])
def test_two_threads_split_the_rows_the_same(kernel, rows):
    """Layers with enough work run on all torch threads: the split must not change a number."""
    torch.manual_seed(2)
    layer = OutputMIDLinear.from_linear(nn.Linear(512, 640), keep=0.5, rank=16).eval()
    x = torch.randn(rows, 512)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fused = run(layer, x, "kernel")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(fused, run(layer, x, "reference"), atol=1e-5, rtol=0)


def test_kernel_picks_the_top_k_set(kernel):
    """Exactly the neurons torch.topk picks carry the exact output, the others the light one."""
    layer = make_layer("linear", 0.25, 8, True, 1)
    x = one_input("linear")
    with torch.no_grad():
        picked = layer.scores(x @ layer.light_down.T).topk(layer.k).indices[0]
        exact = layer.dense_forward(x)[0]
    y = run(layer, x, "kernel")[0]
    mask = torch.zeros(OUT, dtype=torch.bool)
    mask[picked] = True
    torch.testing.assert_close(y[mask], exact[mask], atol=1e-5, rtol=0)
    assert not torch.isclose(y[~mask], exact[~mask], atol=1e-4).any()


def spy_on_kernel(monkeypatch) -> list:
    calls = []
    original = OutputMIDLinear._fused

    def spy(self, x):
        calls.append(x.shape)
        return original(self, x)

    monkeypatch.setattr(OutputMIDLinear, "_fused", spy)
    return calls


def test_auto_uses_the_kernel_only_where_it_applies(kernel, monkeypatch):
    calls = spy_on_kernel(monkeypatch)
    layer = make_layer("linear", 0.5, 8, True, 1)
    run(layer, one_input("linear"), "auto")
    run(layer, one_input("linear", KERNEL_MAX_ROWS), "auto")
    assert len(calls) == 2
    run(layer, one_input("linear", KERNEL_MAX_ROWS + 1), "auto")  # many tokens: dense plus masking
    layer(one_input("linear"))  # autograd recording
    run(transposed_weight(layer), one_input("linear"), "auto")  # the kernel would copy W
    run(layer.double(), one_input("linear").double(), "auto")  # not float32
    seq = OutputMIDLinear.from_linear(nn.Linear(IN, OUT), keep=0.5, rank=8, granularity="sequence").eval()
    run(seq, torch.randn(1, 5, IN), "auto")  # a shared mask: the sparse path
    assert len(calls) == 2


def transposed_weight(layer: nn.Module) -> nn.Module:
    layer.weight = nn.Parameter(layer.weight.detach().T.contiguous().T)  # same values, strided
    return layer


@pytest.mark.parametrize("setup,message", [
    (lambda layer: layer.train(), "training mode"),
    (lambda layer: layer.double(), "float32 CPU tensors"),
    (transposed_weight, "contiguous weight"),
])
def test_forced_kernel_says_why_it_cannot_run(kernel, setup, message):
    layer = setup(make_layer("linear", 0.5, 8, True, 1))
    x = one_input("linear").to(layer.weight.dtype)
    with pytest.raises(RuntimeError, match=f"path='kernel' cannot run this call: .*{message}"):
        run(layer, x, "kernel")


def test_disabled_kernel_falls_back_to_the_same_numbers(monkeypatch, caplog):
    layer = make_layer("conv", 0.5, 8, True, 1)
    x = one_input("conv")
    expected = run(layer, x, "reference")
    monkeypatch.setenv("MIDL_NO_KERNEL", "1")
    kernels._log_once.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="midl_convert.kernels"):
        assert kernels.fused_kernel() is None
        torch.testing.assert_close(run(layer, x, "auto"), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(run(layer, x, "auto"), expected, atol=1e-5, rtol=0)
    assert [r.getMessage() for r in caplog.records] == [
        "MID-L fused kernel disabled by MIDL_NO_KERNEL; layers use their torch paths"
    ]
    with pytest.raises(RuntimeError, match="disabled .* or could not be built"):
        run(layer, x, "kernel")


def test_failed_build_falls_back_to_the_same_numbers(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    layer = make_layer("linear", 0.25, 0, False, 0)
    x = one_input("linear")
    expected = run(layer, x, "reference")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    kernels._build.cache_clear()
    kernels._log_once.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="midl_convert.kernels"):
            torch.testing.assert_close(run(layer, x, "auto"), expected, atol=1e-5, rtol=0)
        assert "could not be built (RuntimeError: Ninja is required" in caplog.text
    finally:
        kernels._build.cache_clear()  # the next caller builds (or loads) the real one


def test_nan_scores_are_picked_first_like_topk(kernel):
    layer = make_layer("linear", 0.25, 0, True, 0)
    with torch.no_grad():
        layer.gate_bias[[3, 40]] = float("nan")
    x = one_input("linear")
    torch.testing.assert_close(run(layer, x, "kernel"), run(layer, x, "reference"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,k", [(64, 1), (64, 16), (300, 150), (300, 300)])
def test_kernel_selection_is_topk(kernel, n, k):
    """The same set as torch.topk on distinct scores; on ties, the same values (lowest index first)."""
    torch.manual_seed(3)
    s = torch.randn(40, n)
    picked = kernel.top_k_rows(s, k)
    assert torch.equal(picked, s.topk(k, dim=-1).indices.sort(dim=-1).values)
    tied = s.abs().round(decimals=1)  # many equal scores
    picked = kernel.top_k_rows(tied, k)
    assert torch.equal(tied.gather(1, picked).sort(dim=-1).values, tied.topk(k, dim=-1).values.sort(dim=-1).values)
    assert (picked[:, 1:] > picked[:, :-1]).all()  # ascending, so k distinct neurons


@pytest.mark.parametrize("module_type", ["linear", "conv"])
def test_many_rows_in_eval_mask_the_dense_output(kernel, module_type):
    """More rows than the kernel takes: dense compute plus masking, same numbers as the reference."""
    layer = make_layer(module_type, 0.5, 8, True, 1)
    x = torch.randn(KERNEL_MAX_ROWS + 4, IN) if module_type == "linear" else torch.randn(1, IN, 3, 4)
    assert layer.compute_route(layer.groups_of(x)) == "masked"
    torch.testing.assert_close(run(layer, x, "auto"), run(layer, x, "reference"), atol=1e-5, rtol=0)
