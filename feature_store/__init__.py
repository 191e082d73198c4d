"""feature_store: Redis key layout, features and the model snapshot registry."""

__all__: list[str] = []
