"""Weights in bfloat16 and int8: the input-side kernel and its reference against float32, whole
models in each dtype, keep 1, save and load, merge_and_unload and the config's check."""
import pytest
import torch
from torch import nn

import midl_convert as mc
from midl_convert import kernels
from midl_convert.kinds.input.layer import InputMIDLinear
from midl_convert.kinds.output.layer import KERNEL_MAX_ROWS
from midl_convert.weight_dtype import Bf16Linear, Int8Linear, quantize_rows, set_weight_dtype, weight_dtype_of
from test_custom_ops import INPUT_CASES, input_layer
from test_kernels import kernel  # noqa: F401 - a fixture

NAN = float("nan")
# Error of a layer's output against float32, as a share of the output's largest value: bfloat16
# keeps 8 bits of mantissa (its rounding of x, W and y), int8 weights 7 bits per output channel.
TOLERANCE = {"bfloat16": 2e-2, "int8": 2e-2}
# The kernel against a float32 reference on the same weights: bfloat16 rounds y to 8 bits; int8
# sums its picked inputs rounded to int16 (one scale per row, on CPUs with AVX-512 VNNI).
ROUNDING = {"bfloat16": 1e-2, "int8": 1e-4}


def near(got: torch.Tensor, expected: torch.Tensor, share: float) -> None:
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=share * expected.abs().max().item())


def in_dtype(dtype: str, x, wt, b, v, u):  # noqa: ANN001, ANN201 - the op's arguments
    """The op's arguments as a ``dtype`` layer passes them, and float32 ones with the same weights."""
    if dtype == "bfloat16":
        cast = [t.bfloat16() for t in (x, wt, b, v, u)]
        return cast + [None], [t.float() for t in cast]
    q, s = quantize_rows(wt.T)
    return [x, q.T.contiguous(), b, v, u, s], [x, (q.float() * s[:, None]).T, b, v, u]


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS + 4])  # the last: the masked GEMM
@pytest.mark.parametrize("case", INPUT_CASES, ids=["-".join(map(str, c)) for c in INPUT_CASES])
def test_input_op_in_dtype_equals_float32(kernel, case, rows, dtype):
    """The kernel (and the masked GEMM) in bfloat16 or int8 sums in float32: against a float32
    reference on the same weights it differs by rounding only, and against the float32 weights by
    the dtype's own error."""
    in_f, out_f, rank, bias, k, is_adaptive = case
    wt, b, v, u, scale = input_layer(in_f, out_f, rank, bias)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1))
    args, same = in_dtype(dtype, x, wt, b, v, u)
    threshold = float((same[0].abs() * scale).flatten().median()) if is_adaptive else NAN
    x_, wt_, b_, v_, u_, ws = args
    y = torch.ops.midl.input_rows(x_, wt_, b_, v_, u_, scale, k, threshold, ws)
    assert y.dtype == x_.dtype
    expected = kernels.input_rows_reference(*same, scale, k, threshold)
    near(y, expected, ROUNDING[dtype])
    near(kernels.input_rows_reference(x_, wt_, b_, v_, u_, scale, k, threshold, ws), expected, 1e-2)
    if not is_adaptive:  # the same picks as float32 up to near-ties, which bfloat16's rounding of x may swap
        near(y, kernels.input_rows_reference(x, wt, b, v, u, scale, k, threshold), TOLERANCE[dtype] * 3)


def test_the_kernel_serves_bfloat16_and_int8(kernel):
    """Not a fallback: the C++ kernel itself takes these dtypes (and refuses a mix it has no loop for)."""
    wt, b, v, u, scale = input_layer(48, 64, 4, True)
    for dtype in ("bfloat16", "int8"):
        args, same = in_dtype(dtype, torch.randn(1, 48), wt, b, v, u)
        assert kernels.input_kernel_applies(args[0], args[1])
        y = kernel.input_rows(*args[:5], scale, 24, NAN, args[5])
        near(y, kernels.input_rows_reference(*same, scale, 24, NAN), ROUNDING[dtype])
    assert not kernels.input_kernel_applies(torch.randn(1, 48), wt.bfloat16())  # mixed: the masked GEMM
    with pytest.raises(RuntimeError, match="input_rows takes"):
        kernel.input_rows(torch.randn(1, 48), wt.bfloat16(), b, v, u, scale, 24, NAN, None)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("out_f", [512, 520])  # outputs in blocks of 32 (the paired AVX-512 loops) or not
