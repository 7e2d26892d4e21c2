"""Reproduce the paper's MNIST results (Table 1, Figures 3, 4, 5 and 7) within a wall-clock budget.

One command trains every model the comparison needs, exports the default model, attacks each
model with the paper's attack and with stronger ones, and writes one JSON file per figure::

    python -m experiments.mnist_reproduction run --out runs/repro --budget-s 540   # one GPU, ~9 min
    python -m experiments.mnist_reproduction run --out /tmp/r --scale smoke        # CPU plumbing check
    python -m experiments.mnist_reproduction report runs/repro                     # tables + PNGs

Modules, one concern each (imports only go down this list):

- :mod:`.plan`: what to train and evaluate (jobs, scales, the eps grids);
- :mod:`.packing`: results into <= 15 MB parts for the trip back from a GPU machine, and back;
- :mod:`.worker`: one worker process runs its jobs through the real ``erc`` command line
  (``erc train``, ``erc export``, ``erc eval`` in-process), recording each command from the argv
  that ran, skipping (and recording) what would not finish by the deadline;
- :mod:`.scheduler`: times the training step (``bench/train.py``) on the idle GPU, plans the
  default model's epochs from it, runs the workers side by side under NVIDIA MPS;
- :mod:`.report`: tables.md and the figures' PNGs from the result folders.
"""
