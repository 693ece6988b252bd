"""ham_mlx.serve (work in progress)."""
