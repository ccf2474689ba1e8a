"""Time NODE-Adapter fits of the same maths on two checkouts (issue 21's speed comparison).

200 classes x 16 shots x 1024 dims, clustered synthetic features (easy on purpose: this times
the work, accuracy only shows the fit is sane); one epoch at batch 256 with the start search
off and the spec's dynamics, so both checkouts run the same 13 optimiser steps. With ``new``
also the ``fast`` preset's whole fit (searched start + 2 full-batch epochs). Run it once per
checkout in one machine state, the package of the checkout first on the path::

    PYTHONPATH=<old checkout>/src python benchmarks/node_step.py old
    PYTHONPATH=src python benchmarks/node_step.py new
"""

import sys
import time

import torch

import clipadapt
from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet

torch.manual_seed(0)
torch.set_num_threads(2)
C, K, D = 200, 16, 1024
centers = torch.nn.functional.normalize(torch.randn(C, D), dim=1)


def draw(n):
    y = torch.arange(C).repeat_interleave(n)
    x = torch.nn.functional.normalize(centers[y] + 0.045 * torch.randn(len(y), D), dim=1)
    return x, y


xtr, ytr = draw(K)
xva, yva = draw(4)
xte, yte = draw(10)
text = torch.nn.functional.normalize(centers + 0.06 * torch.randn(C, D), dim=1)
train = TrainSet(features=xtr, labels=ytr)
tf = TextFeatures(class_features=text, classnames=[f"c{i}" for i in range(C)])
val = ValidationSet(features=xva, labels=yva)
configs = [("spec 1 epoch, search off", dict(search=False, epochs=1, select_on_val=False))]
if sys.argv[1] == "new":
    configs[0][1]["gradient_gain"] = 0.0
    configs.append(("fast preset (searched start + 2 full-batch epochs)", dict(preset="fast")))
for label, params in configs:
    m = clipadapt.create_method("node_adapter", **params)
    start = time.perf_counter()
    m.fit(train, tf, val)
    s = time.perf_counter() - start
    acc = (m.logits(xte).argmax(1) == yte).float().mean().item() * 100
    print(
        f"{sys.argv[1]} | {label} | {s:.1f} s | test {acc:.1f} | {getattr(m, 'best_params_', {})}",
        flush=True,
    )
