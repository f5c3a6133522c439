"""Routing of MoE models: adapters per router family, sampled routing, trace recording and replay."""

from .adapters import ROUTER_ADAPTERS, RouterAdapter
from .controller import TEXT, VISION, LayerCapture, RolloutRecording, RolloutRouting, RoutingController
from .recognition import find_routers
from .sampling import gumbel_top_k, noisy_top_k
from .traces import pad_routes, split_rollout_routes

__all__ = [
    "ROUTER_ADAPTERS",
    "TEXT",
    "VISION",
    "LayerCapture",
    "RolloutRecording",
    "RolloutRouting",
    "RouterAdapter",
    "RoutingController",
    "find_routers",
    "gumbel_top_k",
    "noisy_top_k",
    "pad_routes",
    "split_rollout_routes",
]
