"""Run by test_distill under 1 or 2 processes (torchrun, gloo on CPU): distil a TinyNet, save the result."""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import midl_convert as mc  # noqa: E402
from midl_convert.distill import distill  # noqa: E402
from helpers import TinyNet, tiny_data  # noqa: E402

torch.manual_seed(0)
teacher = TinyNet().eval()
student = copy.deepcopy(teacher)
data = tiny_data()
mc.convert(student, mc.MIDLConfig(keep=0.5, rank=4), data.train_batch(0, 4).inputs)
result = distill(student, teacher, data, "classifier", steps=6, lr=3e-3, batch_size=16, log_every=100)
if int(os.environ.get("RANK", "0")) == 0:
    torch.save({"world": int(os.environ.get("WORLD_SIZE", "1")), "losses": result.losses,
                "state": {k: v for k, v in student.state_dict().items()}}, sys.argv[1])
