r"""python -m vaopd_jax.study --config configs/study.py [--quick]
python -m vaopd_jax.study --config configs/dilution.py

OPD, reweighting only, grouping only and VA-OPD on the synthetic task over several seeds, each run through the
real trainer, with the teacher and the student warm-up taught once per seed (or once for all seeds) and shared
by the methods. With ``study.sweep_field`` set, the whole grid is repeated at each value of that trainer field
(configs/dilution.py: the scaffolding length of the replies). Writes into ``study.workdir``:

  results.json   every run's validation records and mechanism series (`MECHANISM`), the tables below, wall
                 times and the load average
  table.md       per sweep point: mean +- 95 % interval (Student t over seeds) of fine-detail, coarse and overall
                 accuracy and mean student VA at each validation step; the steps each method needs to reach
                 standard OPD's final fine-detail accuracy and `study.threshold`
  curves.png     fine-detail accuracy per method against the step (mean over seeds, 95 % band)
  mechanism.png  the mechanism series the runs logged (share of the loss on the vision-critical tokens, VA
                 concentration, student VA) per method against the step, when present
  dilution.md / dilution.png   (sweep) fine-detail accuracy at the last step and steps to `study.threshold`
                 against the swept value, per method, and VA-OPD minus OPD paired by seed

Every run goes through ONE function, `run_one`: the trainer in this process (`vaopd_jax.train.run`), so the runs
share the compiled programs (each distinct program is traced and compiled once per study). Every run's config is
validated before the first run starts. Planning the grid, reusing finished runs, the progress line and ETA, the
tables and the plots do not depend on how a run is executed. `--quick` runs a few-second version of every run
(the test suite's end-to-end check).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any

if __name__ == "__main__":
    from vaopd_jax.runtime import host_malloc

    host_malloc.reexec_with_hugepages()  # as the trainer does: XLA:CPU's temporaries in 2 MiB pages

METRICS = (("fine", "val/accuracy_fine"), ("coarse", "val/accuracy_coarse"), ("overall", "val/accuracy"),
           ("student VA", "val/student_va_mean"))
# The mechanism (issue: "the mechanism, logged"): read from metrics.jsonl when the trainer logs them.
MECHANISM = (("loss share on critical tokens", "train/loss_critical_share"),
             ("gradient share on critical tokens", "train/grad_critical_share"),
             ("VA top-10 % share", "train/va_top_share"),
             ("VA share on critical tokens", "train/va_critical_share"),
             ("top-10 % VA share on critical tokens", "train/va_top_critical_share"),
             ("student VA (validation)", "val/student_va_mean"))
METHOD_NAMES = {"opd": "OPD", "reweight_only": "reweight only", "group_only": "group only", "va_opd": "VA-OPD"}
METHOD_COLOURS = {"opd": "C0", "reweight_only": "C1", "group_only": "C2", "va_opd": "C3"}  # the same in every plot
# Two-sided 95 % Student t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
# The quick mode's trainer fields: every phase runs, in seconds.
QUICK = {"train.num_steps": 2, "teacher.sft.steps": 2, "teacher.sft.batch_size": 4, "student.sft.steps": 2,
         "student.sft.batch_size": 4, "data.prompts_per_step": 2, "data.synthetic_train_size": 64,
         "rollout.num_rollouts": 2, "eval.every": 2, "eval.num_problems": 4, "eval.batch_size": 4,
         "train.checkpoint_every": 2, "train.log_every": 1, "export.best": False}
RUN_FILE = "study_run.json"  # a run's settings, written before it starts: a finished run is reused only if equal
# Trainer fields a warm-up depends on (its role's sft node and tiny spec are added): same values, same model.
WARMUP_FIELDS = ("data", "model", "va.pixelation_ratio", "rollout.max_new_tokens", "seed")


# ----------------------------------------------------------------------------- statistics
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


def first_step_reaching(steps: dict[int, dict], target: float, key: str = "val/accuracy_fine") -> int | None:
    """The first validation step whose `key` is >= target (None: never)."""
    return next((step for step, r in sorted(steps.items()) if key in r and r[key] >= target - 1e-9), None)


def summarize(runs: dict[str, dict[int, dict[int, dict]]], threshold: float | None = None) -> dict:
    """The study's table from {method: {seed: {step: validation record}}}.

    Returns {"table": {method: {step: {metric: (mean, half-width)}}}, "target": OPD's final fine-detail accuracy
    (mean over seeds), "steps_to_target": {method: {"per_seed": {seed: step or None}, "mean": mean of the seeds
    that got there or None, "reached": count}}, "coarse_lowest": {method: (mean, half) of each seed's lowest
    coarse accuracy}, and with a `threshold` the same as steps_to_target for it as "steps_to_threshold"}.
    A step enters the table when every seed of the method has it.
    """
    table = {}
    for method, seeds in runs.items():
        common = sorted(set.intersection(*(set(steps) for steps in seeds.values())))
        table[method] = {step: {name: mean_interval([seeds[s][step][key] for s in seeds])
                                for name, key in METRICS if all(key in seeds[s][step] for s in seeds)}
                         for step in common}

    def reach(target):
        out = {}
        for method, seeds in runs.items():
            per_seed = {s: first_step_reaching(steps, target) for s, steps in seeds.items()}
            got = [v for v in per_seed.values() if v is not None]
            out[method] = {"per_seed": per_seed, "mean": sum(got) / len(got) if got else None, "reached": len(got)}
        return out

    # "coarse accuracy throughout": each seed's lowest coarse accuracy over its validation steps
    lowest = {method: mean_interval([min(r["val/accuracy_coarse"] for r in steps.values()) for steps in seeds.values()])
              for method, seeds in runs.items()
              if all("val/accuracy_coarse" in r for steps in seeds.values() for r in steps.values())}
    summary = {"table": table, "target": None, "steps_to_target": {}, "coarse_lowest": lowest}
    if "opd" in runs:
        summary["target"] = mean_interval([max(steps.items())[1]["val/accuracy_fine"]
                                           for steps in runs["opd"].values()])[0]
        summary["steps_to_target"] = reach(summary["target"])
    if threshold is not None:
        summary["threshold"], summary["steps_to_threshold"] = threshold, reach(threshold)
    return summary


def mechanism_summary(series: dict[str, dict[int, dict[str, dict[int, float]]]]) -> dict:
    """{method: {key: {"steps": [...], "mean": [(mean, half)], "run_mean": (mean, half)}}} from
    {method: {seed: {key: {step: value}}}}: per step over seeds, and each run's mean over its steps over seeds."""
    out = {}
    for method, seeds in series.items():
        keys = set.intersection(*(set(per_key) for per_key in seeds.values())) if seeds else set()
        for key in sorted(keys):
            steps = sorted(set.intersection(*(set(seeds[s][key]) for s in seeds)))
            if not steps:
                continue
            out.setdefault(method, {})[key] = {
                "steps": steps, "mean": [mean_interval([seeds[s][key][st] for s in seeds]) for st in steps],
                "run_mean": mean_interval([sum(seeds[s][key].values()) / len(seeds[s][key]) for s in seeds])}
    return out


