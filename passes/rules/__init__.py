"""Rule families (one file each). Importing this package registers them all."""
from passes.rules import (  # noqa: F401
    aten, attention, conv, elementwise, linear, norm, pool, recurrent, reduce, shape, timm,
    vision)
from passes.rules.registry import ANALYSIS_RULES, FIXUPS, MODULE_FIXUPS, rule  # noqa: F401
