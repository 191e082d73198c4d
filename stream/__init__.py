"""stream: joins impressions, clicks and follow-on clicks into delayed-label samples."""

__all__: list[str] = []
