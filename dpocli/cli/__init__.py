"""The `dpo` command: flags, config files and result tables. Nothing imports it."""
