"""Expert-parallel Mixture-of-Experts for PyTorch.

Experts sharded over the ranks of a process group, tokens exchanged with all-to-all.
"""

from .comm import CollectiveError, distributed, init_distributed, shutdown
from .config import MoEConfig
from .layer import MoELayer, RoutingStats
from .router import Routing, route

__all__ = [
    "CollectiveError",
    "MoEConfig",
    "MoELayer",
    "Routing",
    "RoutingStats",
    "distributed",
    "init_distributed",
    "route",
    "shutdown",
]
__version__ = "0.1.0"
