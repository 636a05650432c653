"""fedsafe.data."""
