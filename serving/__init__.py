"""serving: the live scorer (HTTP ranking with hot model swap)."""

__all__: list[str] = []
