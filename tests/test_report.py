"""The report: schema, files, round trip, terminal output, and numbers that match their sources."""
import copy
import io
import json

import jsonschema
import pytest
import torch
from PIL import Image
from rich.console import Console
from torch import nn

import midl_convert as mc
from midl_convert.data import Batch
from midl_convert.flops import count_flops
from midl_convert.report import FILES, REPORT_SCHEMA, Report, build_report
from midl_convert.report_render import PRINT_ROWS, summary_rows


class Stack(nn.Module):
    """A 1x1 conv stem, then enough Linear layers (pixels as tokens) for the printed table to be trimmed."""

    def __init__(self, width: int = 16, depth: int = 22, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 1)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.stem(x).flatten(2).transpose(1, 2)  # (B, pixels, width)
        for block in self.blocks:
            h = h + torch.relu(block(h))
        return self.head(h.mean(1))


def batches(n: int = 3, size: int = 4) -> list[Batch]:
    gen = torch.Generator().manual_seed(0)
    return [Batch((torch.randn(size, 3, 4, 4, generator=gen),), torch.randint(0, 5, (size,), generator=gen)) for _ in range(n)]


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    teacher = Stack().eval()
    held = batches()
    config = mc.MIDLConfig(keep=0.25, rank=2, overrides=[mc.LayerOverride(match="blocks.21", keep=1.0)])
    student, plan = mc.convert(copy.deepcopy(teacher), config, held[0].inputs)
    report = build_report(
        student, teacher, held, "classifier", plan=plan,
        settings={"model": "Stack", "config": config, "data": "random", "seed": 0},
        latency_batch_sizes=(1, 2), repeats=3,
    )
    return report, student, teacher, held


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    built[0].save(out)
    return out


def test_json_validates_against_schema(saved):
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    data = json.loads((saved / "report.json").read_text())
    jsonschema.validate(data, REPORT_SCHEMA, cls=jsonschema.Draft202012Validator)
    assert set(data) == set(REPORT_SCHEMA["required"])
    assert sorted(p.name for p in saved.iterdir()) == sorted(FILES)  # no temporary files left behind


def test_png_is_readable_and_not_trivial(saved):
    with Image.open(saved / "report.png") as img:
        img.verify()
    with Image.open(saved / "report.png") as img:
        assert img.format == "PNG" and min(img.size) > 300
        assert len(img.getcolors(1 << 16) or range(1 << 16)) > 10  # more than a blank canvas
    assert (saved / "report.png").stat().st_size > 20_000


def test_save_load_round_trip(built, saved):
    loaded = Report.load(saved)
    assert loaded.to_dict() == built[0].to_dict()
    assert (saved / "report.md").read_text() == loaded.markdown()


