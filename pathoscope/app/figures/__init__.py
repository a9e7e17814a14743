"""Figures drawn from runs: training curves, metrics against K, maps across runs, embeddings."""
