"""``PrecomputedProposals``: the ProposalGenerator that reads proposal files.

The file formats, their validation and converters live in ``detkit.data.proposal_files``;
``detkit proposals`` writes such files. This module only looks up each image's boxes and
brings them from original pixels into the network input (``Geometry.apply``).

Shapes: N images in a batch, R proposals of one image.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from detkit.data.proposal_files import ProposalTable, load_proposals
from detkit.errors import ProposalFileError
from detkit.structures import ImageList, Proposals

logger = logging.getLogger("detkit")


# -- the ProposalGenerator ----------------------------------------------------------------
class PrecomputedProposals(nn.Module):
    """ProposalGenerator reading proposal files: ``forward(images, features, targets=None)
    -> (proposals, {})``.

    ``path``: one file, or several (e.g. the train split's and the test split's, as
    ``detkit proposals`` writes one file per split); their images are pooled, and an image
    id in two files is an error. Files are loaded once, at the first forward (building a
    model stays cheap, e.g. to load a checkpoint). Per image, the proposals of
    ``images.image_ids[i]`` are brought from original pixels into the network input by the
    image's ``Geometry.apply`` (resize per axis, mirror if flipped; an ImageList without
    geometries is taken as original images), clipped to the image, emptied boxes dropped, and the best
    ``max_proposals`` kept. An image id missing from the files is an error
    (ProposalFileError naming the id and the files): silently training or testing without
    proposals would hide a wrong file.
    """

    def __init__(self, path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], max_proposals: int = 2000):
        super().__init__()
        if max_proposals < 1:
            raise ValueError(f"max_proposals must be >= 1, got {max_proposals}")
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if not paths:
            raise ValueError("PrecomputedProposals needs at least one proposal file")
        self.paths = [Path(p) for p in paths]
        self.max_proposals = int(max_proposals)
        self._table: Optional[ProposalTable] = None
        self.meta: dict = {}  # of the first file

    @property
    def files(self) -> str:
        return ", ".join(str(p) for p in self.paths)

    def extra_repr(self) -> str:
        return f"path={self.files!r}, max_proposals={self.max_proposals}"

    def table(self) -> ProposalTable:
        if self._table is None:
            merged: ProposalTable = {}
            origin: Dict[str, Path] = {}
            for i, path in enumerate(self.paths):
                table, meta = load_proposals(path)
                if i == 0:
                    self.meta = meta
                for key, (boxes, scores) in table.items():
                    if key in merged:
                        raise ProposalFileError(f"proposal files {origin[key]} and {path} both hold image {key!r}")
                    # Sorted once here, so that forward only slices (files written by detkit
                    # are sorted already; hand-made ones need not be).
                    order = np.argsort(-scores, kind="stable")
                    merged[key], origin[key] = (boxes[order], scores[order]), path
            self._table = merged
            logger.info("loaded proposals for %d images from %s", len(merged), self.files)
        return self._table

    def lookup(self, image_id) -> Tuple[np.ndarray, np.ndarray]:
        table = self.table()
        entry = table.get(str(image_id))
        if entry is None:
            raise ProposalFileError(
                f"proposal file {self.files} has no proposals for image {str(image_id)!r} "
                f"({len(table)} images in the file; made for another dataset or split?)"
            )
        return entry

    def forward(self, images: ImageList, features=None, targets=None) -> Tuple[list, Dict[str, torch.Tensor]]:
        if images.image_ids is None:
            raise ProposalFileError(
                f"PrecomputedProposals ({self.files}) needs images.image_ids to find each image's proposals"
            )
        device = images.tensor.device
        out = []
        for i, (image_id, (h, w)) in enumerate(zip(images.image_ids, images.image_sizes)):
            boxes, scores = self.lookup(image_id)
            b = images.geometry(i).apply(torch.as_tensor(boxes, dtype=torch.float32))
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            b, s = b[keep][: self.max_proposals], torch.as_tensor(scores)[keep][: self.max_proposals]
            out.append(Proposals(b.to(device), s.to(device)))
        return out, {}
