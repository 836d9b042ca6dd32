"""Reference implementations the tests compare the product against (written from docs/method.md's definitions, apart
from the code they check)."""

import jax.numpy as jnp


def reference_opd_loss(kl, mask):
    """Standard OPD (docs/method.md): mean over non-empty rollouts of the per-rollout token-mean KL (0 if none)."""
    maskf = jnp.asarray(mask, jnp.float32)
    counts = maskf.sum(-1)
    per_rollout = (jnp.asarray(kl, jnp.float32) * maskf).sum(-1) / jnp.maximum(counts, 1.0)
    nonempty = counts > 0
    return jnp.where(nonempty, per_rollout, 0.0).sum() / jnp.maximum(nonempty.sum(), 1)
