"""fedsafe.client."""
