"""Run by test_budget under 1 or 2 processes (torchrun, gloo on CPU): the layer budget of a small stack,
its plan and the cached measurements saved for comparison."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ["MIDL_CACHE_DIR"] = sys.argv[2]
from test_budget import Stack, plan_for  # noqa: E402

from midl_convert import budget_damage  # noqa: E402
from midl_convert.processes import rank_and_size  # noqa: E402

shares = []  # how many layers this process judged itself
real_share = budget_damage.my_share
budget_damage.my_share = lambda jobs: shares.append(len(mine := real_share(jobs))) or mine
torch.manual_seed(0)
plan = plan_for(Stack(blocks=5), 1.3)
rank, size = rank_and_size()
if rank == 0:
    cached = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[2], "budget").glob("*.json"))]
    layers = [{p: [o["damage"] for o in c["options"]] for p, c in m["layers"].items()} for m in cached]
    with open(sys.argv[1], "w") as f:
        json.dump({"world": size, "judged_here": shares, "plan": [[lp.path, lp.keep, lp.rank, lp.select, lp.convert] for lp in plan.layers],
                   "damage": layers}, f)
