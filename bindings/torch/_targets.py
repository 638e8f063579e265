"""Temporary re-export shim (issue 23): the names of the old ``_targets`` module, now in
:mod:`.modules` (the weight view) and :mod:`.targets` (matching).  Removed once nothing imports it."""

from tensoradapt._targets import TargetView, select_targets, target_matcher, target_view

from .modules import TargetSpec, WeightView, weight_view
from .targets import (
    DIFFUSERS_ATTENTION,
    DIFFUSERS_DEFAULT_TARGETS,
    DIFFUSERS_RESNET_CONVS,
    diffusers_default_targets,
    diffusers_targets,
    is_diffusers_model,
    match_targets,
)

__all__ = ["DIFFUSERS_ATTENTION", "DIFFUSERS_DEFAULT_TARGETS", "DIFFUSERS_RESNET_CONVS", "TargetSpec", "TargetView",
           "WeightView", "diffusers_default_targets", "diffusers_targets", "is_diffusers_model", "match_targets",
           "select_targets", "target_matcher", "target_view", "weight_view"]
