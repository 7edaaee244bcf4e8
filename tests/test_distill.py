"""Calibration and distillation: error goes down, resume reproduces, bad losses stop cleanly."""
import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import midl_convert as mc
from midl_convert.calibrate import calibrate
from midl_convert.distill import CHECKPOINT, DistillConfig, distill
from midl_convert.quality import compare
from helpers import TinyNet, tiny_data

HERE = Path(__file__).parent


def converted_pair(seed: int = 0, keep: float = 0.5, rank: int = 4):
    torch.manual_seed(seed)
    teacher = TinyNet().eval()
    student = copy.deepcopy(teacher)
    data = tiny_data()
    mc.convert(student, mc.MIDLConfig(keep=keep, rank=rank), data.train_batch(0, 4).inputs)
    return teacher, student, data


def test_calibration_reduces_error_before_any_step():
    teacher, student, data = converted_pair()
    held = data.heldout_batches(64)
    before = compare(student, teacher, held, "logits")
    layers = calibrate(student, [data.train_batch(i, 32) for i in range(4)])
    after = compare(student, teacher, held, "logits")
    assert {lc.path for lc in layers} == {"fc1", "fc2"}
    assert all(lc.error_after < lc.error_before for lc in layers)
    assert after["kl"] < 0.5 * before["kl"]
    assert after["agreement"] >= before["agreement"]


def test_whitened_light_path_survives_fewer_rows_than_features():
    from midl_convert.fitting import whitened_factors

    torch.manual_seed(0)
    w = torch.randn(48, 64)
    x = torch.relu(torch.randn(20, 64))  # 20 rows for 64 features: a singular covariance
    x[:, :10] = 0  # and dead channels
    u, v = whitened_factors(w, x, 8)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    fitted, plain = (x @ (u @ v).T - x @ w.T).norm(), None
    pu, ps, pvh = torch.linalg.svd(w)
    plain = (x @ (pu[:, :8] * ps[:8] @ pvh[:8]).T - x @ w.T).norm()
    assert fitted < plain  # still fitted to the rows it saw, not to the weights


def test_distillation_lowers_loss_and_trains_only_midl_params():
    teacher, student, data = converted_pair(seed=1)
    w_before = student.fc1.weight.clone()
    gate_before = student.fc1.gate_weight.clone()
    result = distill(student, teacher, data, "classifier", steps=40, lr=3e-3, batch_size=32, log_every=100, train="midl")
    assert len(result.losses) == 40
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert result.after["kl"] < result.before["kl"]
    assert torch.equal(student.fc1.weight, w_before)  # the original weights stay exact by default
    assert not torch.equal(student.fc1.gate_weight, gate_before)


def test_train_full_moves_the_original_weights_too():
    teacher, student, data = converted_pair(seed=2)
    w_before = student.fc1.weight.clone()
    distill(student, teacher, data, "classifier", steps=3, lr=1e-3, base_lr=1e-3, train="full", batch_size=8)
    assert not torch.equal(student.fc1.weight, w_before)
    assert not any(p.requires_grad for p in teacher.parameters())


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("train", ["midl", "all"])  # all: the LoRA deltas are in the checkpoint, merged at the end
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, train):
    cfg = DistillConfig(steps=8, lr=3e-3, batch_size=16, checkpoint_every=2, log_every=100, train=train)
    teacher, full, data = converted_pair(seed=3)
    ref = distill(full, teacher, data, "classifier", cfg, checkpoint_dir=tmp_path / "a")

    teacher, part, data = converted_pair(seed=3)
    original = data.train_batch

    def flaky(index, size):
        if index == 5:
            raise Interrupt("killed")
        return original(index, size)

    data.train_batch = flaky
    with pytest.raises(Interrupt):
        distill(part, teacher, data, "classifier", cfg, checkpoint_dir=tmp_path / "b")
    assert (tmp_path / "b" / CHECKPOINT).is_file()
    assert not list((tmp_path / "b").glob("*.tmp"))  # atomic: no half-written file left
    data.train_batch = original
    _, resumed_student, _ = converted_pair(seed=3)  # a fresh process: the student is rebuilt
    resumed = distill(resumed_student, teacher, data, "classifier", cfg, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from == 4
    assert resumed.losses == pytest.approx(ref.losses, rel=1e-5, abs=1e-7)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed_student.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n, equal_nan=True)


def poison(data, changes: dict):
    """``data`` whose training batch ``index`` is changed in place by ``changes[index](inputs)``."""
    original = data.train_batch

    def train_batch(index, size):
        batch = original(index, size)
        changes.get(index, lambda x: None)(batch.inputs[0])
        return batch

    data.train_batch = train_batch


def nan_at(x):
    x[0, 0] = float("nan")


