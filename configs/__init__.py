"""Data only: the bundled model registry (`models.toml`), shipped as package data."""
