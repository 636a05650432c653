"""A minimal Flower app run by ``bench/floors.py``: fedsafe's round protocol, no fedsafe work."""
