"""The VA-OPD objective (docs/method.md, Eq. 1-6) as pure, jittable jnp functions.

Layout used by every function here: arrays are (R, T) with R = prompts * num_rollouts
and the rollouts ("siblings") of one prompt on adjacent rows; T is the response
length axis. ``mask`` (R, T) is 1 on valid response tokens (up to and including the
first end token; a truncated response keeps all its tokens) and 0 on padding.

Empty rollouts (T^(k) = 0) are a documented project choice (docs/method.md leaves it
open): such a rollout gets weight 0 and its non-empty siblings are re-normalised
among themselves (the z-score and the softmax of Eq. 3-4 run over the non-empty
siblings only). A prompt whose rollouts are all empty contributes 0 and is left
out of the mean over prompts (Eq. 6); a batch with no valid token has loss 0.
``num_empty_rollouts`` counts them so that the trainer can log it.

All of VA, ranks, groups and weights are stop-gradient (docs/method.md, "Masks and
edge rules"); only the token KL carries gradient.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MASKED_LOGIT = -1e30  # logit given to padded vocabulary rows
# The methods (docs/method.md "Ablations"): the one list the config validator, the step and the sweeps use.
METHODS = ("va_opd", "opd", "reweight_only", "group_only")
REWEIGHTING_METHODS = ("va_opd", "reweight_only")  # rollout weights: a softmax over a prompt's rollouts (Eq. 3-4)
GROUPING_METHODS = ("va_opd", "group_only")  # high/low VA token groups (Eq. 5)


@dataclasses.dataclass(frozen=True)
class Range:
    """An allowed interval of a number, with why; `problem(value)` is None inside it, else the rule broken."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def __str__(self) -> str:
        # An unbounded side is open: only finite numbers are ever inside a Range.
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        return f"{left}{'-inf' if self.lo is None else self.lo}, {'inf' if self.hi is None else self.hi}{right}"

    def problem(self, value) -> str | None:
        """None when ``value`` is a finite real number inside the interval, else the rule it breaks.

        NaN compares False with everything, so it is refused explicitly (as are inf, booleans and non-numbers)
        rather than slipping through the two comparisons.
        """
        why = f" ({self.why})" if self.why else ""
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
            return f"must be a number in {self}{why}, not {type(value).__name__}"
        if not math.isfinite(value):
            return f"must be a finite number in {self}{why}"
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if low or high:
            return f"must be in {self}{why}"
        return None


# The VA hyper-parameters' allowed values (docs/method.md Eq. 3-5), checked here by ObjectiveConfig and by the
# training config's validator for config.va.* (the one place the ranges are written).
RANGES = {
    "high_fraction": Range(0, 1, lo_open=True, why="p_v, fraction of a rollout's tokens in the high-VA group, Eq. 5"),
    "high_weight": Range(0, 1, why="lambda, weight of the high-VA group mean, Eq. 5"),
    "tau": Range(0, None, lo_open=True, why="softmax temperature of the rollout weights, Eq. 4"),
    "eps": Range(0, None, lo_open=True,
                 why="z-score denominator offset, Eq. 3; 0 gives NaN weights when siblings have equal means"),
}


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Method switches and VA hyper-parameters (docs/method.md defaults; config.method and config.va.*).

    method: 'va_opd' (reweighting + grouping), 'reweight_only', 'group_only' or
      'opd' (neither; standard on-policy distillation, one teacher view).
    high_fraction: p_v in (0, 1], share of a rollout's tokens in the high-VA group (config va.p_v).
    high_weight: lambda in [0, 1], weight of the high-VA group mean, Eq. 5 (config va.lam).
    tau: > 0, temperature of the rollout softmax, Eq. 4 (config va.tau; `rollout_weights(temperature=)`).
    eps: epsilon >= 0 added to the sibling std, Eq. 3 (config va.eps).
    """

    method: str = "va_opd"
    high_fraction: float = 0.2
    high_weight: float = 0.5
    tau: float = 1.0
    eps: float = 1e-6

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"ObjectiveConfig.method={self.method!r}; allowed: {', '.join(METHODS)}")
        for name in RANGES:
            _check_hyper("ObjectiveConfig", name, getattr(self, name))

    @property
    def reweight(self) -> bool:
        """Rollout re-weighting by z-scored mean VA (Eq. 3-4) is on."""
        return self.method in REWEIGHTING_METHODS

    @property
    def group(self) -> bool:
        """High/low VA token grouping (Eq. 5) is on."""
        return self.method in GROUPING_METHODS

    @property
    def needs_visual_advantage(self) -> bool:
        """Whether the teacher's pixelated-view pass is needed at all (not for OPD)."""
        return self.reweight or self.group


