"""Selective Search (Uijlings et al., IJCV 2013) as a subpackage, one module per stage:

segmentation.py  colour spaces and Felzenszwalb-Huttenlocher over-segmentation
features.py      colour / texture histograms and the size / fill similarities
grouping.py      hierarchical grouping (Alg. 1) of one segmentation
search.py        strategies, diversification, ranking; ``selective_search`` and the
                 ``SelectiveSearchProposals`` ProposalGenerator
"""

from detkit.errors import SelectiveSearchError
from detkit.modeling.proposals.selective_search.grouping import (
    SIMILARITIES,
    Hierarchy,
    Regions,
    group_regions,
    hierarchical_grouping,
    parse_similarity,
    region_features,
)
from detkit.modeling.proposals.selective_search.search import (
    MODES,
    SelectiveSearchProposals,
    Strategy,
    rank_boxes,
    selective_search,
    strategies_for_mode,
)

__all__ = [
    "SelectiveSearchError",
    "Strategy",
    "Regions",
    "Hierarchy",
    "SIMILARITIES",
    "MODES",
    "parse_similarity",
    "strategies_for_mode",
    "region_features",
    "group_regions",
    "hierarchical_grouping",
    "rank_boxes",
    "selective_search",
    "SelectiveSearchProposals",
]
