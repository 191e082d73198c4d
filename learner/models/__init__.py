"""learner.models: multi-task architectures (shared-bottom, MMoE, CGC, PLE, ESMM)."""

from __future__ import annotations

from learner.models.cgc import CGC, CGCConfig, ExtractionLayer
from learner.models.esmm import esmm_ctcvr_bce, esmm_ctcvr_logit, esmm_ctcvr_prob
from learner.models.experts import Expert, ExpertGroup
from learner.models.gates import Gate, fuse
from learner.models.mmoe import MMoE, MMoEConfig, OMoE
from learner.models.ple import PLE, PLEConfig
from learner.models.ranking import (
    ARCHS,
    DEFAULT_TASKS,
    ModelArgs,
    RankingModel,
    build_model,
    load_model,
)
from learner.models.shared_bottom import SharedBottom, SharedBottomConfig
from learner.models.single import SingleTask, SingleTaskConfig
from learner.models.towers import TaskTower

__all__ = [
    "ARCHS",
    "CGC",
    "DEFAULT_TASKS",
    "PLE",
    "CGCConfig",
    "Expert",
    "ExpertGroup",
    "ExtractionLayer",
    "Gate",
    "MMoE",
    "MMoEConfig",
    "ModelArgs",
    "OMoE",
    "PLEConfig",
    "RankingModel",
    "SharedBottom",
    "SharedBottomConfig",
    "SingleTask",
    "SingleTaskConfig",
    "TaskTower",
    "build_model",
    "esmm_ctcvr_bce",
    "esmm_ctcvr_logit",
    "esmm_ctcvr_prob",
    "fuse",
    "load_model",
]