@pytest.mark.parametrize("version,message", [
    ({"format_version": 999}, r"format_version 999, newer than this midl-convert reads \(2\); upgrade midl-convert"),
    ({"format_version": "2"}, r"format_version '2'; this midl-convert reads 1 to 2"),
])
def test_load_refuses_format_versions_it_does_not_know_in_one_line(built, tmp_path, version, message):
    (tmp_path / "report.json").write_text(json.dumps(built[0].to_dict() | version))
    with pytest.raises(mc.MIDLError, match=message) as info:
        Report.load(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(mc.MIDLError, match=message):
        Report.from_dict(built[0].to_dict() | version)


def as_version_1(data: dict) -> dict:
    """report.json as format version 1 wrote it: schema_version, a layer's 'kind' and 'side', quality 'kind',
    the config's select null."""
    old = copy.deepcopy(data)
    del old["format_version"]
    old["schema_version"] = 1
    for layer in old["layers"]:
        layer["kind"], layer["side"] = layer.pop("module_type"), layer.pop("select")
    old["quality"]["kind"] = old["quality"].pop("output")
    old["settings"]["config"]["select"] = None
    return old


def test_a_version_1_report_loads_as_the_same_report(built, tmp_path):
    data = built[0].to_dict()
    assert data["format_version"] == 2 and data["settings"]["config"]["select"] == "output"
    (tmp_path / "report.json").write_text(json.dumps(as_version_1(data)))
    assert Report.load(tmp_path).to_dict() == data
    assert Report.from_dict(as_version_1(data)).to_dict() == data


def test_the_shipped_version_1_example_report_loads():
    """docs/examples' report.json was written by format version 1; it loads, and validates once migrated."""
    from pathlib import Path

    folder = Path(__file__).parents[1] / "docs" / "examples" / "tf_efficientnet_lite0-1.2x"
    old = json.loads((folder / "report.json").read_text())
    assert old["schema_version"] == 1 and "side" in old["layers"][0] and "kind" in old["quality"]
    report = Report.load(folder)
    assert [(lr.module_type, lr.select) for lr in report.layers] == [(o["kind"], o["side"]) for o in old["layers"]]
    assert report.quality["output"] == old["quality"]["kind"] and report.settings["recipe"]["midl"]["select"] == "auto"
    jsonschema.validate(report.to_dict(), REPORT_SCHEMA, cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("field,value", [("layers", 5), ("flops", "many"), ("memory", {"peak_bytes": "big"})])
def test_load_refuses_fields_of_the_wrong_type(built, tmp_path, field, value):
    """These raised AttributeError, or printed as if valid."""
    data = built[0].to_dict() | {field: value}
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(mc.MIDLError, match=rf"is not a valid midl-convert report \(at {field}"):
        Report.load(tmp_path)


@pytest.mark.parametrize("where,value", [
    (("layers", 0, "module_type"), "dense"),
    (("layers", 0, "flops_parts", "gate"), -3),
    (("memory", "results", 0, "student", "peak_bytes"), "big"),
    (("latency", "results", 1, "teacher", "median_ms"), -1.0),
    (("latency", "slower"), 2),
    (("quality", "output"), "pixels"),
    (("settings", "versions", "torch"), 2),
    (("flops", "heldout", "batches"), 1.5),
    (("layers", 0, "unknown"), 1),
    (("layers", 0, "side"), "input"),  # version 1's name, in a version-2 file
])
def test_load_refuses_nested_values_of_the_wrong_type(built, tmp_path, where, value):
    """The schema is derived from the report's classes, nested sections included: each wrong value is named by its path."""
    data = built[0].to_dict()
    section = data
    for key in where[:-1]:
        section = section[key]
    section[where[-1]] = value
    (tmp_path / "report.json").write_text(json.dumps(data))
    at = "/".join(map(str, where[:-1] if where[-1] in ("unknown", "side") else where))
    with pytest.raises(mc.MIDLError, match=rf"is not a valid midl-convert report \(at {at}:"):
        Report.load(tmp_path)


def test_schema_names_every_field_of_the_classes():
    """Schema and classes cannot drift: the properties are the dataclass fields, all required at the top level."""
    import dataclasses

    from midl_convert.report import LayerReport

    assert REPORT_SCHEMA["required"] == [f.name for f in dataclasses.fields(Report)]
    layer = REPORT_SCHEMA["$defs"]["LayerReport"]
    assert list(layer["properties"]) == [f.name for f in dataclasses.fields(LayerReport)]
    assert layer["additionalProperties"] is False and REPORT_SCHEMA["additionalProperties"] is False


def test_numbers_match_their_sources(built):
    report, student, teacher, held = built
    one = (held[0].inputs[0][:1],)
    f = report.flops
    assert f["dense"] == count_flops(teacher, one)
    assert f["midl"] == f["dense"] - f["converted_dense"] + f["converted_midl"]
    assert f["converted_midl"] == sum(lr.midl_flops for lr in report.layers)
    assert f["ratio"] == pytest.approx(f["dense"] / f["midl"]) and f["converted_ratio"] > 1
    by = {lr.path: lr for lr in report.layers}
    assert len(by) == 23 and by["stem"].module_type == "conv2d" and by["stem"].granularity == "pixel"
    assert by["blocks.0"].active_fraction == pytest.approx(by["blocks.0"].k / 16)  # Top-k keeps exactly k
    assert by["blocks.21"].keep == 1.0 and by["blocks.21"].ratio == 1.0 and by["blocks.21"].active_fraction == 1.0
    assert report.skipped == [{"path": "head", "reason": "classifier / output head (skip_head)"}]
    assert report.parameters["original"] == sum(p.numel() for p in teacher.parameters())
    assert report.parameters["converted"] == sum(p.numel() for p in student.parameters())
    assert report.quality["output"] == "logits" and report.quality["headline"] == "agreement"
    assert report.quality["metrics"]["samples"] == 12
    assert torch.__version__.startswith(report.settings["versions"]["torch"])
    assert report.settings["config"]["keep"] == 0.25 and report.settings["task"] == "classifier"


def test_latency_and_memory_per_batch_size(built):
    report = built[0]
    assert [r["batch_size"] for r in report.latency["results"]] == [1, 2]
    for r in report.latency["results"]:
        for who in ("teacher", "student"):
            t = r[who]
            assert 0 < t["min_ms"] <= t["q1_ms"] <= t["median_ms"] <= t["q3_ms"]
    assert "profiler" in report.memory["method"]
    for r in report.memory["results"]:
        for who in ("teacher", "student"):
            m = r[who]
            assert m["peak_bytes"] == m["weights_bytes"] + m["forward_peak_bytes"] and m["forward_peak_bytes"] > 0


def test_models_are_left_as_they_were(built):
    _, student, teacher, held = built
    layers = mc.midl_layers(student).values()
    assert not any(layer.track_stats for layer in layers) and not student.training and not teacher.training
    student.train()
    build_report(student, teacher, held[:1], "classifier", repeats=1)
    assert student.training and not teacher.training


def test_print_shows_summary_then_trimmed_layers(built):
    report = built[0]
    console = Console(record=True, width=200, file=io.StringIO())
    report.print(console)
    text = console.export_text()
    ratio = f"{report.flops['ratio']:.3f}"
    assert ratio in text and f"{report.quality['value']:.3f}" in text
    assert text.index(ratio) < text.index("Converted layers") < text.index("blocks.0")
    assert f"... {len(report.layers) - PRINT_ROWS} more layers (see report.md)" in text
    assert "blocks.21" not in text  # past the first PRINT_ROWS rows


@pytest.mark.parametrize("kwargs,message", [
    ({"task": "segmentation"}, "unknown task"),
    ({"batches": []}, "at least one held-out batch"),
    ({"repeats": 0}, "repeats"),
])
def test_bad_arguments_raise(built, kwargs, message):
    _, student, teacher, held = built
    args = {"student": student, "teacher": teacher, "batches": held, "task": "classifier"} | kwargs
    with pytest.raises(mc.MIDLError, match=message):
        build_report(**args)


def test_unconverted_model_is_refused():
    with pytest.raises(mc.MIDLError, match="no MID-L layers"):
        build_report(Stack(), Stack(), batches(1), "classifier")


def test_embedding_model_with_dict_inputs():
    """A tiny random BERT: keyword inputs, attention mask, sentence-embedding quality, attention FLOPs counted."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    teacher = BertModel(cfg).eval()
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    held = [Batch({"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": mask})]
    student, plan = mc.convert(copy.deepcopy(teacher), mc.MIDLConfig(keep=0.5, rank=8, granularity="sequence"), held[0].inputs)
    report = build_report(student, teacher, held, "embedding", plan=plan, repeats=1)
    jsonschema.validate(report.to_dict(), REPORT_SCHEMA)
    assert report.quality["output"] == "embedding" and report.quality["headline"] == "cosine"
    assert report.flops["input_shapes"] == {"input_ids": [1, 6], "attention_mask": [1, 6]}
    attention = 2 * (2 * 6 * 6 * 32)  # q k^T and p v over 6 tokens
    assert report.flops["dense"] - report.flops["converted_dense"] >= attention
    assert {lr.granularity for lr in report.layers} == {"sequence"}


def test_flops_headline_is_measured_on_the_held_out_batches():
    """Adaptive masks pick as many inputs as the data makes them: a quiet example input once reported
    1.855x where held-out text gave 1.635x. The report's headline ratio is summed over the held-out batches."""
    from midl_convert.flops import model_flops

    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    config = mc.MIDLConfig(keep=0.5, rank=0, select="input", adaptive=True, skip_head=False)
    student, plan = mc.convert(copy.deepcopy(teacher), config, (torch.randn(1, 16),))
    mc.calibrate(student, [Batch((torch.randn(256, 16),))])
    held = [Batch((torch.randn(32, 16),)) for _ in range(2)]
    report = build_report(student, teacher, held, "classifier", plan=plan, example_inputs=(0.05 * torch.randn(4, 16),),
                          repeats=1)
    dense = sum(count_flops(teacher, b.inputs) for b in held)
    midl = sum(model_flops(student, teacher, b.inputs).midl for b in held)
    f = report.flops
    assert f["heldout"]["dense"] == dense and f["heldout"]["midl"] == midl and f["heldout"]["batches"] == 2
    assert f["heldout"]["ratio"] == pytest.approx(dense / midl) and f["ratio"] > 1.1 * f["heldout"]["ratio"]
    assert summary_rows(report)[0] == ("FLOPs ratio, whole model, held-out data (2 batches)", f"{dense / midl:.3f}")
    jsonschema.validate(report.to_dict(), REPORT_SCHEMA)
