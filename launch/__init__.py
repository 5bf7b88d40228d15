"""torchrun entry points: `python -m torch.distributed.run ... -m launch.<name>`."""

import warnings

# torch warns at import when numpy is absent; nothing here needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
