"""Run by test_distributed.py under torchrun (two gloo ranks); prints rank 0's verdicts as JSON."""

import json
import os

import torch
import torch.distributed as dist

from training.distributed import DistInfo, weights_in_sync

dist.init_process_group("gloo")
rank = int(os.environ["RANK"])
info = DistInfo(rank, 2, rank)
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
same = weights_in_sync(model, info)
with torch.no_grad():
    if rank == 1:
        model.weight[0, 0] += 1e-3
differ = weights_in_sync(model, info)
with torch.no_grad():  # a swap keeps the plain sum: the position-weighted checksum must catch it
    if rank == 1:
        model.weight[0, 0] -= 1e-3
        w = model.weight
        w[0, 0], w[0, 1] = w[0, 1].clone(), w[0, 0].clone()
swapped = weights_in_sync(model, info)
if rank == 0:
    print(json.dumps([same, differ, swapped]))
dist.destroy_process_group()
