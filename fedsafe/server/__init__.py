"""fedsafe.server."""
