"""Cache rows scored by a model: batches replayed exactly, the policy fitted to a cache, the per-node copy."""
