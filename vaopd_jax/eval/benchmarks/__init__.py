"""The paper's eight evaluation benchmarks: readers, prompt builders and scorers.

``BENCHMARKS`` maps a name (also the default directory name under
``config.benchmarks_dir``) to its :class:`~vaopd_jax.eval.benchmarks.base.Benchmark`, in
the column order of the paper's table: math first (WeMath, MathVista, MathVerse),
then visual (HallusionBench, AI2D, MMMU, MMStar, OCRBench).
"""

from vaopd_jax.eval.benchmarks.ai2d import AI2D
from vaopd_jax.eval.benchmarks.base import MMSTAR_AVERAGES, SCORING_MODES, Benchmark, Scoring
from vaopd_jax.eval.benchmarks.common import BadRecord, ImageRef, MissingBenchmark, ReadResult, Record
from vaopd_jax.eval.benchmarks.hallusionbench import HallusionBench
from vaopd_jax.eval.benchmarks.mathverse import MathVerse
from vaopd_jax.eval.benchmarks.mathvista import MathVista
from vaopd_jax.eval.benchmarks.mmmu import MMMU
from vaopd_jax.eval.benchmarks.mmstar import MMStar
from vaopd_jax.eval.benchmarks.ocrbench import OCRBench
from vaopd_jax.eval.benchmarks.wemath import WeMath

BENCHMARKS: dict = {
    b.name: b
    for b in (WeMath(), MathVista(), MathVerse(), HallusionBench(), AI2D(), MMMU(), MMStar(), OCRBench())
}
MATH_BENCHMARKS = tuple(n for n, b in BENCHMARKS.items() if b.group == "math")
VISUAL_BENCHMARKS = tuple(n for n, b in BENCHMARKS.items() if b.group == "visual")


def get(name: str) -> Benchmark:
    """The benchmark called ``name``; raises ValueError listing the known names."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {list(BENCHMARKS)}")
    return BENCHMARKS[name]


__all__ = [
    "BENCHMARKS", "MATH_BENCHMARKS", "MMSTAR_AVERAGES", "SCORING_MODES", "VISUAL_BENCHMARKS", "Benchmark",
    "BadRecord", "ImageRef", "MissingBenchmark", "ReadResult", "Record", "Scoring", "get",
]
