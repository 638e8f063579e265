"""SuperLoRA: configuration, planning, the ΔW generator, presets and parameter budgets.

Modules
-------
config
    :class:`SuperLoRAConfig`, the hyper-parameters of one adapter (validated on construction).
plan
    How a configuration and a list of target shapes become groups, folds and splits.
generator
    :class:`SuperLoRA`: ``init`` / ``delta`` / ``vjp`` over a plan, on any array backend.
presets
    The published adapters (LoRA, LoKr, KronA, LoHa, LoTR, LoNKr, LoRTA, dense) as configurations.
budget
    :func:`count_params` and :func:`budget` from shapes alone.
factorize
    LyCORIS's ``factorization`` rule and the Kronecker split sizing rule.
forms
    Whether a target's ``ΔW`` is exactly LoRA, LoHa or LoKr, and from which blocks
    (:func:`~tensoradapt.superlora.forms.exact_form`).
"""

from . import presets
from .budget import BudgetEntry, budget, count_params
from .config import SuperLoRAConfig
from .factorize import factorization
from .generator import SuperLoRA
from .plan import GroupPlan, Plan, SplitPlan, param_name, parse_param_name

__all__ = [
    "BudgetEntry",
    "GroupPlan",
    "Plan",
    "SplitPlan",
    "SuperLoRA",
    "SuperLoRAConfig",
    "budget",
    "count_params",
    "factorization",
    "param_name",
    "parse_param_name",
    "presets",
]
