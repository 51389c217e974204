"""Benchmark: input pipeline throughput on real MUFAC faces (decode, augment, batch).

    python bench/pipeline.py --data_dir ../shared/data --threads 0 2 --sizes 32 224

Reads the built MUFAC records (building them on first use, like the study), then times the grain
training pipeline (JPEG decode with PIL, RandomResizedCrop + flip, batching) and the evaluation
pipeline (decode, non-antialiased resize) for each image size and number of read threads. Target
(DESIGN.md): the pipeline delivers at least 1.5x the images/s that training consumes. Prints a
table and writes JSON (``--out``).
"""

import argparse
import json
import os
import platform
import time

import ml_collections
from absl import flags

from oneshui_jax.data import datasets, pipeline


def images_per_second(iterator, batch_size: int, batches: int) -> float:
    next(iterator)  # start-up (thread pool, first reads) is not timed
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--tfds_dir", default="~/tensorflow_datasets")
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--out", default="bench_out/pipeline.json")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    cfg = ml_collections.ConfigDict(dict(data_dir=args.data_dir, tfds_dir=args.tfds_dir,
                                         dedup="none", num_threads=2))
    ds = datasets.load("mufac", cfg)
    indices = list(range(len(ds.source)))
    rows = []
    for size in args.sizes:
        for threads in args.threads:
            pcfg = pipeline.PipelineConfig(image_size=size, batch_size=args.batch_size,
                                           num_threads=threads, prefetch_buffer_size=threads)
            train = pipeline.to_iterator(pipeline.train_dataset(ds.source, indices, pcfg, 1),
                                         pcfg)
            evaluation = pipeline.eval_batches(ds.source, indices, pcfg)
            rows.append({"size": size, "threads": threads,
                         "train_images_per_s": images_per_second(train, args.batch_size,
                                                                 args.batches),
                         "eval_images_per_s": images_per_second(evaluation, args.batch_size,
                                                                args.batches)})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"MUFAC input pipeline, batch {args.batch_size}, {args.batches} batches ({machine})")
    print("| image size | read threads | train images/s | eval images/s |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['threads']} | {r['train_images_per_s']:,.0f} | "
              f"{r['eval_images_per_s']:,.0f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
