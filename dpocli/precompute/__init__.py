"""Stage 1: `dpo precompute-ref` scores every pair with the frozen reference once."""
