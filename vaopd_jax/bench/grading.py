"""Grading throughput: grading.grade_batch vs plain sequential math-verify, same inputs.

    python -m vaopd_jax.bench.grading [--prompts 200] [--rollouts 4] [--workers N]

Builds a validation-sized batch (prompts x rollouts responses, Geometry3K-style gold
answers; a realistic mix of exact repeats, LaTeX-spacing variants, equivalent forms
and wrong answers), then times, in one process:
  1. extraction (grading.extract_answer) of every response;
  2. grade_batch with a cold worker pool (includes starting the workers);
  3. grade_batch again on fresh pairs with the pool warm (the cache cleared);
  4. the reference: math-verify parse + verify called sequentially on the main thread
     (its own signal-based timeouts on), for every pair.
and prints items/s and the ratio warm / reference. Decisions must agree exactly.
"""

from __future__ import annotations

import argparse
import random
import time

from vaopd_jax.eval import grading

GOLDS = ["2 \\sqrt { 221 }", "\\frac { 3 } { 2 }", "17", "4.5", "60", "\\frac { 40 } { 3 }", "8 \\sqrt { 3 }",
         "25", "\\frac { 7 } { 2 }", "12.5", "3 \\sqrt { 2 }", "135"]


def variants(gold: str, rng: random.Random) -> str:
    """A predicted answer for gold: same, respaced, equivalent, or wrong."""
    compact = gold.replace(" ", "")
    forms = {
        "2 \\sqrt { 221 }": ["\\sqrt{884}", "2\\sqrt{220}"],
        "\\frac { 3 } { 2 }": ["1.5", "3/2", "\\frac{2}{3}"],
        "17": ["17^\\circ", "16"],
        "4.5": ["\\frac{9}{2}", "4.4"],
        "60": ["60^{\\circ}", "\\frac{\\pi}{3}"],
        "\\frac { 40 } { 3 }": ["13.\\overline{3}", "\\frac{80}{6}", "13"],
        "8 \\sqrt { 3 }": ["\\sqrt{192}", "8\\sqrt{2}"],
        "25": ["25.0", "24"],
        "\\frac { 7 } { 2 }": ["3.5", "\\frac{7}{3}"],
        "12.5": ["\\frac{25}{2}", "12"],
        "3 \\sqrt { 2 }": ["\\sqrt{18}", "2\\sqrt{3}"],
        "135": ["135^\\circ", "45"],
    }[gold]
    roll = rng.random()
    if roll < 0.25:  # a wrong number: most sampled answers of a weak student are distinct
        return str(rng.randint(1, 999))
    if roll < 0.4:
        return f"\\frac{{{rng.randint(1, 99)}}}{{{rng.randint(2, 99)}}}"
    if roll < 0.5:
        return f"{rng.randint(1, 20)}\\sqrt{{{rng.randint(2, 300)}}}"
    return rng.choice([gold, compact, *forms])


def make_responses(num: int, seed: int = 0):
    rng = random.Random(seed)
    texts, golds = [], []
    for _ in range(num):
        gold = rng.choice(GOLDS)
        reasoning = " ".join(rng.choice(["we", "note", "angle", "triangle", "so", "thus", "$x$", "=", "2"])
                             for _ in range(300))
        pred = variants(gold, rng)
        texts.append(f"{reasoning}\nTherefore the answer is $\\boxed{{{pred}}}$.")
        golds.append(gold)
    return texts, golds


def reference_grade(pred: str, gold: str) -> bool:
    """math-verify on the main thread, as a single-threaded caller would use it."""
    import math_verify

    wrap = lambda s: "\\boxed{" + s + "}"  # noqa: E731
    gold_parsed, pred_parsed = math_verify.parse(wrap(gold)), math_verify.parse(wrap(pred))
    return bool(gold_parsed and pred_parsed and math_verify.verify(gold_parsed, pred_parsed))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="math-verify worker processes")
    args = parser.parse_args(argv)
    n = args.prompts * args.rollouts
    texts, golds = make_responses(n, seed=0)

    start = time.perf_counter()
    preds = [grading.extract_answer(t) for t in texts]
    extract_s = time.perf_counter() - start

    grading._POOL = grading.VerifyPool(args.workers)
    grading._POOL_PID = __import__("os").getpid()
    start = time.perf_counter()
    cold = grading.grade_batch(preds, golds)
    cold_s = time.perf_counter() - start

    grading._CACHE.clear()
    start = time.perf_counter()
    warm = grading.grade_batch(preds, golds)
    warm_s = time.perf_counter() - start

    start = time.perf_counter()
    reference = [reference_grade(p, g) for p, g in zip(preds, golds)]
    reference_s = time.perf_counter() - start

    unique = len(set(zip(preds, golds)))
    cheap = sum(grading.normalized_match(p, g) for p, g in set(zip(preds, golds)))
    print(f"batch: {args.prompts} prompts x {args.rollouts} rollouts = {n} responses "
          f"({unique} distinct (pred, gold) pairs, {cheap} settled by normalized match); "
          f"{grading._POOL.num_workers} worker processes")
    print(f"extract_answer          : {n / extract_s:10.0f} responses/s ({extract_s * 1e3:.1f} ms)")
    print(f"grade_batch, cold pool  : {n / cold_s:10.0f} answers/s ({cold_s:.2f} s, includes worker start-up)")
    print(f"grade_batch, warm pool  : {n / warm_s:10.0f} answers/s ({warm_s:.2f} s)")
    print(f"sequential math-verify  : {n / reference_s:10.0f} answers/s ({reference_s:.2f} s, main thread)")
    print(f"speed-up warm / sequential: {reference_s / warm_s:.1f}x; accuracy {sum(warm) / n:.3f}")
    mismatches = sum(a != b for a, b in zip(warm, reference))
    print(f"decisions differing from sequential math-verify: {mismatches} of {n} "
          f"(cold == warm: {cold == warm})")
    grading.shutdown()


if __name__ == "__main__":
    main()
