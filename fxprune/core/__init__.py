"""Layer 0, core types: errors, coupled groups, plans, the checked pipeline, reports,
graph metadata and the mask/gate modules. Imports no pass (tests/test_layers.py)."""