# ----------------------------------------------------------------------------- tables
def _cell(value) -> str:
    return "–" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"


def _reach_rows(title: str, reach: dict) -> list[str]:
    lines = [title, "", "| method | mean step (seeds that reached it) | per seed |", "|---|---|---|"]
    for method, r in reach.items():
        mean = "not reached" if r["mean"] is None else f"{r['mean']:.1f} ({r['reached']}/{len(r['per_seed'])})"
        per_seed = ", ".join(f"{s}: {'–' if v is None else v}" for s, v in r["per_seed"].items())
        lines.append(f"| {METHOD_NAMES.get(method, method)} | {mean} | {per_seed} |")
    return lines + [""]


def markdown(summary: dict, seeds, mechanism: dict | None = None) -> str:
    """table.md: fine-detail accuracy per method and validation step, every metric at the last step, the
    time-to-accuracy tables and the mechanism means (mean ± 95 % interval over seeds)."""
    over = f"mean ± 95 % interval over seeds {', '.join(map(str, seeds))}"
    steps = sorted({step for per_step in summary["table"].values() for step in per_step})
    lines = [f"**fine-detail accuracy by validation step** ({over})", "",
             "| method | " + " | ".join(f"step {st}" for st in steps) + " |", "|---|" + "---|" * len(steps)]
    for method, per_step in summary["table"].items():
        lines.append(f"| {METHOD_NAMES.get(method, method)} | "
                     + " | ".join(_cell(per_step.get(st, {}).get("fine")) for st in steps) + " |")
    lines.append("")
    for step in steps[:1] + steps[-1:] if len(steps) > 1 else steps:
        lines += [f"**step {step}** ({over})", "", "| method | " + " | ".join(name for name, _ in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for method, per_step in summary["table"].items():
            if step in per_step:
                cells = [_cell(per_step[step].get(name)) for name, _ in METRICS]
                lines.append(f"| {METHOD_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
        lines.append("")
    if summary.get("coarse_lowest"):
        lines += [f"**lowest coarse accuracy over the validation steps** ({over}): " + ", ".join(
            f"{METHOD_NAMES.get(m, m)} {_cell(v)}" for m, v in summary["coarse_lowest"].items()), ""]
    if summary["target"] is not None:
        lines += _reach_rows(f"**steps to reach OPD's final fine-detail accuracy ({summary['target']:.3f})**",
                             summary["steps_to_target"])
    if summary.get("threshold") is not None:
        lines += _reach_rows(f"**steps to reach fine-detail accuracy {summary['threshold']:.2f}**",
                             summary["steps_to_threshold"])
    if mechanism:
        keys = [(name, key) for name, key in MECHANISM if any(key in per for per in mechanism.values())]
        lines += ["**mechanism** (each run's mean over its logged steps; mean ± 95 % interval over seeds)", "",
                  "| method | " + " | ".join(name for name, _ in keys) + " |", "|---|" + "---|" * len(keys)]
        for method, per in mechanism.items():
            lines.append(f"| {METHOD_NAMES.get(method, method)} | "
                         + " | ".join(_cell(per[key]["run_mean"]) if key in per else "–" for _, key in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def dilution_table(field: str, points: list, by_point: dict, seeds, budget: int, threshold: float) -> dict:
    """The sweep's summary: per point and method, the fine-detail accuracy at the last step and the steps to
    `threshold` (unreached seeds count as `budget`, a lower bound), and VA-OPD minus OPD paired by seed."""
    rows = {}
    for point in points:
        runs, mech = by_point[point]["runs"], by_point[point]["mechanism"]
        row = {}
        for method, per_seed in runs.items():
            final = {s: max(steps.items())[1]["val/accuracy_fine"] for s, steps in per_seed.items()}
            reach = {s: first_step_reaching(steps, threshold) for s, steps in per_seed.items()}
            row[method] = {"final_fine": mean_interval(final.values()), "final_per_seed": final,
                           "steps_to_threshold": mean_interval([budget if v is None else v for v in reach.values()]),
                           "reached": sum(v is not None for v in reach.values()), "per_seed_steps": reach,
                           "mechanism": {key: m["run_mean"] for key, m in mech.get(method, {}).items()}}
        if "opd" in row and "va_opd" in row:
            common = sorted(set(row["opd"]["final_per_seed"]) & set(row["va_opd"]["final_per_seed"]))
            row["va_opd_minus_opd"] = mean_interval(
                [row["va_opd"]["final_per_seed"][s] - row["opd"]["final_per_seed"][s] for s in common])
        rows[point] = row
    return {"field": field, "points": points, "seeds": list(seeds), "budget": budget, "threshold": threshold,
            "rows": rows}


def dilution_markdown(d: dict) -> str:
    """dilution.md: one row per swept value."""
    methods = [m for m in METHOD_NAMES if any(m in row for row in d["rows"].values())]
    keys = [(name, key) for name, key in MECHANISM[:1]
            if any(key in row[m]["mechanism"] for row in d["rows"].values() for m in methods if m in row)]
    head = ["fine at step %d: %s" % (d["budget"], METHOD_NAMES[m]) for m in methods]
    head += [f"steps to {d['threshold']:.2f}: {METHOD_NAMES[m]}" for m in methods]
    head += [f"{name}: {METHOD_NAMES[m]}" for name, _ in keys for m in methods]
    lines = [f"**{d['field']}** sweep (mean ± 95 % interval over seeds {', '.join(map(str, d['seeds']))}; steps to "
             f"the threshold count a seed that never reached it as {d['budget']}, with the seeds that reached it)",
             "", "| value | " + " | ".join(head) + " | VA-OPD − OPD (fine, paired) |",
             "|---|" + "---|" * (len(head) + 1)]
    for point in d["points"]:
        row = d["rows"][point]
        cells = [_cell(row[m]["final_fine"]) if m in row else "–" for m in methods]
        cells += [f"{row[m]['steps_to_threshold'][0]:.1f} ± {row[m]['steps_to_threshold'][1]:.1f} "
                  f"({row[m]['reached']}/{len(row[m]['per_seed_steps'])})" if m in row else "–" for m in methods]
        cells += [_cell(row[m]["mechanism"].get(key)) if m in row else "–" for _, key in keys for m in methods]
        lines.append(f"| {point} | " + " | ".join(cells) + f" | {_cell(row.get('va_opd_minus_opd'))} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots
def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, height), dpi=100)
    return figure, [figure.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _band(axes, xs, stats, method):
    means = [m for m, _ in stats]
    colour = METHOD_COLOURS.get(method)
    axes.plot(xs, means, marker="o", markersize=3, label=METHOD_NAMES.get(method, method), color=colour)
    axes.fill_between(xs, [m - h for m, h in stats], [m + h for m, h in stats], alpha=0.15, color=colour)


def plot(runs: dict, path: str) -> str:
    """curves.png: fine-detail accuracy per method (mean over seeds, 95 % band) against the step."""
    from vaopd_jax.notebook.diagnostics import _render_figure

    figure, (axes,) = _figure()
    for method, seeds in runs.items():
        steps = sorted(set.intersection(*(set(s) for s in seeds.values())))
        _band(axes, steps, [mean_interval([seeds[s][step]["val/accuracy_fine"] for s in seeds]) for step in steps],
              method)
    axes.axhline(1 / 3, linestyle=":", color="grey", label="chance")
    axes.set_xlabel("distillation step")
    axes.set_ylabel("fine-detail accuracy")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return _render_figure(figure, path)


def plot_mechanism(mechanism: dict, path: str) -> str | None:
    """mechanism.png: one panel per mechanism series present, one line per method (mean over seeds, 95 % band);
    None (no file) when the runs logged none of them."""
    from vaopd_jax.notebook.diagnostics import _render_figure

    keys = [(name, key) for name, key in MECHANISM if any(key in per for per in mechanism.values())]
    if not keys:
        return None
    figure, panels = _figure(len(keys), width=4.0, height=3.4)
    for axes, (name, key) in zip(panels, keys):
        for method, per in mechanism.items():
            if key in per:
                _band(axes, per[key]["steps"], per[key]["mean"], method)
        axes.set_title(name, fontsize=9)
        if "share" in name:
            axes.set_ylim(0, 1.02)
        axes.set_xlabel("distillation step")
        axes.grid(alpha=0.3)
    max(panels, key=lambda axes: len(axes.get_lines())).legend(fontsize=8)  # the panel with every method
    figure.tight_layout()
    return _render_figure(figure, path)


def plot_dilution(d: dict, path: str) -> str:
    """dilution.png: fine-detail accuracy at the last step and steps to the threshold against the swept value."""
    from vaopd_jax.notebook.diagnostics import _render_figure

    figure, (left, right) = _figure(2, width=5.0)
    for method in METHOD_NAMES:
        points = [p for p in d["points"] if method in d["rows"][p]]
        if points:
            _band(left, points, [d["rows"][p][method]["final_fine"] for p in points], method)
            _band(right, points, [d["rows"][p][method]["steps_to_threshold"] for p in points], method)
    left.axhline(1 / 3, linestyle=":", color="grey", label="chance")
    left.set_ylim(0, 1)
    left.set_ylabel(f"fine-detail accuracy at step {d['budget']}")
    right.axhline(d["budget"], linestyle=":", color="grey", label="budget (not reached)")
    right.set_ylabel(f"steps to fine-detail accuracy {d['threshold']:.2f}")
    for axes in (left, right):
        axes.set_xlabel(d["field"].split(".")[-1].replace("_", " "))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    return _render_figure(figure, path)


# ----------------------------------------------------------------------------- runs
@dataclasses.dataclass(frozen=True)
class Run:
    """One trainer run of the grid: its method, seed, sweep point (None without a sweep) and trainer fields
    (dotted name -> value; the run directory is passed apart)."""

    method: str
    seed: int
    point: Any
    overrides: dict

    @property
    def label(self) -> str:
        return f"{self.method} seed {self.seed}" + ("" if self.point is None else f" at {self.point}")


def load_train_config(config_file: str, method: str | None = None, overrides: dict | None = None):
    """The trainer config a run gets: `config_file`'s get_config('method=...') with `overrides` applied."""
    spec = importlib.util.spec_from_file_location("_study_train_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None if method is None else f"method={method}")
    config.update_from_flattened_dict(dict(overrides or {}))
    return config


def fingerprint(value) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def warmup_settings(train_config, role: str) -> dict:
    """What a warm-up depends on: its role's sft node (output_dir aside), its tiny spec, the task's texts
    (`synthetic.task_signature`) and `WARMUP_FIELDS`."""
    def get(path):
        node = train_config
        for part in path.split("."):
            node = node[part]
        return node.to_dict() if hasattr(node, "to_dict") else node

    sft = dict(get(f"{role}.sft"))
    sft.pop("output_dir", None)
    tiny = get(f"{role}.tiny")
    from vaopd_jax.data import synthetic

    return {"role": role, "sft": sft, "tiny": tiny, "task": synthetic.task_signature(),
            **{path: get(path) for path in WARMUP_FIELDS}}


def run_one(config_file: str, run: Run, run_dir: str, *, echo: bool = False) -> None:
    """Executes one run to completion (raises when it fails): the trainer in this process, on the run's config
    (`load_train_config`), its output written to <run_dir>/train.log (and echoed with `echo`)."""
    import contextlib

    from vaopd_jax import train

    config = validated_config(config_file, run, run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        out = _Tee(log, sys.stdout) if echo else log
        with contextlib.redirect_stdout(out):
            train.run(config)


class _Tee:
    """A stdout that writes to several streams (the run's train.log, and the console with echo)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def validated_config(config_file: str, run: Run, run_dir: str):
    """The run's typed trainer config (`config.load`), validated against this process's devices."""
    import jax

    from vaopd_jax import config as config_lib

    return config_lib.load(load_train_config(config_file, run.method, {**run.overrides, "workdir": run_dir}),
                           device_count=jax.device_count(), process_count=jax.process_count())


def _as_list(value) -> list[str]:
    """A config tuple as a list; '0,1,2' on the command line arrives as one comma-separated string."""
    items = [value] if isinstance(value, (str, int, float)) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def _point_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def plan(config, *, quick: bool = False, repo: str | None = None) -> tuple[str, list[Run]]:
    """(the trainer config file, every Run of the study in execution order: sweep point, seed, method), each
    with its warm-up directories assigned (`<workdir>/warmups/<role>-<fingerprint>`)."""
    from vaopd_jax.config import METHODS

    s = config.study
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seeds, methods = [int(x) for x in _as_list(s.seeds)], _as_list(s.methods)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"config.study.seeds = {s.seeds!r}: give one or more distinct seeds")
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"config.study.methods = {s.methods!r}: each must be one of {METHODS}")
    field = s.get("sweep_field", "")
    points = [_point_value(v) for v in _as_list(s.get("sweep_values", ()))] if field else [None]
    if field and not points:
        raise ValueError(f"config.study.sweep_values is empty; give the values of {field!r} to sweep")
    config_file = os.path.join(repo, config.train_config)
    base = dict(s.overrides.to_dict())
    base.update({"train.num_steps": s.num_steps, "eval.every": s.eval_every,
                 "eval.num_problems": s.eval_num_problems, "train.checkpoint_every": s.num_steps})
    if quick:
        base.update(QUICK)
    runs = []
    for point in points:
        for seed in seeds:
            for method in methods:
                overrides = {**base, "seed": seed, **({} if point is None else {field: point})}
                resolved = load_train_config(config_file, method, overrides)
                teacher = None
                for role in ("teacher", "student"):
                    settings = warmup_settings(resolved, role)
                    if s.get("shared_warmups", False):
                        settings.pop("seed")
                    if role == "student" and settings["sft"].get("vision_init") == "teacher":
                        settings["teacher"] = teacher  # its vision tower starts as that teacher's
                    teacher = fingerprint(settings)
                    overrides[f"{role}.sft.output_dir"] = os.path.join(s.workdir, "warmups", f"{role}-{teacher}")
                runs.append(Run(method=method, seed=seed, point=point, overrides=overrides))
    return config_file, runs


def run_dir_of(workdir: str, run: Run, field: str = "") -> str:
    point = "" if run.point is None else f"{field.split('.')[-1]}_{run.point}"
    return os.path.join(workdir, point, run.method, f"seed_{run.seed}")


def execute(config_file: str, runs: list[Run], workdir: str, *, field: str = "", echo: bool = False,
            runner=run_one) -> dict[str, float]:
    """Runs every run not finished yet (a finished run with the same settings is reused; with other settings,
    an error), printing a progress line with the ETA before each. Returns {run label: seconds}."""
    timings, executed = {}, []
    start = time.monotonic()
    dirs = [run_dir_of(workdir, run, field) for run in runs]
    finished = [os.path.exists(os.path.join(d, "export", "final", "config.json")) for d in dirs]
    for i, (run, run_dir) in enumerate(zip(runs, dirs)):
        settings = json.loads(json.dumps({"config_file": os.path.basename(config_file), "method": run.method,
                                          "overrides": run.overrides}, default=str))
        record = os.path.join(run_dir, RUN_FILE)
        if os.path.exists(record):
            with open(record) as f:
                if json.load(f) != settings:
                    raise ValueError(f"{run_dir} holds a run of other settings ({record}); give config.study.workdir "
                                     "a new directory or delete that run")
        if finished[i]:
            timings[run.label] = 0.0
            continue
        left = sum(not done for done in finished[i:])
        per_run = sum(executed) / len(executed) if executed else None
        eta = "after the first run" if per_run is None else f"{per_run * left / 60:.0f} min ({per_run / 60:.1f} min/run)"
        print(f"study: run {i + 1}/{len(runs)}: {run.label} -> {run_dir} | {len(executed)} run(s) done in "
              f"{(time.monotonic() - start) / 60:.1f} min, {sum(finished)} reused | ETA {eta}", flush=True)
        os.makedirs(run_dir, exist_ok=True)
        with open(record, "w") as f:
            json.dump(settings, f, indent=1)
        began = time.monotonic()
        runner(config_file, run, run_dir, echo=echo)
        timings[run.label] = time.monotonic() - began
        executed.append(timings[run.label])
        print(f"study: {run.label} finished in {timings[run.label]:.0f} s", flush=True)
    return timings


# ----------------------------------------------------------------------------- results
def read_validation(run_dir: str) -> dict[int, dict[str, float]]:
    """step -> the validation record of a run's metrics.jsonl (the last one logged at each step)."""
    from vaopd_jax.runtime import metrics as metrics_lib

    return {int(r["step"]): r for r in metrics_lib.read_jsonl(os.path.join(run_dir, "metrics.jsonl"), kind="val")}


def read_mechanism(run_dir: str) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of the `MECHANISM` series a run's metrics.jsonl holds (train and val records)."""
    from vaopd_jax.runtime import metrics as metrics_lib

    out: dict[str, dict[int, float]] = {}
    for record in metrics_lib.read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        for _, key in MECHANISM:
            if key in record and record.get("kind") == key.split("/")[0]:
                out.setdefault(key, {})[int(record["step"])] = float(record[key])
    return out


def _json_steps(per_seed: dict) -> dict:
    return {str(seed): {str(step): v for step, v in steps.items()} for seed, steps in per_seed.items()}


def run_study(config, *, quick: bool = False, repo: str | None = None, echo: bool = False, runner=run_one) -> dict:
    """Runs (or reuses) every run of the study and writes results.json, table.md, curves.png, mechanism.png
    and, with a sweep, dilution.md and dilution.png. Returns the results as results.json holds them."""
    s = config.study
    workdir = s.workdir
    os.makedirs(workdir, exist_ok=True)
    load_before = os.getloadavg()
    began = time.monotonic()
    config_file, runs = plan(config, quick=quick, repo=repo)
    field = s.get("sweep_field", "")
    if runner is run_one:  # every run's config, before the first run: one error listing every problem
        problems = []
        for run in runs:
            try:
                validated_config(config_file, run, run_dir_of(workdir, run, field))
            except ValueError as err:
                problems.append(f"{run.label}: {err}")
        if problems:
            raise ValueError("invalid study:\n" + "\n".join(problems))
    timings = execute(config_file, runs, workdir, field=field, echo=echo, runner=runner)
    threshold = float(s.get("threshold", 0.7))
    points = list(dict.fromkeys(run.point for run in runs))
    seeds = list(dict.fromkeys(run.seed for run in runs))
    by_point, texts = {}, []
    for point in points:
        val, mech = {}, {}
        for run in (r for r in runs if r.point == point):
            run_dir = run_dir_of(workdir, run, field)
            val.setdefault(run.method, {})[run.seed] = read_validation(run_dir)
            mech.setdefault(run.method, {})[run.seed] = read_mechanism(run_dir)
        summary, mechanism = summarize(val, threshold), mechanism_summary(mech)
        by_point[point] = {"runs": val, "mechanism": mechanism, "mechanism_runs": mech, "summary": summary}
        title = "" if point is None else f"## {field} = {point}\n\n"
        texts.append(title + markdown(summary, seeds, mechanism))
        suffix = "" if point is None else f"_{field.split('.')[-1]}_{point}"
        plot(val, os.path.join(workdir, f"curves{suffix}.png"))
        plot_mechanism(mechanism, os.path.join(workdir, f"mechanism{suffix}.png"))
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write("\n".join(texts))
    results = {"seeds": seeds, "methods": list(dict.fromkeys(run.method for run in runs)), "quick": quick,
               "sweep_field": field or None, "sweep_values": points if field else [],
               "overrides": {k: v for k, v in runs[0].overrides.items() if k != "seed" and k != field
                             and not k.endswith(".sft.output_dir")},
               "seconds_per_run": timings, "wall_s": time.monotonic() - began,
               "load_average": {"before": load_before, "after": os.getloadavg()}, "threshold": threshold,
               "points": {}}
    for point, p in by_point.items():
        summary = p["summary"]
        entry = {
            "runs": {m: _json_steps(by_seed) for m, by_seed in p["runs"].items()},
            "mechanism": {m: {str(seed): {key: {str(st): v for st, v in steps.items()} for key, steps in per.items()}
                              for seed, per in by_seed.items()} for m, by_seed in p["mechanism_runs"].items()},
            "table": {m: {str(st): v for st, v in per.items()} for m, per in summary["table"].items()},
            "mechanism_summary": p["mechanism"],
            "target": summary["target"], "coarse_lowest": summary["coarse_lowest"],
            **{name: {m: {**r, "per_seed": {str(k): v for k, v in r["per_seed"].items()}}
                      for m, r in summary.get(name, {}).items()}
               for name in ("steps_to_target", "steps_to_threshold")}}
        if point is None:
            results.update(entry)
        else:
            results["points"][str(point)] = entry
    if field:
        d = dilution_table(field, points, by_point, seeds, int(QUICK["train.num_steps"] if quick else s.num_steps),
                           threshold)
        with open(os.path.join(workdir, "dilution.md"), "w") as f:
            f.write(dilution_markdown(d))
        plot_dilution(d, os.path.join(workdir, "dilution.png"))
        results["dilution"] = {**d, "rows": {str(p): row for p, row in d["rows"].items()}}
    results = json.loads(json.dumps(results, default=str))  # what results.json holds (string keys)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(texts), flush=True)
    if field:
        print(dilution_markdown(d), flush=True)
    print(f"study: {workdir}/table.md, curves*.png, mechanism*.png, results.json"
          + (", dilution.md, dilution.png" if field else "") + f" ({(time.monotonic() - began) / 60:.1f} min)",
          flush=True)
    return results


def main(argv=None) -> None:
    """`python -m vaopd_jax.study --config FILE [--config.study.<field>=VALUE ...] [--quick]`."""
    import logging

    from absl import logging as absl_logging

    from vaopd_jax import config as config_lib

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        config, switches, problems = config_lib.command_line(sys.argv[1:] if argv is None else argv, usage=__doc__,
                                                             switches=("quick",))
        if problems:
            raise config_lib.ConfigError("invalid config:\n  " + "\n  ".join(problems))
        run_study(config, quick=switches["quick"])
    except ValueError as err:  # ConfigError included: every problem, before the first run
        sys.exit(str(err))
    finally:
        from vaopd_jax.eval import grading

        grading.shutdown()


if __name__ == "__main__":
    main()
