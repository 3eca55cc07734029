"""Layout planner: per-device memory estimates and (tp, pp, dp, micro-batch, recompute) proposals."""