def test_nan_loss_stops_with_clear_error(tmp_path):
    teacher, student, data = converted_pair(seed=4)
    poison(data, {3: nan_at})
    with pytest.raises(mc.MIDLError, match=r"distillation loss became nan at step 3; the last good checkpoint is"):
        distill(student, teacher, data, "classifier", steps=6, checkpoint_every=2, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 2


def test_layer_loss_is_used():
    teacher, student, data = converted_pair(seed=5)
    plain = distill(copy.deepcopy(student), teacher, data, "classifier", steps=2, batch_size=8)
    with_layers = distill(student, teacher, data, "classifier", steps=2, batch_size=8, layer_weight=1.0)
    assert with_layers.losses[0] > plain.losses[0]  # the layer term adds to the output term


@pytest.mark.slow
def test_two_process_data_parallel_matches_single_process(tmp_path):
    script = HERE / "ddp_worker.py"
    single = tmp_path / "single.pt"
    double = tmp_path / "double.pt"
    subprocess.run([sys.executable, str(script), str(single)], check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(script), str(double)], check=True, timeout=300)
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    assert a["world"] == 1 and b["world"] == 2
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-3, abs=1e-5)
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], rtol=1e-3, atol=1e-4, equal_nan=True)


def interrupted(tmp_path, cfg: DistillConfig, at: int, seed: int = 3, rank: int = 4):
    """A run to ``tmp_path`` stopped by an exception when it draws batch ``at``."""
    teacher, student, data = converted_pair(seed=seed, rank=rank)
    original = data.train_batch
    data.train_batch = lambda index, size: (_ for _ in ()).throw(Interrupt()) if index == at else original(index, size)
    with pytest.raises(Interrupt):
        distill(student, teacher, data, "classifier", cfg, checkpoint_dir=tmp_path)


def test_checkpoints_are_on_by_default_and_a_resume_says_from_which_step(tmp_path, capsys):
    assert DistillConfig().checkpoint_every == 50
    cfg = DistillConfig(steps=60, batch_size=8, log_every=1000)
    interrupted(tmp_path, cfg, at=55)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 50
    capsys.readouterr()
    teacher, student, data = converted_pair(seed=3)
    result = distill(student, teacher, data, "classifier", cfg, checkpoint_dir=tmp_path)
    assert result.resumed_from == 50 and len(result.losses) == 60
    assert f"resuming distillation at step 50 of 60 from {tmp_path / CHECKPOINT}" in capsys.readouterr().err


@pytest.mark.parametrize("change,said", [
    (dict(lr=1e-3, seed=1), "lr 0.003 -> 0.001, seed 0 -> 1"),
    (dict(batch_size=8), "batch_size 16 -> 8"),
    (dict(rank=2), "the converted model (plan, weights or calibration)"),
])
def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, capsys, change, said):
    cfg = DistillConfig(steps=8, lr=3e-3, batch_size=16, checkpoint_every=2, log_every=100)
    interrupted(tmp_path, cfg, at=5)
    rank = change.pop("rank", 4)
    other = cfg.model_copy(update=change)
    teacher, fresh, data = converted_pair(seed=3, rank=rank)
    ref = distill(fresh, teacher, data, "classifier", other)  # the same settings from scratch
    capsys.readouterr()
    teacher, student, data = converted_pair(seed=3, rank=rank)
    result = distill(student, teacher, data, "classifier", other, checkpoint_dir=tmp_path)
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / CHECKPOINT} is from a run with other settings ({said}); starting distillation over" in err
    assert result.resumed_from is None and result.losses == ref.losses
    for (n, a), (_, b) in zip(fresh.state_dict().items(), student.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=n)


def test_an_exploding_loss_is_never_the_last_good_checkpoint(tmp_path):
    teacher, student, data = converted_pair(seed=4)
    poison(data, {3: lambda x: x.mul_(1e4), 4: nan_at})  # step 3: finite, but far above the run's first loss
    with pytest.raises(mc.MIDLError, match=r"loss became nan at step 4; the last good checkpoint is .*; lower --lr .*"
                                           r"\(a run with other settings starts over\)"):
        distill(student, teacher, data, "classifier", steps=6, checkpoint_every=1, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 3  # not step 4, whose loss had exploded
    assert all(math.isfinite(x) for x in state["losses"]) and max(state["losses"]) < 10 * state["losses"][0]


def test_default_recovery_trains_lora_biases_and_norms_and_merges_them():
    teacher, student, data = converted_pair(seed=7)
    w_before = student.fc1.weight.clone()
    result = distill(student, teacher, data, "classifier", steps=20, lr=3e-3, batch_size=32, log_every=100)
    assert result.train == DistillConfig(train="all").train == "midl,lora,bias,norms"
    assert result.after["kl"] < result.before["kl"]
    assert not torch.equal(student.fc1.weight, w_before)  # the LoRA delta merged into W
    assert not any("lora" in name for name, _ in student.named_parameters())  # nothing left attached
