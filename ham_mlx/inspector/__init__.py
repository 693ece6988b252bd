"""ham_mlx.inspector (work in progress)."""
