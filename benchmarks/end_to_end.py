"""End to end at batch 1 on CPU: dense against converted, with the quality beside the speed.

Models: resnet50 and vit_small_patch16_224 (random weights: speed only, nothing downloaded), the
real all-MiniLM-L6-v2 and the real EfficientNet-Lite0 (quality after closed-form calibration on the
built-in data, no training: agreement or cosine with the teacher on held-out data). Every Linear /
1x1 conv at keep 0.5 and rank 32 (heads and the MiniLM pooler stay dense), with per-position masks
(token / pixel) and per-sample masks (sequence / sample); EfficientNet-Lite0 also at the 1.2x layer
budget. Latency: medians of interleaved runs of teacher and student in one process.

    python benchmarks/end_to_end.py
    python benchmarks/end_to_end.py --models minilm --repeats 50
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import midl_convert as mc
from midl_convert.flops import model_flops
from midl_convert.quality import TASK_OUTPUT, compare, headline
from midl_convert.running import run_model

SPECS = {
    "resnet50": ("resnet50", True, "builtin:images", []),
    "vit_small": ("vit_small_patch16_224", True, "builtin:images", []),
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2", False, "builtin:text", ["pooler.dense"]),
    "effnet": ("tf_efficientnet_lite0", False, "builtin:images", []),
}


def latency_ms(teacher, student, batch, repeats: int) -> tuple[float, float]:
    times: dict[str, list[float]] = {"t": [], "s": []}
    with torch.inference_mode():
        for _ in range(3):
            run_model(teacher, batch)
            run_model(student, batch)
        for _ in range(repeats):
            for key, model in (("t", teacher), ("s", student)):
                t = time.perf_counter()
                run_model(model, batch)
                times[key].append(time.perf_counter() - t)
    return statistics.median(times["t"]) * 1e3, statistics.median(times["s"]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, keep 0.5, rank 32")
    print()
    print("| model | masks | converted layers | FLOPs ratio (whole model) | teacher ms | student ms | speed-up | quality vs teacher |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        spec, random_init, data_spec, exclude = SPECS[name]
        loaded = mc.load_model(spec, random_init=random_init)
        teacher = loaded.model.eval()
        data = mc.load_data(data_spec, loaded)
        output = TASK_OUTPUT[loaded.task]
        one = data.heldout_batches(1, limit=1)[0]
        held = data.heldout_batches(32, limit=128)
        calib = [data.train_batch(1_000_000 + i, 16) for i in range(2)]
        configs = [("token/pixel", mc.MIDLConfig(keep=0.5, rank=32, exclude=exclude, granularity="token")),
                   ("sequence/sample", mc.MIDLConfig(keep=0.5, rank=32, exclude=exclude, granularity="sequence"))]
        if name == "effnet":
            configs.append(("pixel, 1.2x budget", mc.MIDLConfig(flops_ratio=1.2, granularity="pixel")))
        for label, cfg in configs:
            student = copy.deepcopy(teacher)
            _, plan = mc.convert(student, cfg, loaded.example_inputs, batches=calib[:1], output=output)
            student.eval()
            ratio = model_flops(student, teacher, loaded.example_inputs).ratio
            quality = "random weights"
            if not random_init:
                mc.calibrate(student, calib)
                key, value = headline(compare(student, teacher, held, output))
                quality = f"{key} {value:.3f} (calibrated, no training)"
            t_ms, s_ms = latency_ms(teacher, student, one, args.repeats)
            print(f"| {spec} | {label} | {len(plan.converted)} | {ratio:.3f}x | {t_ms:.2f} | {s_ms:.2f} | {t_ms / s_ms:.2f}x | {quality} |",
                  flush=True)


if __name__ == "__main__":
    main()
