"""fedsafe.privacy."""
