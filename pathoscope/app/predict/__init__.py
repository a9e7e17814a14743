"""`pathoscope predict`: anomaly maps for new volumes and images from a checkpoint (run.py)."""
