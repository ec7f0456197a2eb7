"""One Prefect task per pipeline stage: thin typed wrappers over mlx_model."""
