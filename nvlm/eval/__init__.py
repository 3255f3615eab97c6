"""Evaluation: per-benchmark scoring rules (`metrics/`) and the scoring CLI (`score.py`).

The rules follow the project's evaluation spec (EVAL.md): every benchmark is scored under two named protocols, `nvlm` (what NVIDIA's
Megatron-LM evaluation scripts compute; the default) and `official` (each benchmark's own scorer).
"""
