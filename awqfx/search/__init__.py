"""The AWQ search: ``search(observed) -> AWQPlan``.

``schedule`` (task order, liveness), ``replay`` (the loss-sample replay), ``scales`` (statistics,
candidates, region losses), ``clip`` (clip ranges, joint refinement), ``driver`` (the loop),
``smoothquant`` (SmoothQuant's scales, the weight-activation baseline: no search).
"""
from awqfx.search.clip import block_grams, clip_range, clip_ratios, input_gram, refine_clip_jointly
from awqfx.search.driver import gap_recovered, group_losses, rtn_plan, search
from awqfx.search.smoothquant import smoothquant_plan

__all__ = ["search", "rtn_plan", "group_losses", "gap_recovered", "clip_range", "clip_ratios", "block_grams",
           "input_gram", "refine_clip_jointly", "smoothquant_plan"]
