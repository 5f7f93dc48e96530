"""detkit: the two-stage detection lineage (Selective Search -> R-CNN -> SPP-net ->
Fast R-CNN -> Faster R-CNN) behind one proposal interface and one region-head interface.

Start with ``detkit.modeling.detector.Detector`` (the one detector), ``detkit.modeling.build``
(config -> objects) and ``detkit.structures`` (conventions)."""

__version__ = "0.1.0"
