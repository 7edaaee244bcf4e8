"""How much a MID-L gate can know (the output kind, ``kinds/output``, only): the light path's error it leaves, against an oracle and a fixed choice.

MiniLM (the real all-MiniLM-L6-v2 from the `demo` extra), every encoder Linear at keep 0.5 and
rank 32, fitted as ``mc.calibrate`` fits them (input-whitened light path, least-squares gate, the
error taken after GELU where one follows). On held-out sentences' tokens, the share of the light
path's error energy left on the unselected neurons, per layer type (mean of the six layers):

- static: the same neurons for every token (the largest error variance on the calibration rows);
- gate: the gate MID-L computes from ``V x``;
- gate on features of ``V x``: a least-squares gate on ``h, |h|, h^2`` (a nonlinear gate with
  the same input), to show that the input, not the gate's form, is the limit;
- gate reading rank R: a least-squares gate on a wider input projection (rank 64, 128) than the
  light path's, what a gate with its own projection would buy (it costs R * (in + out) more FLOPs);
- oracle: the neurons where the error truly is largest;
- Gaussian: what the oracle would leave if the error were independent Gaussian noise with one
  variance for all neurons.

    python benchmarks/gate_information.py
"""
from __future__ import annotations

import argparse
import copy
from collections import defaultdict

import torch

import midl_convert as mc
from midl_convert.calibrate import collect_groups
from midl_convert.fitting import left_energy as _left_energy, lstsq as _lstsq, whitened_factors
from midl_convert.downstream import post_fn


def gaussian_left(keep: float, samples: int = 1_000_000) -> float:
    """Energy share below the (1 - keep) quantile of |e| for e ~ N(0, 1)."""
    e2 = torch.randn(samples, generator=torch.Generator().manual_seed(0)).pow(2)
    return e2[e2 <= e2.quantile(1 - keep)].sum().item() / e2.sum().item()


def layer_type(path: str) -> str:
    return path.split(".", 3)[-1]  # encoder.layer.N.<type>


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--wide", type=int, nargs="+", default=[64, 128], help="input ranks of the wider gates")
    args = p.parse_args()
    torch.set_num_threads(2)
    loaded = mc.load_model("sentence-transformers/all-MiniLM-L6-v2")
    student = copy.deepcopy(loaded.model)
    data = mc.load_data("builtin:text", loaded, seed=0)
    mc.convert(student, mc.MIDLConfig(keep=args.keep, rank=args.rank, exclude=["pooler.dense"]), loaded.example_inputs)
    calib = collect_groups(student, [data.train_batch(1_000_000 + i, 32) for i in range(4)])
    held = collect_groups(student, data.heldout_batches(32, limit=64), seed=1)
    cols = ["static", "gate", "gate on features of V x", *[f"gate reading rank {r}" for r in args.wide], "oracle"]
    left: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with torch.no_grad():
        for path, layer in mc.midl_layers(student).items():
            post = post_fn(student, *layer.downstream)
            layer.calibrate_rows(calib[path], path=path, post=post)
            after = post if post is not None else (lambda y: y)
            w, b = layer.weight.float(), layer.bias.float()
            x, xh = calib[path][:, 0], held[path][:, 0]

            def error(rows: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return after(rows @ w.T + b) - after((rows @ v.T) @ u.T + b)

            e = error(x, layer.light_up.float(), layer.light_down.float())
            eh = error(xh, layer.light_up.float(), layer.light_down.float())
            e2 = eh.pow(2)[:, None]
            total = e2.sum().item()
            scores = {
                "static": e.pow(2).mean(0).expand_as(eh).contiguous(),
                "gate": layer.scores(xh @ layer.light_down.T).float(),
                "oracle": eh.abs(),
            }
            def feats(rows: torch.Tensor) -> torch.Tensor:
                h = rows @ layer.light_down.float().T
                return torch.cat([h, h.abs(), h.pow(2)], dim=1)

            g, c = _lstsq(feats(x), e.abs())  # the error's magnitude, from nonlinear features of the same input
            scores["gate on features of V x"] = feats(xh) @ g.T + c
            for r in args.wide:
                _, vg = whitened_factors(w, x, r)
                g, c = _lstsq(x @ vg.T, e)  # the signed error, from the wider projection
                scores[f"gate reading rank {r}"] = ((xh @ vg.T) @ g.T + c).abs()
            for name, s in scores.items():
                left[layer_type(path)][name].append(_left_energy(s, e2, layer.k) / total)
    print(f"all-MiniLM-L6-v2, keep {args.keep}, light path rank {args.rank}; share of the light path's error energy "
          f"left on the unselected neurons, held-out tokens (lower is better; Gaussian reference "
          f"{gaussian_left(args.keep):.3f})\n")
    print("| layer | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for kind, row in left.items():
        print(f"| {kind} | " + " | ".join(f"{sum(row[c]) / len(row[c]):.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
