"""Plans, and the two ways to carry them out: merged in place, or on the fly."""
from .merged import MergedPatcher, PatchStats
from .onthefly import OnTheFlyPatcher
from .plan import Contribution, LoraReport, PatchPlan, StackEntry, build_plan, changed_slots

__all__ = ["MergedPatcher", "OnTheFlyPatcher", "PatchStats", "Contribution", "LoraReport", "PatchPlan",
           "StackEntry", "build_plan", "changed_slots"]
