"""Steering and attribution: edit SAE features inside a model and measure what that causes.

    with steer(lm, sae, [Edit(123, "clamp", "10x")], max_act=db_max_act, where="all"):
        out = lm.model.generate(ids, max_new_tokens=32)     # every token, KV cache on, is steered
"""

from monoscope.steer.edits import MODES, Edit, ResolvedEdit, SteerError, parse_features, parse_strength, resolve_edits
from monoscope.steer.intervene import SteerState, apply_edits, check_pair, steer

__all__ = ["MODES", "Edit", "ResolvedEdit", "SteerError", "SteerState", "apply_edits", "check_pair", "parse_features",
           "parse_strength", "resolve_edits", "steer"]
