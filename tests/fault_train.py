"""The trainer on a disk that fills up: once checkpoint step FULL_AFTER is complete, no file may grow past 1 MiB.

    python tests/fault_train.py FULL_AFTER <python -m vaopd_jax.train arguments>

Run by test_train_faults.py. The limit is the kernel's own (RLIMIT_FSIZE, with SIGXFSZ ignored), so every later
write that needs more room fails with EFBIG exactly as on a full disk, for root too and from any thread
(Orbax's tensorstore writers included), without a test hook in the product's code.
"""

import os
import resource
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vaopd_jax import train  # noqa: E402
from vaopd_jax.runtime import checkpoint as ckpt_lib  # noqa: E402

LIMIT = 1 << 20  # above the logs a step appends, far below a checkpoint's arrays


def main():
    full_after = int(sys.argv.pop(1))
    save = ckpt_lib.CheckpointManager.save

    def saving(self, step, *args, **kwargs):
        saved = save(self, step, *args, **kwargs)
        if saved and step == full_after:
            self.wait()  # checkpoint FULL_AFTER is complete, then the disk is full
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return saved

    ckpt_lib.CheckpointManager.save = saving
    train.main(sys.argv[1:])


if __name__ == "__main__":
    main()
