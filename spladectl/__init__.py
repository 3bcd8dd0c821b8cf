"""spladectl: train SPLADE sparse retrieval models fast on whatever hardware you have."""

__version__ = "0.1.0"
