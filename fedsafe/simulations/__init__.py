"""fedsafe.simulations."""
