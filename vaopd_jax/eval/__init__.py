"""Evaluation: the paper's eight benchmarks (``benchmarks/``: readers, prompts, official scorers),
answer extraction and grading (``grading``), and the optional LLM judge (``judge``).

The entry point is ``python -m vaopd_jax.evaluate``.
"""
