"""Writes ``tests/golden/reference_lr.json``: the learning rate of every training batch under the
reference's schedulers, computed with torch (run where torch is installed)::

    python3 tools/make_lr_fixture.py

The schedulers are built as the reference builds them (``main.py:pretrain``): ``CosineAnnealingLR
(T_max=epochs)`` first, then its ``WarmUpLR`` (``base_lr * last_epoch / (total_iters + 1e-8)``,
``total_iters = warmup_epochs * steps_per_epoch``); ``WarmUpLR.step()`` after every batch of the
warmup epochs and ``CosineAnnealingLR.step()`` after every later epoch (``engine.train_and_eval``).
"""

import json
import os

import torch


class WarmUpLR(torch.optim.lr_scheduler.LRScheduler):
    """The reference's linear warmup (``method/utils.py``)."""

    def __init__(self, optimizer, total_iters, last_epoch=-1):
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [base * self.last_epoch / (self.total_iters + 1e-8) for base in self.base_lrs]


def trajectory(base_lr, steps_per_epoch, epochs, warmup_epochs):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr, momentum=0.9, weight_decay=1e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    warmup = WarmUpLR(opt, steps_per_epoch * warmup_epochs) if warmup_epochs > 0 else None
    lrs = []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if epoch < warmup_epochs:
                warmup.step()
        if epoch >= warmup_epochs:
            cosine.step()
    return lrs


def main():
    cases = [dict(base_lr=1e-3, steps_per_epoch=7, epochs=30, warmup_epochs=2),
             dict(base_lr=0.05, steps_per_epoch=3, epochs=12, warmup_epochs=2),
             dict(base_lr=1e-3, steps_per_epoch=5, epochs=4, warmup_epochs=0)]
    out = {"torch": torch.__version__,
           "cases": [dict(c, lrs=trajectory(**c)) for c in cases]}
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "golden", "reference_lr.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=0)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
