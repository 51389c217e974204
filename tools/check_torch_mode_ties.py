"""What ``torch.mode`` returns for a tie of a boolean vote, on CPU and on CUDA (RMIA, SPEC 5.5).

The reference's RMIA stacks one boolean vote per augmentation pass and takes
``torch.mode(torch.stack(votes), 0).values * 1.0`` under bf16 autocast (``low_cost_mia.py``,
``majority_voting_tensor``). With an even number of passes (8 in the paper) a slice can hold as
many True as False votes; ``mia/rmia.py`` counts such a tie as False, torch.mode's rule on CPU.
This script runs the reference's call on every device present, with every arrangement of a tie
of 8 passes (70 of them) and of 2, 4, 6 and 16 passes, in [passes, n_x, n_z] blocks shaped like
the reference's (one [n_x, n_z] vote per pass), and prints one JSON object::

    python3 tools/check_torch_mode_ties.py     # where torch is installed (the GPU machine)

``{"torch": ..., "devices": {"cpu": {...}, "cuda": {...}}}`` with, per device and pass count,
how many tied slices came out True and False, and whether every slice without a tie gave its
majority (``majority_ok``). ``tie_rule`` is "False" or "True" when every tie agreed.
"""

import itertools
import json

import torch


def arrangements(passes: int) -> torch.Tensor:
    """[passes, k]: every arrangement of passes/2 True votes among ``passes``, one per column
    (at most 4,096 of them)."""
    cols = itertools.islice(itertools.combinations(range(passes), passes // 2), 4096)
    out = []
    for ones in cols:
        column = torch.zeros(passes, dtype=torch.bool)
        column[list(ones)] = True
        out.append(column)
    return torch.stack(out, dim=1)


@torch.autocast(device_type="cuda", dtype=torch.bfloat16)
def majority_vote(votes: list[torch.Tensor]) -> torch.Tensor:
    """The reference's call: the mode over passes of a list of boolean [n_x, n_z] votes."""
    return torch.mode(torch.stack(votes), 0).values * 1.0


def check(device: str, passes: int, n_x: int = 64, n_z: int = 2048, seed: int = 0) -> dict:
    """Ties planted at random (x, z) positions of reference-shaped blocks, the rest random
    votes with a strict majority."""
    gen = torch.Generator().manual_seed(seed + passes)
    votes = torch.rand(passes, n_x, n_z, generator=gen) < 0.5
    counts = votes.sum(0)
    if passes % 2 == 0:  # break the random ties, then plant known ones
        fix = counts == passes // 2
        votes[0][fix] = ~votes[0][fix]
    ties = arrangements(passes) if passes % 2 == 0 else torch.zeros(passes, 0, dtype=torch.bool)
    flat = votes.reshape(passes, -1)
    where = torch.randperm(flat.shape[1], generator=gen)[:ties.shape[1]]
    flat[:, where] = ties
    votes = flat.reshape(passes, n_x, n_z)
    result = majority_vote([v.to(device) for v in votes]).cpu().reshape(-1)
    tie_mask = torch.zeros(flat.shape[1], dtype=torch.bool)
    tie_mask[where] = True
    majority = flat.sum(0) * 2 > passes
    tie_values = result[tie_mask]
    out = {"passes": passes, "ties": int(tie_mask.sum()),
           "ties_true": int((tie_values == 1).sum()), "ties_false": int((tie_values == 0).sum()),
           "majority_ok": bool(torch.equal(result[~tie_mask] == 1, majority[~tie_mask]))}
    if out["ties"]:
        out["tie_rule"] = ("False" if out["ties_false"] == out["ties"] else
                           "True" if out["ties_true"] == out["ties"] else "mixed")
    return out


def main():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {"torch": torch.__version__, "devices": {}}
    for device in devices:
        name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
        report["devices"][device] = {"name": name,
                                     "checks": [check(device, p) for p in (2, 4, 6, 8, 16, 7)]}
        # the same slices in one small block and in the size of the paper's CelebA attack
        report["devices"][device]["checks"].append(check(device, 8, n_x=8, n_z=10))
        report["devices"][device]["checks"].append(check(device, 8, n_x=256, n_z=30_000))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
