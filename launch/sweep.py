#!/usr/bin/env python
r"""Expands a sweep config (``get_sweep(arg)``) into training commands and prints, runs or submits them.

  python launch/sweep.py configs/sweep_ablation.py --workdir_root=/runs/sweep \
      --ckpt_root=/ckpt --data_root=/data/geometry3k/data [--mode=print|local|slurm] \
      [--sweep_arg='teachers=8b'] [-- --config.train.num_steps=100 ...]

print: one command per run (default; pipe them to your own scheduler);
local: runs them one after another on this host, stopping at the first failure;
slurm: ``sbatch launch/slurm.sbatch <train args>`` per run (job name = run name).
Each run's workdir is ``<workdir_root>/<run name>``; runs whose workdir already
holds checkpoints resume (the trainer does that by itself).
"""

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vaopd_jax import config as config_lib  # noqa: E402


def build_commands(sweep_file, sweep_arg, workdir_root, ckpt_root, data_root, extra):
    """Returns [(run name, train argv list)] for every run of the sweep."""
    module = config_lib.load_sibling(sweep_file, os.path.splitext(os.path.basename(sweep_file))[0])
    commands = []
    for run in module.get_sweep(sweep_arg or None):
        argv = ["--config", run["config"], f"--config.workdir={os.path.join(workdir_root, run['name'])}"]
        for field, value in run["overrides"].items():
            argv.append(f"--config.{field}={str(value).format(ckpt_root=ckpt_root, data_root=data_root)}")
        commands.append((run["name"], argv + list(extra)))
    return commands


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file")
    parser.add_argument("--sweep_arg", default="")
    parser.add_argument("--workdir_root", required=True)
    parser.add_argument("--ckpt_root", default="/ckpt")
    parser.add_argument("--data_root", default="/data/geometry3k/data")
    parser.add_argument("--mode", choices=("print", "local", "slurm"), default="print")
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    commands = build_commands(args.sweep_file, args.sweep_arg, args.workdir_root, args.ckpt_root, args.data_root,
                              extra)
    for name, train_args in commands:
        if args.mode == "print":
            print(shlex.join([sys.executable, "-m", "vaopd_jax.train", *train_args]))
        elif args.mode == "local":
            print(f"[sweep] {name}", flush=True)
            subprocess.run([sys.executable, "-m", "vaopd_jax.train", *train_args], cwd=REPO, check=True)
        else:
            subprocess.run(["sbatch", f"--job-name={name}", os.path.join(REPO, "launch", "slurm.sbatch"),
                            *train_args], cwd=REPO, check=True)


if __name__ == "__main__":
    main()
