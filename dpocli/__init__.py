"""dpocli: Direct Preference Optimization in two stages (reference cache, then training)."""

__version__ = "0.1.0"
