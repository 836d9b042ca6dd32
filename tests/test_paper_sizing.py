"""configs/paper.py picks the micro-batch per hardware from its target-compiled SIZING table."""

import os

import pytest

from vaopd_jax import config as config_lib
from vaopd_jax.parallel import targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
paper = config_lib.load_sibling(os.path.join(REPO, "configs", "base.py"), "paper")
load = lambda arg: paper.get_config(arg)  # noqa: E731


def test_micro_batch_follows_the_hardware():
    # h100x8: the GPU compiler's peak for 8B -> 2B at 4,096 tokens, all 64 rollouts at once, is 23.1 GB of 80.
    h100 = load("teacher=8b,hardware=h100x8,response=4096")
    assert h100.train.micro_batch_rollouts == 0 and h100.rollout.max_new_tokens == 4096
    assert paper.sizing("h100x8", "8b", 4096) == ("h100x8", 0, 23.08)
    # a100x8 (the default): the same choice from its own compile (22.6 GB); the CPU backend had said 32 rollouts.
    a100 = load("teacher=8b,response=2048")
    assert a100.train.micro_batch_rollouts == 0 and a100.rollout.max_new_tokens == 2048
    assert paper.sizing("a100x8", "8b", 4096) == ("a100x8", 0, 22.6)
    assert paper.CPU_MICRO_BATCH_ROLLOUTS["8b"] == 32
    # An entry not compiled for its target falls back to the CPU-backend sizing (an upper bound).
    missing = next((h, t, r) for h in paper.HARDWARE for t in paper.TEACHERS for r in paper.RESPONSES
                   if (h, t, r) not in paper.SIZING)
    cfg = load(f"teacher={missing[1]},hardware={missing[0]},response={missing[2]}")
    assert cfg.train.micro_batch_rollouts == paper.CPU_MICRO_BATCH_ROLLOUTS[missing[1]]
    assert paper.sizing(*missing)[2] is None
    for (hardware, _, _), (target, micro, peak) in paper.SIZING.items():
        t = targets.get(target)
        assert target.split("x")[0].split("-")[0] == hardware.split("x")[0].split("-")[0]  # same card family
        assert micro in (64, 32, 16, 8) and 0 < peak <= t.budget_bytes / 1e9


def test_unknown_hardware_or_response_is_refused():
    with pytest.raises(config_lib.ConfigError, match="hardware='h100'; must be one of"):
        load("hardware=h100")
    with pytest.raises(config_lib.ConfigError, match="response=1024; must be one of"):
        load("response=1024")
