r"""python -m vaopd_jax.study --config configs/study.py [--quick]

OPD, reweighting only, grouping only and VA-OPD on the synthetic task over several seeds, each run through the
real trainer (`python -m vaopd_jax.train`, one subprocess per run), with the teacher and the student warm-up
taught once and shared. Writes into ``study.workdir``:

  results.json  every run's validation records and the summary below
  table.md      mean +- 95 % interval (Student t over seeds) of fine-detail, coarse and overall accuracy and
                mean student VA at each validation step, per method; the steps each method needs to reach
                standard OPD's final fine-detail accuracy (mean over seeds, and how many seeds got there)
  curves.png    fine-detail accuracy per method against the step (mean over seeds, 95 % band)

`--quick` runs a few-second version of every run (the test suite's end-to-end check).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags


METRICS = (("fine", "val/accuracy_fine"), ("coarse", "val/accuracy_coarse"), ("overall", "val/accuracy"),
           ("student VA", "val/student_va_mean"))
METHOD_NAMES = {"opd": "OPD", "reweight_only": "reweight only", "group_only": "group only", "va_opd": "VA-OPD"}
# Two-sided 95 % Student t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
# The quick mode's trainer fields: every phase runs, in seconds.
QUICK = {"train.num_steps": 2, "teacher.sft.steps": 2, "teacher.sft.batch_size": 4, "student.sft.steps": 2,
         "student.sft.batch_size": 4, "data.prompts_per_step": 2, "data.synthetic_train_size": 64,
         "rollout.num_rollouts": 2, "eval.every": 2, "eval.num_problems": 4, "eval.batch_size": 4,
         "train.checkpoint_every": 2, "train.log_every": 1, "export.best": False}


def mean_interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95 % interval) of a sample (Student t, n - 1 degrees of freedom; 0 for n = 1)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval of no values")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)


def read_validation(run_dir: str) -> dict[int, dict[str, float]]:
    """step -> the validation record of a run's metrics.jsonl (the last one logged at each step)."""
    from vaopd_jax.runtime import metrics as metrics_lib

    return {int(r["step"]): r for r in metrics_lib.read_jsonl(os.path.join(run_dir, "metrics.jsonl"), kind="val")}


def summarize(runs: dict[str, dict[int, dict[int, dict]]]) -> dict:
    """The study's table from {method: {seed: {step: validation record}}}.

    Returns {"table": {method: {step: {metric: (mean, half-width)}}}, "target": OPD's final fine-detail accuracy
    (mean over seeds), "steps_to_target": {method: {"per_seed": {seed: step or None}, "mean": mean of the seeds
    that got there or None, "reached": count}}}. A step enters the table when every seed of the method has it.
    """
    table = {}
    for method, seeds in runs.items():
        common = sorted(set.intersection(*(set(steps) for steps in seeds.values())))
        table[method] = {step: {name: mean_interval([seeds[s][step][key] for s in seeds])
                                for name, key in METRICS if all(key in seeds[s][step] for s in seeds)}
                         for step in common}
    if "opd" not in runs:
        return {"table": table, "target": None, "steps_to_target": {}}
    target = mean_interval([max(steps.items())[1]["val/accuracy_fine"] for steps in runs["opd"].values()])[0]
    reach = {}
    for method, seeds in runs.items():
        per_seed = {s: next((step for step, r in sorted(steps.items()) if r["val/accuracy_fine"] >= target - 1e-9),
                            None) for s, steps in seeds.items()}
        got = [v for v in per_seed.values() if v is not None]
        reach[method] = {"per_seed": per_seed, "mean": sum(got) / len(got) if got else None, "reached": len(got)}
    return {"table": table, "target": target, "steps_to_target": reach}


