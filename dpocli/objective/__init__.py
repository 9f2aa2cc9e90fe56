"""The DPO objective: preference losses and the metrics logged under TRL's names (tensor math)."""
