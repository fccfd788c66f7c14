"""Zero-shot classification; it lives in `mmcl.eval.zeroshot`, re-exported here under its old name."""
from mmcl.eval.zeroshot import (  # noqa: F401
    DEFAULT_TEMPLATES, IMAGENET_TEMPLATES, TEMPLATE_SETS, ZeroShotClassifier, __all__, build_class_embeddings,
)
