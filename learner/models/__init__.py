"""learner.models: multi-task architectures (shared-bottom, MMoE, CGC, PLE, ESMM)."""

__all__: list[str] = []
