"""Tuning presets as TOML files (default, low_memory, throughput), chosen by ``STAGER_PROFILE``."""
