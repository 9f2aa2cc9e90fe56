"""Writing files safely, deciding what dpocli may delete, and where output goes. No torch."""