def test_kernel_on_a_layer_both_threads_share(kernel, dtype, out_f):
    """A layer big enough that the kernel splits the picked inputs between threads, with an odd
    count of picks: each output's partial sums are found again wherever the loops kept them."""
    wt, b, v, u, scale = input_layer(512, out_f, 0, True)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(3))
    args, same = in_dtype(dtype, x, wt, b, v, u)
    for k in (257, 512):
        y = kernel.input_rows(*args[:5], scale, k, NAN, args[5])
        near(y, kernels.input_rows_reference(*same, scale, k, NAN), ROUNDING[dtype])
    if dtype == "int8":  # an infinite input gives NaN or inf, never a finite number
        x[0, 0] = float("inf")
        scale_first = scale.clone()
        scale_first[0] = 1e3
        y = kernel.input_rows(x, *args[1:5], scale_first, 257, NAN, args[5])
        assert not y[0].isfinite().any() and y[1].isfinite().all()


def small_model(select: str = "input", keep: float = 0.5, rank: int = 0) -> tuple[nn.Module, nn.Module]:
    """(dense, converted) copies of a three-Linear MLP with a head left dense."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    converted = mc.convert(_copy(dense), mc.MIDLConfig(keep=keep, rank=rank, select=select, exclude=["4"]),
                           torch.randn(1, 64))[0]
    return dense, converted.eval()


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 40])  # the kernel for one and a few rows, the masked GEMM for many
def test_converted_model_in_dtype_follows_float32(kernel, dtype, rows):
    _, converted = small_model(rank=8)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = converted(x)
        cast = set_weight_dtype(_copy(converted), dtype)
        y = cast(x.bfloat16() if dtype == "bfloat16" else x)
    assert weight_dtype_of(cast) == dtype
    assert y.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    near(y, expected, TOLERANCE[dtype] * 3)  # three layers, picks may swap at near-ties
    assert type(cast[4]) is {"bfloat16": Bf16Linear, "int8": Int8Linear}[dtype]
    if dtype == "int8":
        assert isinstance(cast[4], Int8Linear) and cast[0].weight.dtype == torch.int8
        with torch.no_grad():  # the layer's reference path: the same numbers as its kernel
            reference = cast[0].rows_reference(x[:, None, :])[:, 0]
            near(cast[0](x), reference, ROUNDING["int8"])


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_keep_one_is_the_dense_layer_in_that_dtype(dtype):
    linear = nn.Linear(48, 32)
    layer = InputMIDLinear.from_linear(linear, keep=1.0)
    dense = set_weight_dtype(nn.Sequential(_copy(linear)), dtype)[0]
    set_weight_dtype(nn.Sequential(layer), dtype)
    x = torch.randn(5, 48, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    with torch.no_grad():
        if dtype == "bfloat16":
            assert torch.equal(layer(x), dense(x))
        else:  # the same int8 weights; the dense layer's kernel rounds its inputs to int16 (ROUNDING)
            near(layer(x), dense(x), ROUNDING["int8"])
            assert torch.equal(layer.weight, dense.weight) and torch.equal(layer.weight_scale, dense.weight_scale)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_merge_and_unload_gives_the_dense_layer_in_that_dtype(dtype):
    _, converted = small_model()
    set_weight_dtype(converted, dtype)
    x = torch.randn(3, 64, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    with torch.no_grad(), mc.dense(converted):
        expected = converted(x)
    merged = mc.merge_and_unload(converted)
    if dtype == "bfloat16":  # what set_weight_dtype makes of a dense Linear
        assert type(merged[0]) is Bf16Linear and merged[0].weight.dtype == torch.bfloat16
    else:
        assert isinstance(merged[0], Int8Linear) and merged[0].weight.dtype == torch.int8
    with torch.no_grad():
        near(merged(x), expected, ROUNDING[dtype])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_save_and_load_keep_the_dtype(tmp_path, dtype):
    dense, _ = small_model()
    converted = mc.convert(_copy(dense), mc.MIDLConfig(keep=0.5, rank=0, select="input", exclude=["4"], weight_dtype=dtype),
                           torch.randn(1, 64))[0]
    assert weight_dtype_of(converted) == dtype
    mc.save(converted, tmp_path / "m")
    loaded = mc.load(tmp_path / "m", model=_copy(dense))
    assert weight_dtype_of(loaded) == dtype
    assert {n: t.dtype for n, t in loaded.state_dict().items()} == {n: t.dtype for n, t in converted.state_dict().items()}
    x = torch.randn(2, 64, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted.eval()(x))


def test_int8_linear_is_the_dequantised_matmul():
    linear = nn.Linear(200, 70)
    q = Int8Linear.from_float(linear.weight, linear.bias)
    x = torch.randn(4, 3, 200)
    with torch.no_grad():
        torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantized(), q.bias), rtol=1e-5, atol=1e-5)
        near(q(x), linear(x), TOLERANCE["int8"])
        near(q(x.bfloat16()), linear(x), TOLERANCE["int8"] + TOLERANCE["bfloat16"])


def test_weight_dtype_is_checked():
    with pytest.raises(ValueError, match="weight_dtype"):
        mc.MIDLConfig(weight_dtype="fp8")
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        set_weight_dtype(nn.Linear(2, 2), "int4")


@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_is_the_bfloat16_linear(kernel, rows, bias):
    """The kernel (up to KERNEL_MAX_ROWS rows) and F.linear (more) give torch's bfloat16 Linear up
    to its rounding; the weight is the same tensor, stored column-major."""
    linear = nn.Linear(200, 70, bias=bias).bfloat16()
    expected_weight = linear.weight.detach().clone()
    x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.no_grad():
        expected = linear(x)
        layer = Bf16Linear.from_linear(linear)
        y = layer(x[None])[0]
    assert layer.weight is linear.weight and layer.weight.T.is_contiguous()
    assert torch.equal(layer.weight, expected_weight)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 70)
    near(y, expected, ROUNDING["bfloat16"])
    if rows <= KERNEL_MAX_ROWS:  # the kernel itself served it: its float32 sum, rounded once
        reference = (x.float() @ expected_weight.float().T + (linear.bias.float() if bias else 0)).bfloat16()
        near(y, reference, 1e-2)


def test_bf16_linear_trains_and_takes_a_row_major_weight():
    """With gradients, or a weight tied back to row-major storage (as HF's ``tie_weights`` does),
    it is ``F.linear``: gradients reach the weight, and the result is right."""
    layer = Bf16Linear.from_linear(nn.Linear(16, 8).bfloat16())
    x = torch.randn(1, 16).bfloat16()
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (8, 16)
    row_major = nn.Parameter(torch.randn(8, 16).bfloat16())
    layer.weight = row_major
    with torch.no_grad():
        near(layer(x), nn.functional.linear(x, row_major, layer.bias), ROUNDING["bfloat16"])


def test_bfloat16_leaves_a_tied_lm_head_tied(tmp_path):
    """A Llama's ``lm_head`` tied to its embedding stays a torch Linear on the one row-major tensor
    under bfloat16, dense or converted (its other Linears are ``Bf16Linear``), and both
    ``mc.save`` and HF's ``save_pretrained`` folders load back with the tie and the same logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    dense = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(0))
    cfg = mc.MIDLConfig(keep=0.5, rank=0, select="input", exclude=["lm_head", "o_proj"], weight_dtype="bfloat16")
    converted = mc.convert(_copy(dense), cfg, ids)[0]
    with torch.no_grad():
        expected = _copy(dense).bfloat16()(ids).logits
        set_weight_dtype(dense, "bfloat16")
        near(dense(ids).logits, expected, ROUNDING["bfloat16"])
        got = converted(ids).logits
    for model in (dense, converted):
        assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
        assert type(model.model.layers[0].self_attn.o_proj) is Bf16Linear
    mc.save(converted, tmp_path / "m")
    converted.save_pretrained(tmp_path / "hf")
    for folder in ("m", "hf"):
        loaded = mc.load(tmp_path / folder)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert type(loaded.model.layers[0].self_attn.o_proj) is Bf16Linear
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, got)


def test_a_bfloat16_model_converts_after_its_linears_are_bf16_linears():
    """``Bf16Linear`` is a plain Linear to the graph pass: a model cast first still has its targets,
    and the converted layers compute what the same conversion of the torch-Linear model does."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32)).bfloat16()
    cast = set_weight_dtype(_copy(dense), "bfloat16")
    x = torch.randn(3, 64).bfloat16()
    cfg = mc.MIDLConfig(keep=0.5, rank=0, select="input", weight_dtype="bfloat16")
    a, plan = mc.convert(_copy(dense), cfg, x)
    b, plan_b = mc.convert(cast, cfg, x)
    assert [lp.path for lp in plan_b.converted] == [lp.path for lp in plan.converted] == ["0", "2"]
    with torch.no_grad():
        assert torch.equal(b(x), a(x))
