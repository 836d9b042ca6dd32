"""The demo's wall time and peak resident memory, per phase, fresh and with the SFT models cached.

    python -m vaopd_jax.bench.demo                        # a fresh run, then one reusing its SFT models
    python -m vaopd_jax.bench.demo --runs fresh           # only the fresh run
    python -m vaopd_jax.bench.demo --root /tmp/b -- --config.train.num_steps=20   # trainer args after --
    python -m vaopd_jax.bench.demo --report /tmp/b/fresh/phases.json             # a finished run's table

Runs the README's demo command (`python -m vaopd_jax.train --config configs/demo.py`) as a
subprocess, each run in its own workdir under ``--root`` (default: a new temporary directory):

- ``fresh``: what a newcomer's first run does: both SFT phases, an empty compilation cache;
- ``cached``: the command run again with the SFT models of the fresh run (``<role>.sft.output_dir``)
  and its compilation cache, as a user's second run.

For each run it prints the trainer's phase table (`vaopd_jax.runtime.phases`: start-up, teacher SFT,
student warm-up, set-up, validation, distillation, checkpoint, export; wall time and peak RSS of
each, the peak reset at every phase start), the whole process's peak RSS as the kernel reports it
to the parent (``wait4``, the figure `/usr/bin/time -v` prints) and its wall time, and the
machine's load (``os.getloadavg``) before and after: figures from a busy machine are not the
figures of a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from vaopd_jax.runtime import phases

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = ("fresh", "cached")


def demo_command(workdir: str, cache_dir: str, extra: list[str], sft_from: str | None = None) -> list[str]:
    """The README's demo command with its own workdir and compilation cache (and SFT models, if given)."""
    args = [sys.executable, "-m", "vaopd_jax.train", "--config", os.path.join(REPO, "configs", "demo.py"),
            f"--config.workdir={workdir}", f"--config.train.compilation_cache_dir={cache_dir}"]
    if sft_from is not None:
        args += [f"--config.teacher.sft.output_dir={os.path.join(sft_from, 'teacher_sft')}",
                 f"--config.student.sft.output_dir={os.path.join(sft_from, 'student_sft')}"]
    return args + list(extra)


def run_measured(args: list[str], log_path: str) -> dict:
    """Runs `args`, streaming its output to stdout and `log_path`; its exit code, wall time and peak RSS."""
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        proc.stdout.close()
        # wait4: the child's rusage, whose ru_maxrss is the peak RSS `/usr/bin/time -v` reports (kB on Linux).
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_s": time.monotonic() - start,
            "peak_rss": usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)}


def report(name: str, phase_report: dict | None, measured: dict | None, load: tuple) -> str:
    """One run's figures: the trainer's phase table, then the process as the parent measured it."""
    lines = [f"=== {name}"]
    if phase_report is not None:
        lines.append(phases.format_table(phase_report))
    if measured is not None:
        lines.append(f"process (wait4, as /usr/bin/time -v): wall {measured['wall_s']:.1f} s "
                     f"({measured['wall_s'] / 60:.1f} min), peak RSS {measured['peak_rss'] / phases.GB:.2f} GB, "
                     f"exit code {measured['returncode']}")
    lines.append("load average (1, 5, 15 min) before: " + ", ".join(f"{x:.2f}" for x in load[0])
                 + "; after: " + ", ".join(f"{x:.2f}" for x in load[1]) + f"; {os.cpu_count()} CPUs")
    return "\n".join(lines)


def read_phases(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if "phases" not in data:
        raise ValueError(f"{path}: not a phases.json of the trainer (no 'phases' key)")
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                        help="which runs: fresh (both SFT phases, empty compilation cache), cached (the fresh "
                             "run's SFT models and cache; needs fresh first, or an earlier one under --root)")
    parser.add_argument("--root", default="", help="directory of the runs' workdirs (default: a new temporary one)")
    parser.add_argument("--report", default="", help="only print the table of this phases.json")
    parser.add_argument("trainer_args", nargs="*", help="extra trainer flags, after --")
    args = parser.parse_args(argv)
    if args.report:
        print(phases.format_table(read_phases(args.report)))
        return 0
    root = os.path.abspath(args.root or tempfile.mkdtemp(prefix="vaopd_bench_demo_"))
    cache = os.path.join(root, "jax_cache")
    fresh_dir = os.path.join(root, "fresh")
    if "cached" in args.runs and "fresh" not in args.runs and not os.path.isdir(os.path.join(fresh_dir,
                                                                                            "teacher_sft")):
        parser.error(f"--runs cached needs the SFT models of a fresh run under {fresh_dir}: run fresh first")
    reports = []
    for name in RUNS:
        if name not in args.runs:
            continue
        workdir = os.path.join(root, name)
        if os.path.exists(workdir):
            raise SystemExit(f"{workdir} exists: a measured run needs a new workdir (pick another --root)")
        os.makedirs(workdir)
        command = demo_command(workdir, cache, args.trainer_args, sft_from=fresh_dir if name == "cached" else None)
        print(f"=== {name}: {' '.join(command)}", flush=True)
        load_before = os.getloadavg()
        measured = run_measured(command, os.path.join(workdir, "demo.log"))
        load_after = os.getloadavg()
        phases_path = os.path.join(workdir, "phases.json")
        phase_report = read_phases(phases_path) if os.path.exists(phases_path) else None
        reports.append(report(f"{name} run ({workdir})", phase_report, measured, (load_before, load_after)))
        if measured["returncode"] != 0:
            print("\n".join(reports), flush=True)
            print(f"the {name} run failed (exit code {measured['returncode']}); its log: "
                  f"{os.path.join(workdir, 'demo.log')}", file=sys.stderr)
            return 1
    print("\n" + "\n\n".join(reports), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
