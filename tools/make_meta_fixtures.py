"""Writes the torch fixtures of the meta-loss network and of MetaUnlearn's meta-net optimiser.

Run with a Python that has torch and numpy (not the project's venv; the tests themselves need no
torch)::

    /tmp/torchenv/bin/python tools/make_meta_fixtures.py

Outputs (deterministic for a given torch version; float32 throughout):

``tests/golden/meta_loss_torch.npz``
    Two cases, keys prefixed ``<case>/``: ``full`` (multilabel, C=5, D=16, 7 identities,
    hidden 32, one hidden block, every input used) and ``plain`` (classification, C=4, D=8,
    hidden 24, no hidden block, no features, no identities). The torch ``MetaLoss`` below is
    written from the reference's layer list (SPEC.md 6.1); its parameters are perturbed after
    torch's default init so that no LayerNorm is the identity. Per case:

    * ``config``: JSON of the ``MetaLossConfig`` fields;
    * ``sd/<key>``: the state dict (torch layouts);
    * ``logits``, ``feats``, ``labels``: raw inputs; ``x``: ``cat([sigmoid(logits), feats,
      targets])`` as the reference builds it (targets one-hot for classification);
    * ``ids``: embedding rows (``full`` only);
    * ``out``: per-sample outputs in eval mode (no dropout), ``[B]``;
    * ``grad_x``: d mean(out) / d x; ``grad_sd/<key>``: d mean(out) / d parameter;
    * ``gradgrad_x``: d sum(grad_x ** 2) / d x (double backward, create_graph=True).

``tests/golden/amsgrad_torch.json``
    ``torch.optim.AdamW(amsgrad=True)`` (betas 0.9/0.999, eps 1e-8) on a 4-element float32
    parameter driven by a fixed sequence of gradients in which the raw second moment decreases
    after a large gradient (so the running max matters). Cases: ``lr=0.01, weight_decay=0.01``
    and ``lr=0.001, weight_decay=0``. Each has ``params0``, ``grads`` (one per step), ``params``
    (after each step), and the final ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``.
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden")


class MetaLoss(nn.Module):
    """The reference's ``MetaLoss`` (SPEC.md 6.1); ``input_size`` excludes the embedding."""

    def __init__(self, input_size, hidden_size=512, num_layers=0, num_identities=None,
                 identity_embed_size=64, prob_dropout=0.5, use_ids=True):
        super().__init__()
        self.use_ids = use_ids
        size = input_size
        if use_ids:
            self.embed = nn.Embedding(num_identities, identity_embed_size)
            size += identity_embed_size
        self.input_block = nn.Sequential(
            nn.Linear(size, hidden_size), nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Dropout(prob_dropout))
        self.hidden_blocks = nn.ModuleList([
            nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size),
                          nn.GELU(), nn.Dropout(prob_dropout),
                          nn.Linear(hidden_size, hidden_size), nn.GELU(),
                          nn.Dropout(prob_dropout))
            for _ in range(num_layers)])
        self.output_block = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, 1),
                                          nn.Softplus())

    def forward(self, x, identity=None, reduce=True):
        if self.use_ids:
            x = torch.cat([x, self.embed(identity)], 1)
        x = self.input_block(x)
        for block in self.hidden_blocks:
            x = x + block(x)
        x = self.output_block(x)
        return x.mean() if reduce else x


def _np(t):
    return t.detach().cpu().numpy().astype(np.float32)


