"""The trainer with a fault injected: from the FROM_STEP-th train batch on, its pixel values are NaN.

    python tests/nonfinite_train.py FROM_STEP <python -m vaopd_jax.train arguments>

Run by test_train.py to exercise the non-finite guard (skipped updates, the stop after
train.max_nonfinite_steps) without a test hook in the product's config.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from vaopd_jax import train  # noqa: E402
from vaopd_jax.distill import batch as batch_lib  # noqa: E402


def main():
    from_step = int(sys.argv.pop(1))
    build = batch_lib.build_train_batch
    calls = [0]

    def poisoned(*args, **kwargs):  # the train loop builds one train batch per step (validation is off)
        calls[0] += 1
        batch = build(*args, **kwargs)
        if calls[0] >= from_step:
            batch = batch._replace(pixel_values=np.full_like(batch.pixel_values, np.nan))
        return batch

    batch_lib.build_train_batch = poisoned
    train.main(sys.argv[1:])


if __name__ == "__main__":
    main()
