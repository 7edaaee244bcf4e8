"""FLOPs: hand-computed MID-L counts, the whole-model dense count, and agreement with FlopCounterMode."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import midl_convert as mc
from midl_convert.flops import count_flops, layer_calls, model_flops
from midl_convert.kinds.output.flops import midl_flops_parts


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class PW(nn.Module):
    def __init__(self, c_in: int = 8, c_out: int = 16):
        super().__init__()
        self.pw = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.pw(x)


def converted(model: nn.Module, x: torch.Tensor, **config) -> tuple[nn.Module, nn.Module]:
    teacher = model.eval()
    student, _ = mc.convert(copy.deepcopy(teacher), mc.MIDLConfig(skip_head=False, **config), (x,))
    return student.eval(), teacher


# Written out by hand (2 per multiply-add; pool/top-k/blend 1 per element):
#   light_down 2*r*in*rows, pool r*rows (per-sample only), gate 2*r*out*groups, topk out*groups,
#   light_up 2*r*out*rows, exact 2*k*in*rows, blend out*rows.
MLP_X = (2, 3, 32)  # rows 6; token: 6 groups, sequence: 2 groups
PW_X = (2, 8, 4, 4)  # 32 pixels; pixel: 32 groups, sample: 2 groups
HAND_CASES = [
    # (name, model, input shape, keep, rank, granularity, {path: (dense, MID-L)})
    # fc1 32->64, k=16, r=4, token: 1536 + 0 + 3072 + 384 + 3072 + 6144 + 384
    # fc2 64->16, k=4,  r=4, token: 3072 + 0 +  768 +  96 +  768 + 3072 +  96
    ("mlp_token", MLP, MLP_X, 0.25, 4, "token", {"fc1": (24576, 14592), "fc2": (12288, 7872)}),
    # fc1 sequence: 1536 + 24 + 1024 + 128 + 3072 + 6144 + 384
    # fc2 sequence: 3072 + 24 +  256 +  32 +  768 + 3072 +  96
    ("mlp_sequence", MLP, MLP_X, 0.25, 4, "sequence", {"fc1": (24576, 12312), "fc2": (12288, 7320)}),
    # pw 8->16, k=8, r=1, pixel:  512 + 0 + 1024 + 512 + 1024 + 4096 + 512 (at r=2 it costs more than dense)
    ("conv_pixel", PW, PW_X, 0.5, 1, "token", {"pw": (8192, 7680)}),
    # pw sample: 1024 + 64 + 128 + 32 + 2048 + 4096 + 512
    ("conv_sample", PW, PW_X, 0.5, 2, "sequence", {"pw": (8192, 7904)}),
]


@pytest.mark.parametrize("name,model,shape,keep,rank,gran,expected", HAND_CASES, ids=[c[0] for c in HAND_CASES])
def test_midl_flops_match_hand_count(name, model, shape, keep, rank, gran, expected):
    x = torch.randn(*shape)
    student, teacher = converted(model(), x, keep=keep, rank=rank, granularity=gran)
    flops = model_flops(student, teacher, (x,))
    assert {p: (f.dense, f.midl) for p, f in flops.layers.items()} == expected
    assert flops.dense == sum(d for d, _ in expected.values())  # ReLU is not counted, only the layers
    assert flops.midl == sum(m for _, m in expected.values())


def test_parts_of_one_layer():
    assert midl_flops_parts(32, 64, rank=4, rows=6, groups=2, k=16) == {
        "light_down": 1536, "pool": 24, "gate": 1024, "topk": 128, "light_up": 3072, "exact": 6144, "blend": 384,
    }
    assert mc.OutputMIDLinear.from_linear(nn.Linear(32, 64), keep=1.0, rank=4).flops_parts(6, 6) == {"dense": 24576}
    rank0 = midl_flops_parts(32, 64, rank=0, rows=6, groups=6, k=32)
    assert rank0 == {"light_down": 0, "pool": 0, "gate": 0, "topk": 384, "light_up": 0, "exact": 12288, "blend": 384}


class Attn(nn.Module):
    """Projections around SDPA: the attention matmuls must be counted too."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("model,shape", [(MLP, MLP_X), (PW, PW_X), (Attn, (2, 10, 32))])
def test_dense_count_is_flop_counter_mode(model, shape):
    m, x = model().eval(), torch.randn(*shape)
    counter = FlopCounterMode(display=False)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), counter, torch.no_grad():
        m(x)
    assert count_flops(m, (x,)) == counter.get_total_flops() > 0


def test_attention_is_counted_on_cpu():
    b, n, d = 2, 10, 32
    layers = 2 * b * n * d * 3 * d + 2 * b * n * d * d
    attention = 2 * (2 * b * n * n * d)  # q k^T and p v, all heads together
    assert count_flops(Attn().eval(), (torch.randn(b, n, d),)) == layers + attention


SPARSE_CASES = [
    # (name, model, input shape, config): FlopCounterMode sees the matmuls, not top-k/blend/pool (few %)
    ("mlp_token", lambda: MLP(64, 128, 64), (2, 5, 64), dict(keep=0.25, rank=16, granularity="token")),
    ("mlp_sequence", lambda: MLP(64, 128, 64), (2, 5, 64), dict(keep=0.25, rank=16, granularity="sequence")),
    ("conv_pixel", lambda: PW(32, 64), (2, 32, 5, 5), dict(keep=0.5, rank=16, granularity="token")),
    ("conv_sample", lambda: PW(32, 64), (2, 32, 5, 5), dict(keep=0.5, rank=16, granularity="sequence")),
    ("attn_keep_one", Attn, (2, 10, 32), dict(keep=1.0, rank=8)),
]


@pytest.mark.parametrize("name,model,shape,config", SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
def test_analytic_count_close_to_counter_on_sparse_path(name, model, shape, config):
    x = torch.randn(*shape)
    student, teacher = converted(model(), x, **config)
    for layer in mc.midl_layers(student).values():
        layer.route = "sparse"
    analytic = model_flops(student, teacher, (x,)).midl
    counted = count_flops(student, (x,))
    assert counted <= analytic <= 1.05 * counted


def test_keep_one_is_dense_in_code_and_in_the_count():
    """At keep 1.0 the layer runs the original matmul and no gate, so it costs exactly the dense FLOPs."""
    x = torch.randn(*MLP_X)
    student, teacher = converted(MLP(), x, keep=1.0, rank=4)
    flops = model_flops(student, teacher, (x,))
    assert flops.converted_midl == flops.converted_dense and flops.converted_ratio == 1.0 and flops.ratio == 1.0
    assert count_flops(student, (x,)) == count_flops(teacher, (x,))


def test_keep_quarter_small_rank_saves_flops():
    x = torch.randn(*MLP_X)
    flops = model_flops(*converted(MLP(), x, keep=0.25, rank=4), (x,))
    assert flops.converted_ratio == pytest.approx(36864 / 22464) and flops.converted_ratio > 1


def test_layer_calls_counts_shared_layers_and_keeps_stats():
    from test_graph import Block, inputs

    x = inputs()
    student, _ = mc.convert(Block().eval(), mc.MIDLConfig(keep=0.5, rank=4), x)
    shared = mc.midl_layers(student)["shared"]
    shared.track_stats = True
    calls = layer_calls(student, x)
    assert calls["shared"] == [(10, 10), (10, 10)] and calls["pw"] == [(32, 32)]
    assert shared.track_stats and shared.active_fraction is None
