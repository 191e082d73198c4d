"""demo: `mtlstream demo`, the closed loop of simulator, stream, learner and scorer, supervised."""

__all__: list[str] = []
