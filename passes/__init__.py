"""fxprune's analysis and rewrite passes (see passes/README.md for each pass's contract)."""
