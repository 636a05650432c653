"""What a site trains: data, model, loss and metrics (shipped scenarios, CSV + schema sites)."""
