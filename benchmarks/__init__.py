"""Benchmarks and analysis tools: `torchrun ... -m benchmarks.<name>`, or `python -m benchmarks.<name>`.

Results they wrote (*.json, *.png) live beside them; BENCHMARKS.md quotes them with their commands.
"""
