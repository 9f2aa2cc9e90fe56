"""`dpo eval` and `dpo cache verify`: checkpoints and caches scored against cached reference values."""
