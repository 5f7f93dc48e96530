"""Which stages a config's run consists of (``detkit train`` runs them in order, see
``detkit.engine.stages``).

    Faster R-CNN, Fast R-CNN (softmax head):  train (SGD) -> evaluate
    R-CNN / SPP-net (heads rcnn, spp):        finetune (SGD) -> cache_features -> fit_svms
                                              -> fit_box_regression -> evaluate
                                              (``detkit.engine.svm_stages``; the SVM stage is
                                              left out with svm.classifier: softmax, the box
                                              regression with svm.box_regression: false)

Without a test set (``data.test: null``) the evaluation stage is left out.
"""

from __future__ import annotations

from typing import List

from detkit.engine.stages import EvaluationStage, Stage
from detkit.engine.svm_stages import svm_stages
from detkit.engine.trainer import SGDStage
from detkit.modeling.build import CLASSIC_HEADS
from detkit.schema import Config


def stages_for(cfg: Config) -> List[Stage]:
    if cfg.model.roi_head.name in CLASSIC_HEADS:
        stages: List[Stage] = [SGDStage("finetune"), *svm_stages(cfg)]
    else:
        stages = [SGDStage("train")]
    if cfg.data.test is not None:
        stages.append(EvaluationStage())
    return stages
