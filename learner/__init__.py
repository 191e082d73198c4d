"""learner: online multi-task models, losses and the training daemon."""

__all__: list[str] = []
