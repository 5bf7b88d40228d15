"""torchrun entry points: `torchrun ... -m launch.<name>`, or `python -m launch.<name>` for one process."""
