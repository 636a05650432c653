"""Privacy reports of run folders and site ledgers (above privacy and server, below cli)."""
