"""Start-up benchmark: a trainer run with a cold and then a warm persistent compilation cache.

    python -m vaopd_jax.bench.startup                      # tiny random student + teacher, 2 steps, CPU
    python -m vaopd_jax.bench.startup --config configs/demo.py --config.train.num_steps=2   # any trainer args

Runs `python -m vaopd_jax.train` twice, each in a fresh workdir, both with one fresh cache directory
(`train.compilation_cache_dir`): the first start compiles every XLA program and writes it to the
cache, the second is the same config started again (a restart after a preemption, a rerun) and
loads them. Prints for each run the trainer's own figures: start-up (from the trainer's import to
the loop: JAX, models, data, restore), the first step (rollout + update, where the step's programs
compile), the whole run's wall time, the programs compiled and those loaded from the cache; then
the warm/cold ratios and the machine's load (`uptime`). A config whose teacher or student is the
demo's SFT model gets one preparation run first (cache off) so both measured runs reuse the SFT
models and time the same work.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

TINY = dict(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64, vision_depth=1, vision_hidden=32)
FIGURES = {
    "start-up s": r"start-up ([\d.]+) s",
    "first step s": r"first step ([\d.]+) s",
    "compiled": r"compilation over the run: (\d+) programs compiled",
    "from cache": r"compilation over the run: \d+ programs compiled, (\d+) loaded",
}


def _tiny_args(scratch: str) -> list[str]:
    """A random tiny teacher in Hugging Face format and the trainer arguments of the tests' tiny run."""
    import jax.numpy as jnp
    from flax import nnx

    from vaopd_jax import config as config_lib
    from vaopd_jax.models import qwen3_vl

    teacher_dir = os.path.join(scratch, "teacher")
    teacher = qwen3_vl.Qwen3VL(config_lib.model_config_from_spec(config_lib.tiny_spec(**TINY)),
                               param_dtype=jnp.float32, rngs=nnx.Rngs(5))
    qwen3_vl.save_hf_checkpoint(teacher, teacher_dir)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return ["--config", os.path.join(repo, "configs", "demo.py"), "--config.teacher.init=hf",
            "--config.data.task_vocabulary=False",  # a full-vocabulary HF teacher
            "--config.student.init=random", f"--config.teacher.hf_path={teacher_dir}",
            f"--config.student.tiny.text.hidden_size={TINY['hidden']}",
            f"--config.student.tiny.text.num_hidden_layers={TINY['layers']}",
            f"--config.student.tiny.text.intermediate_size={TINY['mlp']}", "--config.train.num_steps=2",
            "--config.data.prompts_per_step=2", "--config.rollout.num_rollouts=2",
            "--config.rollout.max_new_tokens=4", "--config.eval.every=0", "--config.data.synthetic_train_size=64",
            "--config.model.attention_impl=chunked", "--config.model.attention_chunk_size=16"]


def _uses_sft(args: list[str]) -> bool:
    """Whether the config file in ``args`` (--config FILE[:ARG]) has a demo SFT teacher or student."""
    spec = args[args.index("--config") + 1] if "--config" in args else ""
    path, _, arg = spec.partition(":")
    if not path:
        return False
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    inits = []
    for role in ("teacher", "student"):
        overrides = [a.split("=", 1)[1] for a in args if a.startswith(f"--config.{role}.init=")]
        inits.append(overrides[-1] if overrides else config[role].get("init"))
    return "sft" in inits


def run_trainer(args: list[str], workdir: str, cache: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vaopd_jax.train", *args, f"--config.workdir={workdir}",
                           f"--config.train.compilation_cache_dir={cache}"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = {"wall s": wall}
    for name, pattern in FIGURES.items():
        match = re.search(pattern, proc.stdout)
        out[name] = float(match.group(1)) if match else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", default="", help="directory for workdirs and the cache (default: a temp dir)")
    known, trainer_args = parser.parse_known_args()
    scratch = known.scratch or tempfile.mkdtemp(prefix="vaopd_startup_")
    os.makedirs(scratch, exist_ok=True)
    args = trainer_args or _tiny_args(scratch)
    if _uses_sft(args):
        args += [f"--config.teacher.sft.output_dir={os.path.join(scratch, 'teacher_sft')}",
                 f"--config.student.sft.output_dir={os.path.join(scratch, 'student_sft')}"]
        print("preparation run (demo SFT models, cache off) ...", flush=True)
        run_trainer(args, os.path.join(scratch, "prepare"), "none")
    cache = os.path.join(scratch, "jax_cache")
    rows = {}
    for name in ("cold", "warm"):
        rows[name] = run_trainer(args, os.path.join(scratch, name), cache)
    print(f"\nuptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"trainer args: {' '.join(args)}\ncache: {cache}\n")
    names = ["wall s", *FIGURES]
    print(f"{'':22s}" + "".join(f"{n:>14s}" for n in names))
    for label, row in (("first start (cold)", rows["cold"]), ("second start (warm)", rows["warm"])):
        print(f"{label:22s}" + "".join(f"{row[n]:>14.1f}" if n.endswith(" s") else f"{row[n]:>14.0f}"
                                       for n in names))
    ratios = {n: rows["warm"][n] / rows["cold"][n] for n in ("wall s", "start-up s", "first step s") if rows["cold"][n]}
    print(f"{'warm / cold':22s}" + "".join(f"{ratios[n]:>14.2f}" if n in ratios else f"{'':>14s}" for n in names))


if __name__ == "__main__":
    main()
