"""Expert-parallel Mixture-of-Experts for PyTorch.

Experts sharded over the ranks of a process group, tokens exchanged with all-to-all.
"""

from .comm import CollectiveError
from .config import ExecutionConfig, MoEConfig
from .layer import MoELayer, MoEOutput, RoutingStats
from .lifecycle import distributed, init_distributed, shutdown
from .router import Routing, route

__all__ = [
    "CollectiveError",
    "ExecutionConfig",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "Routing",
    "RoutingStats",
    "distributed",
    "init_distributed",
    "route",
    "shutdown",
]
__version__ = "0.1.0"
