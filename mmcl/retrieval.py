"""Image<->text retrieval metrics; they live in `mmcl.eval.retrieval`, re-exported here under their old name."""
from mmcl.eval.retrieval import (  # noqa: F401
    Ranks, __all__, evaluate, flatten_captions, hit_probability, recall_at_k, retrieval_ranks,
)