def meta_loss_case(name, *, task, num_classes, feature_dim, num_identities, hidden_size,
                   num_layers, use_feats, use_ids, use_targets, batch, seed):
    torch.manual_seed(seed)
    c, d = num_classes, feature_dim
    size = c + d * use_feats + c * use_targets
    model = MetaLoss(size, hidden_size, num_layers, num_identities, 64, 0.5, use_ids)
    with torch.no_grad():  # no parameter keeps its trivial init (LayerNorm ones / zeros)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.eval()

    logits = 2.0 * torch.randn(batch, c)
    feats = torch.randn(batch, d)
    if task == "multilabel":
        labels = (torch.rand(batch, c) > 0.5).long()
        targets = labels
    else:
        labels = torch.randint(0, c, (batch,))
        targets = F.one_hot(labels, c)
    parts = [torch.sigmoid(logits)] + [feats] * use_feats + [targets] * use_targets
    x = torch.cat(parts, 1).requires_grad_(True)  # int64 targets promoted to float by cat
    ids = torch.randint(0, num_identities, (batch,)) if use_ids else None

    out = model(x, ids, reduce=False)[:, 0]
    mean = out.mean()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(mean, [x, *params.values()], create_graph=True)
    grad_x = grads[0]
    (gradgrad_x,) = torch.autograd.grad((grad_x ** 2).sum(), x)

    config = dict(num_classes=c, feature_dim=d, num_identities=num_identities, task=task,
                  hidden_size=hidden_size, num_layers=num_layers, embed_size=64, dropout=0.5,
                  use_feats=use_feats, use_ids=use_ids, use_targets=use_targets)
    arrays = {"config": np.array(json.dumps(config)), "logits": _np(logits), "feats": _np(feats),
              "labels": labels.numpy().astype(np.int64), "x": _np(x), "out": _np(out),
              "grad_x": _np(grad_x), "gradgrad_x": _np(gradgrad_x)}
    if use_ids:
        arrays["ids"] = ids.numpy().astype(np.int32)
    arrays |= {f"sd/{k}": _np(v) for k, v in model.state_dict().items()}
    arrays |= {f"grad_sd/{k}": _np(g) for k, g in zip(params, grads[1:], strict=True)}
    return {f"{name}/{k}": v for k, v in arrays.items()}


GRADS = [  # per step, 4 elements: big-then-small (raw v decreases), steady, sign flips, zeros
    [10.0, 0.5, 1.0, 0.0],
    [0.01, 0.5, -1.0, 0.3],
    [0.02, 0.5, 1.0, 0.0],
    [-0.05, 0.6, -0.1, 0.0],
    [3.0, 0.4, 0.1, -0.2],
    [0.0, 0.5, 0.05, 0.0],
]


def amsgrad_case(lr, weight_decay):
    param = nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.1]))
    params0 = param.detach().clone().tolist()
    opt = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay, amsgrad=True)
    trajectory = []
    for g in GRADS:
        param.grad = torch.tensor(g)
        opt.step()
        trajectory.append(param.detach().clone().tolist())
    state = opt.state[param]
    return dict(lr=lr, weight_decay=weight_decay, betas=[0.9, 0.999], eps=1e-8,
                params0=params0, grads=GRADS, params=trajectory,
                exp_avg=state["exp_avg"].tolist(), exp_avg_sq=state["exp_avg_sq"].tolist(),
                max_exp_avg_sq=state["max_exp_avg_sq"].tolist())


def main():
    os.makedirs(GOLDEN, exist_ok=True)
    arrays = meta_loss_case("full", task="multilabel", num_classes=5, feature_dim=16,
                            num_identities=7, hidden_size=32, num_layers=1, use_feats=True,
                            use_ids=True, use_targets=True, batch=6, seed=0)
    arrays |= meta_loss_case("plain", task="classification", num_classes=4, feature_dim=8,
                             num_identities=0, hidden_size=24, num_layers=0, use_feats=False,
                             use_ids=False, use_targets=True, batch=5, seed=1)
    arrays["torch_version"] = np.array(torch.__version__)
    path = os.path.join(GOLDEN, "meta_loss_torch.npz")
    np.savez_compressed(path, **arrays)
    print(f"wrote {path}")

    out = {"torch": torch.__version__,
           "cases": [amsgrad_case(0.01, 0.01), amsgrad_case(0.001, 0.0)]}
    path = os.path.join(GOLDEN, "amsgrad_torch.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
