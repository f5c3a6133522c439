"""What a model is, as far as routing cares: its identity in saved statistics, and its vision tokens."""

from __future__ import annotations

from typing import Any

import torch

from .controller import RoutingController


def vision_token_ids(model: torch.nn.Module) -> list[int]:
    """The image and video placeholder token ids a vision-language model's config declares (none for text models)."""
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return [getattr(model.config, n) for n in names if isinstance(getattr(model.config, n, None), int)]


def model_identity(model: torch.nn.Module, controller: RoutingController) -> dict[str, Any]:
    """What a statistics file records about the model it was measured on."""
    architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
    return {
        "architecture": architectures[0],
        "num_layers": controller.num_layers,
        "num_experts": controller.num_experts,
        "top_k": controller.top_k,
        "router_layers": controller.layer_names,
    }
