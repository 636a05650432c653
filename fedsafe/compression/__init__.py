"""fedsafe.compression."""
