"""Distillation objectives, one module each, over the shared pieces in shared.py (METHOD.md).

Every objective is `loss(batch, config) -> ObjectiveLoss` with its own frozen config dataclass;
the engine's step (jobs/distill.py) builds the batch and calls the one the spec names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from traflow_cli.objectives import ctm, eulerian, lagrangian, traflow
from traflow_cli.objectives.shared import Batch, ObjectiveLoss

# name -> (config class, loss function)
OBJECTIVES: dict[str, tuple[type, Callable[[Batch, Any], ObjectiveLoss]]] = {
    "traflow": (traflow.TraFlowConfig, traflow.loss),
    "ctm": (ctm.CTMConfig, ctm.loss),
    "lagrangian": (lagrangian.LagrangianConfig, lagrangian.loss),
    "eulerian": (eulerian.EulerianConfig, eulerian.loss),
}

__all__ = ["OBJECTIVES", "Batch", "ObjectiveLoss"]
