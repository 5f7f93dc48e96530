"""Which stages a config's run consists of (``detkit train`` runs them in order, see
``detkit.engine.stages``).

    Faster R-CNN, Fast R-CNN (softmax head):  train (SGD) -> evaluate
    R-CNN / SPP-net with SVMs (issue 9):      fine-tune (SGD) -> cache features -> fit SVMs
                                              -> fit box regression -> evaluate

Without a test set (``data.test: null``) the evaluation stage is left out.
"""

from __future__ import annotations

from typing import List

from detkit.engine.stages import EvaluationStage, Stage
from detkit.engine.trainer import SGDStage
from detkit.schema import Config


def stages_for(cfg: Config) -> List[Stage]:
    stages: List[Stage] = [SGDStage("train")]
    if cfg.data.test is not None:
        stages.append(EvaluationStage())
    return stages
