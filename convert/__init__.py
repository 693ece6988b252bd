"""Checkpoint converters (PyTorch / FLA -> ham_mlx). Not implemented yet: see the convert issue."""
