"""Datasets: the built-in task set, file loading, formatting into tokens, and batching."""
