"""Feature maps phi(x) for kernel linear attention: phi(q)^T phi(k) stands in for a similarity.

Each map takes [..., K] and returns [..., M]. ``get_feature_map`` turns the names accepted by
``linattn.ops.linear_attn(feature_map=...)`` into a function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def elu1(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1, positive everywhere (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": identity,
    "elu1": elu1,
    "relu": relu,
}


def get_feature_map(feature_map) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(feature_map):
        return feature_map
    if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
        return FEATURE_MAPS[feature_map]
    raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}")
