"""fedsafe.cli."""
