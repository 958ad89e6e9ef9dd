"""Layer 2: exchange plans (pure data, built in C++)."""

from alltoall.plan.plan import ALGORITHMS, LinkUse, PlanSummary, make_plan, plan

__all__ = ["ALGORITHMS", "LinkUse", "PlanSummary", "make_plan", "plan"]