def markdown(summary: dict, seeds) -> str:
    """table.md: one table per validation step (rows: methods), then the time-to-accuracy table."""
    lines = []
    steps = sorted({step for per_step in summary["table"].values() for step in per_step})
    for step in steps:
        lines += [f"**step {step}** (mean ± 95 % interval over seeds {', '.join(map(str, seeds))})", "",
                  "| method | " + " | ".join(name for name, _ in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for method, per_step in summary["table"].items():
            if step in per_step:
                cells = [f"{m:.3f} ± {h:.3f}" if name in per_step[step] else "–"
                         for name, _ in METRICS for m, h in [per_step[step].get(name, (0.0, 0.0))]]
                lines.append(f"| {METHOD_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
        lines.append("")
    if summary["target"] is not None:
        lines += [f"**steps to reach OPD's final fine-detail accuracy ({summary['target']:.3f})**", "",
                  "| method | mean step (seeds that reached it) | per seed |", "|---|---|---|"]
        for method, r in summary["steps_to_target"].items():
            mean = "not reached" if r["mean"] is None else f"{r['mean']:.1f} ({r['reached']}/{len(r['per_seed'])})"
            per_seed = ", ".join(f"{s}: {'–' if v is None else v}" for s, v in r["per_seed"].items())
            lines.append(f"| {METHOD_NAMES.get(method, method)} | {mean} | {per_seed} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, path: str) -> str:
    """curves.png: fine-detail accuracy per method (mean over seeds, 95 % band) against the step."""
    from matplotlib.figure import Figure

    from vaopd_jax.notebook.diagnostics import _render_figure

    figure = Figure(figsize=(6.0, 4.0), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    for method, seeds in runs.items():
        steps = sorted(set.intersection(*(set(s) for s in seeds.values())))
        stats = [mean_interval([seeds[s][step]["val/accuracy_fine"] for s in seeds]) for step in steps]
        means = [m for m, _ in stats]
        axes.plot(steps, means, marker="o", markersize=3, label=METHOD_NAMES.get(method, method))
        axes.fill_between(steps, [m - h for m, h in stats], [m + h for m, h in stats], alpha=0.15)
    axes.axhline(1 / 3, linestyle=":", color="grey", label="chance")
    axes.set_xlabel("distillation step")
    axes.set_ylabel("fine-detail accuracy")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return _render_figure(figure, path)


def _as_list(value) -> list[str]:
    """A config tuple as a list; '0,1,2' on the command line arrives as one comma-separated string."""
    items = [value] if isinstance(value, (str, int)) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def run_study(config, *, quick: bool = False, repo: str | None = None, echo: bool = False) -> dict:
    """Runs (or reuses) every (method, seed) run and writes results.json, table.md and curves.png."""
    from vaopd_jax.config import METHODS
    from vaopd_jax.notebook import utils as notebook_utils

    s = config.study
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seeds, methods = [int(x) for x in _as_list(s.seeds)], _as_list(s.methods)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"config.study.seeds = {s.seeds!r}: give one or more distinct seeds")
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"config.study.methods = {s.methods!r}: each must be one of {METHODS}")
    workdir = s.workdir
    os.makedirs(workdir, exist_ok=True)
    overrides = dict(s.overrides.to_dict())
    overrides.update({"train.num_steps": s.num_steps, "eval.every": s.eval_every,
                      "eval.num_problems": s.eval_num_problems, "train.checkpoint_every": s.num_steps})
    if quick:
        overrides.update(QUICK)
    # One teacher and one student warm-up for every run, and one compilation cache.
    overrides.update({"teacher.sft.output_dir": os.path.join(workdir, "teacher_sft"),
                      "student.sft.output_dir": os.path.join(workdir, "student_sft")})
    env = {"JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                       os.path.join(workdir, "jax_cache"))}
    train_config = os.path.join(repo, config.train_config)
    runs: dict[str, dict[int, dict]] = {}
    timings = {}
    for seed in seeds:
        for method in methods:
            run_dir = os.path.join(workdir, method, f"seed_{seed}")
            done = os.path.join(run_dir, "export", "final", "config.json")
            start = time.monotonic()
            if not os.path.exists(done):
                print(f"study: {method} seed {seed} -> {run_dir}", flush=True)
                notebook_utils.run_trainer(train_config, run_dir, method=method,
                                           overrides={**overrides, "seed": seed}, env=env, echo=echo)
            timings[f"{method}/seed_{seed}"] = time.monotonic() - start
            runs.setdefault(method, {})[seed] = read_validation(run_dir)
    summary = summarize(runs)
    table = markdown(summary, seeds)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table)
    plot(runs, os.path.join(workdir, "curves.png"))
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"seeds": seeds, "methods": methods, "quick": quick, "overrides": overrides,
                   "seconds_per_run": timings,
                   "runs": {m: {str(sd): {str(st): r for st, r in steps.items()} for sd, steps in by_seed.items()}
                            for m, by_seed in runs.items()},
                   "table": {m: {str(st): v for st, v in per.items()} for m, per in summary["table"].items()},
                   "target": summary["target"],
                   "steps_to_target": {m: {**r, "per_seed": {str(k): v for k, v in r["per_seed"].items()}}
                                       for m, r in summary["steps_to_target"].items()}}, f, indent=1)
    print(table, flush=True)
    print(f"study: {workdir}/table.md, curves.png, results.json", flush=True)
    return summary


def main(argv) -> None:
    del argv
    if flags.FLAGS.config is None:
        raise app.UsageError("pass --config configs/study.py")
    run_study(flags.FLAGS.config, quick=flags.FLAGS.quick)


def define_flags() -> None:
    """The command's flags, defined only when it runs: importing this module beside `vaopd_jax.train` (which
    also has a --config flag) must not clash."""
    config_flags.DEFINE_config_file("config", None, "study config, e.g. configs/study.py")
    flags.DEFINE_bool("quick", False, "tiny runs (seconds each): checks the whole study end to end")


if __name__ == "__main__":
    define_flags()
    app.run(main)
