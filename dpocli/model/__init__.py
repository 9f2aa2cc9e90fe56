"""Models and how they run: loading, devices and ranks, LoRA, quantization, sharding, layouts, the LM head."""
