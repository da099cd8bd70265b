"""Everything that needs torch: the daemon, its engine, models, LoRAs, outputs and settings."""
