"""fedsafe: federated learning with per-site differential privacy on Flower and Opacus."""

__version__ = "0.1.0"
