"""`pathoscope bench`: speed and cost benchmarks, one module per section (run.py runs them)."""
