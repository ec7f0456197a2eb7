"""Process-level setup, apart from the mathematics: which BLAS MLX binds (`blas`), how many
CPU streams a batch is split over (`lanes`), and the cache of natively built libraries
(`build`)."""
