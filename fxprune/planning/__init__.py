"""Layer 3, planning: importance criteria and statistics (``importance``), the budget
planner (``planner``) and the cost model (``cost``: MACs, parameters, latency)."""
