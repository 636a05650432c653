"""fedsafe.strategies."""
