"""evaluation: offline comparison of the multi-task models on public and synthetic data."""

__all__: list[str] = []
