"""Input-pipeline throughput: prompts/s with both image views, Geometry3K-sized images.

    python -m vaopd_jax.bench.data                         # 96 prompts, B=16, workers 0 and 2
    python -m vaopd_jax.bench.data --workers 0 1 2 4 --prompts 192
    python -m vaopd_jax.bench.data --train-step-s-per-prompt 0.8   # prints the pipeline/step ratio

What is measured: a Geometry3K-layout parquet fixture (PNG line drawings of 300-349 x 220-259
pixels, the size of typical Geometry3K figures; smart-resize lifts them to >= 262,144 pixels,
~1,100 patch rows per view) is read by `Geometry3KSource` and run through the full pipeline
(decode, pixelate, smart-resize + patchify BOTH views at the paper's pixel bounds, chat prompt,
bucket + pad + batch). The first batch (worker start-up, tokenizer load) is timed separately;
prompts/s is over the remaining batches. A per-stage breakdown of one record is printed too.
The pipeline is never the bottleneck while prompts/s > 1 / (train-step seconds per prompt).
"""

from __future__ import annotations

import argparse
import tempfile
import time


def stage_breakdown(source, config, tokenizer, repeats: int = 10) -> dict[str, float]:
    """Mean milliseconds per record of each featurize stage (single thread)."""
    from vaopd_jax.data import processor
    from vaopd_jax.data.sources import load_image

    totals = {"decode": 0.0, "pixelate": 0.0, "preprocess x2": 0.0, "prompt": 0.0}
    processor.build_prompt(tokenizer, source[0]["question"], [(1, 32, 32)])  # warm-up: compiles the chat template
    for i in range(repeats):
        record = source[i % len(source)]
        t0 = time.perf_counter()
        image = load_image(record["images"][0])
        t1 = time.perf_counter()
        pix = processor.pixelate(image, config.pixelation_ratio)
        t2 = time.perf_counter()
        _, grid = processor.preprocess_image(image, config.min_pixels, config.max_pixels)
        processor.preprocess_image(pix, config.min_pixels, config.max_pixels)
        t3 = time.perf_counter()
        processor.build_prompt(tokenizer, record["question"], [grid])
        t4 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += dt
    return {k: 1e3 * v / repeats for k, v in totals.items()}


def run(num_prompts: int, batch_size: int, workers: int, root: str, tokenizer, read_threads: int) -> dict:
    from vaopd_jax.data import pipeline
    from vaopd_jax.data.sources import Geometry3KSource
    from vaopd_jax.models import qwen3_vl

    source = Geometry3KSource(root, split="train")
    config = pipeline.PipelineConfig(batch_size=batch_size, seed=0, num_epochs=None, shard_index=0, shard_count=1,
                                     num_workers=workers, read_threads=read_threads)
    start = time.perf_counter()
    # The position ids and vision inputs are those of the Qwen3-VL models (their vision position grid).
    iterator = pipeline.make_iterator(source, config, tokenizer=tokenizer,
                                      model_config=qwen3_vl.Qwen3VLConfig.qwen3_vl_2b())
    batch = next(iterator)
    first = time.perf_counter() - start
    num_batches = max(1, num_prompts // batch_size)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - t0
    iterator.close()
    return {
        "workers": workers,
        "first_batch_s": first,
        "prompts_per_s": num_batches * batch_size / elapsed,
        "patch_rows": int(batch.num_patches.sum()),
        "padded_rows": int(batch.pixel_values.shape[0] * batch.pixel_values.shape[1]),
        "prompt_len": int(batch.input_ids.shape[1]),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=96, help="prompts timed per setting (after the first batch)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="grain worker process counts to try")
    parser.add_argument("--read-threads", type=int, default=2, help="map threads per process")
    parser.add_argument("--rows", type=int, default=64, help="distinct fixture records")
    parser.add_argument("--train-step-s-per-prompt", type=float, default=None,
                        help="seconds one train step of the demo config takes per prompt (for the comparison)")
    args = parser.parse_args(argv)

    import os

    from vaopd_jax.data.fixtures import write_geometry3k
    from vaopd_jax.data.pipeline import PipelineConfig
    from vaopd_jax.data.sources import Geometry3KSource
    from vaopd_jax.data.tokenizer import load_tokenizer

    print(f"machine: {os.cpu_count()} CPUs; batch {args.batch_size}; paper pixel bounds (262,144 .. 4,194,304)")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer()
    print(f"tokenizer load (offline, from cache if built): {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory() as root:
        write_geometry3k(root, "train", num_rows=args.rows, image_size=(300, 220), seed=1)
        breakdown = stage_breakdown(Geometry3KSource(root, "train"), PipelineConfig(), tokenizer)
        print("one record, ms: " + ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items())
              + f"  (total {sum(breakdown.values()):.1f} ms -> {1e3 / sum(breakdown.values()):.1f} prompts/s/thread)")
        results = [run(args.prompts, args.batch_size, w, root, tokenizer, args.read_threads) for w in args.workers]
    print(f"{'workers':>7} {'prompts/s':>10} {'first batch s':>14} {'patch rows (padded)':>20} {'prompt len':>10}")
    for r in results:
        print(f"{r['workers']:>7} {r['prompts_per_s']:>10.1f} {r['first_batch_s']:>14.1f} "
              f"{r['patch_rows']:>10} ({r['padded_rows']:>6}) {r['prompt_len']:>10}")
    best = max(results, key=lambda r: r["prompts_per_s"])
    if args.train_step_s_per_prompt:
        step_rate = 1.0 / args.train_step_s_per_prompt
        print(f"train step: {args.train_step_s_per_prompt:.3f} s/prompt = {step_rate:.2f} prompts/s; pipeline best "
              f"{best['prompts_per_s']:.1f} prompts/s = {best['prompts_per_s'] / step_rate:.1f}x the step's need")
    else:
        print(f"pipeline best: {best['prompts_per_s']:.1f} prompts/s "
              "(pass --train-step-s-per-prompt S to compare with the demo train step)")


if __name__ == "__main__":
    main()
