"""mtlstream: streaming online learning for multi-task ranking (CLI, settings, local services)."""

__all__: list[str] = []
__version__ = "0.1.0"
