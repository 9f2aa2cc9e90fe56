"""Stage 2: `dpo train`, the loop and its run folder, checkpoints, schedule and dashboards."""
