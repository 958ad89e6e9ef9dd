"""Layer 2: exchange plans (pure data, built in C++) and their cost model."""

from alltoall.plan.model import Cost, Prediction, breakpoints, predict_plan
from alltoall.plan.plan import ALGORITHMS, LinkUse, PlanSummary, make_plan, plan
from alltoall.plan.profile import LINK_CLASSES, LinkCost, Profile

__all__ = [
    "ALGORITHMS",
    "LINK_CLASSES",
    "Cost",
    "LinkCost",
    "LinkUse",
    "PlanSummary",
    "Prediction",
    "Profile",
    "breakpoints",
    "make_plan",
    "plan",
    "predict_plan",
]
