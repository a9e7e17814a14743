"""The application layer: command line, experiments, reporting, predict, export, benchmarks."""