class ObjectiveTerms(NamedTuple):
    """Everything the loss and the metrics need, all stop-gradient.

    coefficients: (R, T) c_t such that loss = sum(c * kl) / num_prompts.
    rollout_weights: (R,) w^(k); sum to 1 over the non-empty siblings of a prompt.
    high_mask: (R, T) bool, tokens in the high-VA group V^(k) (all False if grouping is off).
    num_prompts: () float32, prompts with at least one non-empty rollout.
    num_empty_rollouts: () int32, rollouts with no valid token.
    """

    coefficients: jax.Array
    rollout_weights: jax.Array
    high_mask: jax.Array
    num_prompts: jax.Array
    num_empty_rollouts: jax.Array


def _check_hyper(where: str, name: str, value, field: str | None = None) -> None:
    """ValueError naming ``where.name``, the value and RANGES[field]'s interval when a concrete value is outside
    it; traced values (inside jit) are the caller's to check (ObjectiveConfig / the training config do)."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == ():
        value = value.item()
    problem = RANGES[field or name].problem(value)
    if problem:
        raise ValueError(f"{where}.{name}={value!r}: {problem}")


def _check_rollouts(num_rows: int, num_rollouts: int) -> None:
    if isinstance(num_rollouts, (bool, np.bool_)) or not isinstance(num_rollouts, (int, np.integer)):
        raise ValueError(f"num_rollouts={num_rollouts!r} must be an int (rollouts per prompt)")
    if num_rollouts < 1 or num_rows % num_rollouts:
        raise ValueError(
            f"num_rollouts={num_rollouts} must be >= 1 and divide the number of rows R={num_rows} "
            "(R = prompts * num_rollouts, siblings adjacent)")


def _check_shapes(where: str, mask: jax.Array, *, rows_by_tokens: bool = True, **arrays: jax.Array) -> None:
    """Every array must have the mask's shape ((R, T) unless elementwise): broadcasting a (R, 1) mask against
    (R, T) values would silently compute something else."""
    if rows_by_tokens and np.ndim(mask) != 2:
        raise ValueError(f"{where}: mask must be (R, T), got shape {np.shape(mask)}")
    for name, array in arrays.items():
        if np.shape(array) != np.shape(mask):
            raise ValueError(f"{where}: {name} has shape {np.shape(array)}, expected the mask's "
                             f"{np.shape(mask)}")


def _valid(mask: jax.Array) -> jax.Array:
    """The one reading of a mask everywhere here: any non-zero entry is a valid token."""
    return mask.astype(bool)


def visual_advantage(logp_orig: jax.Array, logp_pix: jax.Array, mask: jax.Array) -> jax.Array:
    """Eq. 2: a_t = max(0, log p_T(y_t | v) - log p_T(y_t | v~)), 0 off the mask.

    Args:
      logp_orig: (R, T) teacher log-prob of the sampled token, original image.
      logp_pix: (R, T) the same with the pixelated image.
      mask: (R, T) 1 on valid response tokens.
    Returns:
      (R, T) float32 visual advantage, stop-gradient.
    """
    _check_shapes("visual_advantage", mask, rows_by_tokens=False, logp_orig=logp_orig, logp_pix=logp_pix)
    diff = logp_orig.astype(jnp.float32) - logp_pix.astype(jnp.float32)
    # + 0.0 maps a possible -0.0 to +0.0 so that the later ranking sees exact ties.
    va = jnp.where(_valid(mask), jnp.maximum(diff, 0.0), 0.0) + 0.0
    return jax.lax.stop_gradient(va)


def _token_counts(mask: jax.Array) -> jax.Array:
    return _valid(mask).astype(jnp.float32).sum(-1)


# Rollout-weight logits are clipped here: z is bounded by sqrt(num_rollouts) but z / tau overflows for a tiny tau, and
# softmax(inf - inf) is NaN; at +-1e30 the softmax is already its tau -> 0 limit (one-hot on the largest z).
_MAX_WEIGHT_LOGIT = 1e30


def rollout_weights(va: jax.Array, mask: jax.Array, num_rollouts: int, temperature: float = 1.0,
                    eps: float = 1e-6) -> jax.Array:
    """Eq. 3-4: softmax over the siblings of the z-scored rollout mean VA, at temperature tau (`temperature`,
    config va.tau; not the sampler's temperature).

    mu and sigma (population std, ddof = 0) are taken over the non-empty siblings;
    empty rollouts get weight 0. Equal means give sigma = 0, z = 0, uniform weights.

    Args:
      va: (R, T) visual advantage (0 off the mask).
      mask: (R, T) valid-token mask.
      num_rollouts: rollouts per prompt; R must be a multiple of it.
    Returns:
      (R,) float32 weights; each prompt's weights sum to 1 (0 if all its rollouts are empty).
    """
    _check_shapes("rollout_weights", mask, va=va)
    num_rows = va.shape[0]
    _check_rollouts(num_rows, num_rollouts)
    _check_hyper("rollout_weights", "temperature", temperature, "tau")
    _check_hyper("rollout_weights", "eps", eps)
    valid_token = _valid(mask)
    counts = _token_counts(mask)
    valid = (counts > 0).reshape(-1, num_rollouts)
    # where(), not va * mask: a NaN or inf at a masked-out position would make 0 * NaN = NaN of the whole group.
    va = jnp.where(valid_token, va.astype(jnp.float32), 0.0).reshape(-1, num_rollouts, va.shape[1])
    # Eq. 3 computed so that it holds for every finite input (the z-score is scale- and shift-free):
    # - each prompt's VA is multiplied by 2^-e (exact), e the exponent of its largest |a_t|, so that no sum or
    #   square below overflows;
    # - the means are taken relative to the largest sibling mean, so equal means give deviations of exactly 0
    #   (uniform weights for any num_rollouts and any lengths), and the sums over siblings run in sorted order, so the
    #   weights do not depend on the order of the siblings (Eq. 3-4 are permutation-equivariant);
    # - the deviations are scaled by 2^-d, d the exponent of the largest one, before squaring (no underflow),
    #   and eps by 2^-(e + d) alike: z = (a - mu) / (sigma + eps) unchanged.
    _, exponent = jnp.frexp(jnp.abs(va).max(axis=(1, 2)))
    va = jnp.ldexp(va, -exponent[:, None, None])
    num_valid = jnp.maximum(valid.sum(-1, keepdims=True), 1)
    # ā^(k) * 2^-e in [0, 1), as the rollout's largest a_t plus the mean offset from it: a rollout of equal a_t
    # has exactly that mean whatever its length (a plain sum / T rounds differently for each T).
    token_valid = valid_token.reshape(va.shape)
    row_max = jnp.where(valid, jnp.where(token_valid, va, -jnp.inf).max(-1), 0.0)
    mean_va = row_max + (jnp.where(token_valid, va - row_max[..., None], 0.0).sum(-1)
                         / jnp.maximum(counts.reshape(-1, num_rollouts), 1.0))
    offset = mean_va - jnp.where(valid, mean_va, -jnp.inf).max(-1, keepdims=True)
    offset = jnp.where(valid, offset, 0.0)
    deviation = jnp.where(valid, offset - jnp.sort(offset, axis=-1).sum(-1, keepdims=True) / num_valid, 0.0)
    _, dev_exponent = jnp.frexp(jnp.abs(deviation).max(-1, keepdims=True))
    deviation = jnp.ldexp(deviation, -dev_exponent)
    sigma = jnp.sqrt(jnp.sort(deviation ** 2, axis=-1).sum(-1, keepdims=True) / num_valid)
    eps_scaled = jnp.ldexp(jnp.asarray(eps, jnp.float32), -(exponent[:, None] + dev_exponent))
    z = jnp.where(sigma > 0, deviation / (sigma + eps_scaled), 0.0)
    logits = jnp.where(valid, jnp.clip(z / temperature, -_MAX_WEIGHT_LOGIT, _MAX_WEIGHT_LOGIT), -jnp.inf)
    # A prompt with no valid rollout would softmax over all -inf: keep it finite, then zero it.
    logits = jnp.where(valid.any(-1, keepdims=True), logits, 0.0)
    weights = jnp.where(valid, jax.nn.softmax(logits, axis=-1), 0.0)
    return jax.lax.stop_gradient(weights.reshape(num_rows))


def uniform_weights(mask: jax.Array, num_rollouts: int) -> jax.Array:
    """Reweighting off: w = 1 / (non-empty siblings) on non-empty rollouts, (R,)."""
    _check_shapes("uniform_weights", mask)
    num_rows = mask.shape[0]
    _check_rollouts(num_rows, num_rollouts)
    valid = (_token_counts(mask) > 0).reshape(-1, num_rollouts)
    weights = valid / jnp.maximum(valid.sum(-1, keepdims=True), 1)
    return weights.reshape(num_rows).astype(jnp.float32)


def num_high_tokens(counts: jax.Array, high_fraction: float) -> jax.Array:
    """n_high = max(1, ceil(p_v * T)) for T > 0, else 0; (R,) int32.

    A 1e-4-token tolerance keeps float rounding from adding a token
    (in float64 0.1 * 30 = 3.0000000000000004, whose ceil would be 4).
    """
    _check_hyper("num_high_tokens", "high_fraction", high_fraction)
    n_high = jnp.ceil(high_fraction * counts - 1e-4)
    return jnp.where(counts > 0, jnp.maximum(n_high, 1.0), 0.0).astype(jnp.int32)


def high_group_mask(va: jax.Array, mask: jax.Array, high_fraction: float = 0.2) -> jax.Array:
    """Eq. 5 groups: the n_high valid tokens of each rollout with the largest a_t.

    Ranks are per rollout (not a global threshold), computed with a stable sort on
    static (R, T) shapes, so among equal a_t the earlier token wins (docs/method.md choice).

    Args:
      va: (R, T) visual advantage.
      mask: (R, T) valid-token mask.
    Returns:
      (R, T) bool, True on the high-VA group V^(k).
    """
    _check_shapes("high_group_mask", mask, va=va)
    _check_hyper("high_group_mask", "high_fraction", high_fraction)
    valid = _valid(mask)
    # Invalid positions sort last; the stable sort keeps token order among ties.
    key = jnp.where(valid, -va.astype(jnp.float32), jnp.inf)
    order = jnp.argsort(key, axis=-1, stable=True)  # (R, T) token index by rank
    num_rows, length = va.shape
    rank = jnp.zeros((num_rows, length), jnp.int32).at[
        jnp.arange(num_rows)[:, None], order].set(jnp.arange(length, dtype=jnp.int32)[None, :])
    n_high = num_high_tokens(_token_counts(mask), high_fraction)
    return jax.lax.stop_gradient((rank < n_high[:, None]) & valid)


def token_coefficients(va: jax.Array, mask: jax.Array, w: jax.Array, high_fraction: float = 0.2,
                       high_weight: float = 0.5, group: bool = True) -> jax.Array:
    """Per-token loss coefficients c_t so that sum_t c_t KL_t = w^(k) L_group^(k) (Eq. 5).

    With grouping: lambda / n_high on V^(k), (1 - lambda) / n_low on L^(k); if L^(k)
    is empty (e.g. T = 1) the whole mass 1 / n_high goes to V^(k). Without grouping:
    1 / T^(k) on every valid token. All multiplied by the rollout weight w^(k).

    Args:
      va: (R, T); mask: (R, T); w: (R,) rollout weights.
    Returns:
      (R, T) float32 coefficients, 0 off the mask; each rollout's row sums to w^(k).
    """
    _check_shapes("token_coefficients", mask, va=va)
    if np.shape(w) != np.shape(mask)[:1]:
        raise ValueError(f"token_coefficients: w has shape {np.shape(w)}, expected (R,) = {np.shape(mask)[:1]}")
    _check_hyper("token_coefficients", "high_fraction", high_fraction)
    _check_hyper("token_coefficients", "high_weight", high_weight)
    maskf = _valid(mask).astype(jnp.float32)
    counts = _token_counts(maskf)
    if not group:
        coeff = maskf / jnp.maximum(counts, 1.0)[:, None]
    else:
        high = high_group_mask(va, mask, high_fraction)
        n_high = num_high_tokens(counts, high_fraction).astype(jnp.float32)
        n_low = counts - n_high
        high_coeff = jnp.where(n_low > 0, high_weight, 1.0) / jnp.maximum(n_high, 1.0)
        low_coeff = (1.0 - high_weight) / jnp.maximum(n_low, 1.0)
        coeff = jnp.where(high, high_coeff[:, None], low_coeff[:, None]) * maskf
    return jax.lax.stop_gradient(coeff * w.astype(jnp.float32)[:, None])


def _terms(va, mask, num_rollouts, *, reweight, group, high_fraction, high_weight, temperature, eps):
    """Eq. 3-6 terms for one combination of the two switches (per-prompt mean, Eq. 6)."""
    _check_shapes("objective_terms", mask, va=va)
    num_rows = mask.shape[0]
    _check_rollouts(num_rows, num_rollouts)
    nonempty = _token_counts(mask) > 0
    num_empty = (~nonempty).sum().astype(jnp.int32)
    num_prompts = nonempty.reshape(-1, num_rollouts).any(-1).sum().astype(jnp.float32)
    if reweight:
        weights = rollout_weights(va, mask, num_rollouts, temperature, eps)
    else:
        weights = uniform_weights(mask, num_rollouts)
    coeff = token_coefficients(va, mask, weights, high_fraction, high_weight, group=group)
    high = high_group_mask(va, mask, high_fraction) if group else jnp.zeros(mask.shape, bool)
    return ObjectiveTerms(coeff, weights, high, num_prompts, num_empty)


def objective_terms(va: jax.Array, mask: jax.Array, num_rollouts: int,
                    config: ObjectiveConfig = ObjectiveConfig()) -> ObjectiveTerms:
    """Weights, groups and coefficients of the configured method (all four ablations).

    For 'opd' the coefficients are num_prompts / (T^(k) * non-empty rollouts of the
    batch), so that sum(c * kl) / num_prompts is the mean over rollouts of the
    per-rollout token mean (docs/method.md's OPD baseline); ``va`` is ignored and
    ``rollout_weights`` reports 1 / (non-empty rollouts).

    Args:
      va: (R, T) visual advantage (any values for 'opd'); mask: (R, T).
    """
    if config.method != "opd":
        return _terms(va, mask, num_rollouts, reweight=config.reweight, group=config.group,
                      high_fraction=config.high_fraction, high_weight=config.high_weight,
                      temperature=config.tau, eps=config.eps)
    _check_shapes("objective_terms", mask, va=va)
    _check_rollouts(mask.shape[0], num_rollouts)
    nonempty = _token_counts(mask) > 0
    num_prompts = nonempty.reshape(-1, num_rollouts).any(-1).sum().astype(jnp.float32)
    rollout_share = nonempty / jnp.maximum(nonempty.sum().astype(jnp.float32), 1.0)
    coeff = token_coefficients(va, mask, rollout_share * num_prompts, group=False)
    return ObjectiveTerms(coeff, rollout_share, jnp.zeros(mask.shape, bool), num_prompts,
                          (~nonempty).sum().astype(jnp.int32))


def weighted_loss(kl: jax.Array, terms: ObjectiveTerms) -> jax.Array:
    """Eq. 6: sum over tokens of c_t KL_t divided by the number of prompts (0 if none).

    Tokens with c_t = 0 (off the mask, or of a zero-weight group) take no part: their KL may be anything (NaN
    at a padding position included) without changing the loss or its gradient.
    """
    if np.shape(kl) != np.shape(terms.coefficients):
        raise ValueError(f"weighted_loss: kl has shape {np.shape(kl)}, expected the coefficients' "
                         f"{np.shape(terms.coefficients)}")
    counted = terms.coefficients != 0
    total = jnp.where(counted, terms.coefficients * jnp.where(counted, kl.astype(jnp.float32), 0.0), 0.0).sum()
    return jnp.where(terms.num_prompts > 0, total / jnp.maximum(terms.num_prompts, 1.0), 0.0)


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array,
               valid_vocab_size: int | None = None) -> jax.Array:
    """Eq. 1: KL(p_S || p_T) = sum_w p_S (log p_S - log p_T) over the full vocabulary.

    Computed in float32. Vocabulary rows at index >= valid_vocab_size (lm_head
    padding beyond the tokenizer) are excluded from both softmaxes.

    Args:
      student_logits: (..., V); teacher_logits: (..., V).
    Returns:
      (...) float32 per-position KL. KL(p, p) = 0 exactly.
    """
    student_logits = student_logits.astype(jnp.float32)
    teacher_logits = teacher_logits.astype(jnp.float32)
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab:
        raise ValueError(f"student vocab {vocab} != teacher vocab {teacher_logits.shape[-1]}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"reverse_kl: teacher logits {teacher_logits.shape} != student logits "
                         f"{student_logits.shape}")
    if valid_vocab_size is not None and not (isinstance(valid_vocab_size, (int, np.integer))
                                             and 1 <= valid_vocab_size):
        raise ValueError(f"reverse_kl: valid_vocab_size={valid_vocab_size!r} must be an int >= 1 (or None)")
    if valid_vocab_size is not None and valid_vocab_size < vocab:
        # A finite "minus infinity": exp() gives exactly 0 and no inf - inf = nan
        # reaches the value or the gradient.
        keep = jnp.arange(vocab) < valid_vocab_size
        student_logits = jnp.where(keep, student_logits, MASKED_LOGIT)
        teacher_logits = jnp.where(keep, teacher_logits, MASKED_LOGIT)
    logp_s = jax.nn.log_softmax(student_logits, axis=-1)
    logp_t = jax.nn.log_softmax(teacher_logits, axis=-1)
    return (jnp.exp(logp_s) * (logp_s - logp_t)).sum(-1)


def va_opd_loss(kl: jax.Array, va: jax.Array, mask: jax.Array, num_rollouts: int, *,
                temperature: float = 1.0, eps: float = 1e-6, high_fraction: float = 0.2,
                high_weight: float = 0.5, reweight: bool = True, group: bool = True) -> jax.Array:
    """Eq. 6: mean over prompts of sum_k w^(k) L_group^(k); the switches give the ablations.

    Args:
      kl: (R, T) token KL (carries the gradient); va: (R, T); mask: (R, T).
      reweight/group: both on = VA-OPD; reweight only; group only; both off = uniform
        weights and token means (OPD whenever no rollout is empty).
    Returns:
      () float32 loss.
    """
    terms = _terms(va, mask, num_rollouts, reweight=reweight, group=group, high_fraction=high_fraction,
                   high_weight=high_weight, temperature=temperature, eps=eps)
    return weighted_loss(kl, terms)


def opd_loss(kl: jax.Array, mask: jax.Array) -> jax.Array:
    """Standard OPD: mean over non-empty rollouts of the per-rollout token-mean KL (the 'opd' method's loss).

    Args:
      kl: (R, T); mask: (R, T).
    Returns:
      () float32 loss (0 if no valid token).
    """
    terms = objective_terms(jnp.zeros(mask.shape, jnp.float32), mask, 1, ObjectiveConfig(method="opd"))
    return weighted_loss(kl, terms)
