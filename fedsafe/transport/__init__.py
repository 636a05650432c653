"""fedsafe.transport."""
