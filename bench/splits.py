"""Benchmark: time to read identity annotations and make a reference-exact split.

    python bench/splits.py --data_dir ../shared/data

Target (DESIGN.md): a CelebA split in at most 1 s. Prints a table and writes JSON (``--out``).
"""

import argparse
import json
import os
import platform
import time

from oneshui_jax.data.annotations import read_identities
from oneshui_jax.splits import make_splits, split_images


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--num_identities", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_out/splits.json")
    args = parser.parse_args()
    rows = []
    for dataset in ("celeba", "celebahq", "mufac", "synthfaces"):
        t0 = time.perf_counter()
        ann = read_identities(dataset, args.data_dir)
        read_s = time.perf_counter() - t0
        times = []
        for seed in range(args.repeats):
            t0 = time.perf_counter()
            splits = make_splits(ann, args.num_identities, seed)
            split_images(ann, splits)
            times.append(time.perf_counter() - t0)
        rows.append({"dataset": dataset, "images": ann.num_images, "read_s": read_s,
                     "split_s_median": sorted(times)[len(times) // 2],
                     "split_s_max": max(times)})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"identity splits, N={args.num_identities}, {args.repeats} seeds ({machine})")
    print("| dataset | images | read annotations s | split s (median) | split s (max) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['images']} | {r['read_s']:.3f} | {r['split_s_median']:.3f} "
              f"| {r['split_s_max']:.3f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
