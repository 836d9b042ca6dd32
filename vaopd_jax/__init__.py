"""vaopd_jax: Visual-Advantage On-Policy Distillation (VA-OPD) for Qwen3-VL in JAX/Flax."""

__version__ = "0.1.0"
