"""pathoscope package."""
