"""Nearest-neighbour search over stored embeddings with FAISS (the optional `faiss-cpu` package).

Embeddings are L2-normalised and searched by inner product, i.e. by cosine similarity.
"flat" is exact and fine to a few million rows; "ivf" clusters the rows into `nlist` lists
and scans only `nprobe` of them per query, trading a little recall for much less work at scale.

An index directory holds `index.faiss` (FAISS's own binary format, not a pickle), `ids.json`
(one string per row) and `index_config.json`.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from mmcl.eval._checks import as_features, positive_int

__all__ = ["EmbeddingIndex", "build_index"]

INDEX_FILE, IDS_FILE, CONFIG_FILE = "index.faiss", "ids.json", "index_config.json"
KINDS = ("flat", "ivf")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("embedding indexes need FAISS: pip install faiss-cpu") from None
    return faiss


def _rows(name: str, x) -> np.ndarray:
    """(N, D) float32 C-contiguous unit rows, as FAISS wants them."""
    t = F.normalize(as_features(name, x).detach().float().cpu(), dim=1)
    return np.ascontiguousarray(t.numpy())


class EmbeddingIndex:
    """A FAISS inner-product index over unit embeddings plus a string id per row.

    Build with `build_index` or `EmbeddingIndex.load(directory)`; query with `search`.
    """

    def __init__(self, index, ids: list[str], config: dict):
        self.index, self.ids, self.config = index, ids, config

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries, k: int = 10, *, nprobe: int | None = None) -> tuple[torch.Tensor, list[list[str]]]:
        """The k most similar rows for each of Q queries (Q, D): (scores (Q, k) cosines, ids Q x k).

        k is capped at the index size. `nprobe` (ivf only) lists to scan; default from the config.
        """
        q = _rows("queries", queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]} but the index holds dim {self.dim} embeddings")
        k = min(positive_int("k", k), len(self))
        if self.config["kind"] == "ivf":
            self.index.nprobe = min(positive_int("nprobe", nprobe or self.config["nprobe"]), self.index.nlist)
        scores, rows = self.index.search(q, k)
        return torch.from_numpy(scores), [[self.ids[j] for j in r] for r in rows.tolist()]

    def save(self, directory) -> None:
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        _faiss().write_index(self.index, os.path.join(directory, INDEX_FILE))
        with open(os.path.join(directory, IDS_FILE), "w") as f:
            json.dump(self.ids, f)
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(self.config, f, indent=2)

    @classmethod
    def load(cls, directory) -> "EmbeddingIndex":
        directory = os.fspath(directory)
        paths = [os.path.join(directory, name) for name in (INDEX_FILE, IDS_FILE, CONFIG_FILE)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{directory} is not an mmcl embedding index (missing {', '.join(missing)})")
        index = _faiss().read_index(paths[0])
        with open(paths[1]) as f:
            ids = json.load(f)
        with open(paths[2]) as f:
            config = json.load(f)
        if len(ids) != index.ntotal:
            raise ValueError(f"{directory}: {len(ids)} ids for {index.ntotal} indexed rows")
        return cls(index, ids, config)


def build_index(embeddings, ids=None, *, kind: str = "flat", nlist: int | None = None, nprobe: int = 16,
                seed: int = 0) -> EmbeddingIndex:
    """Index (N, D) embeddings; `ids` names each row (default "0".."N-1").

    kind "flat": exact search. kind "ivf": `nlist` k-means lists (default about 4 sqrt(N), at most
    N / 39 so each list trains on enough rows), searched `nprobe` at a time.
    """
    faiss = _faiss()
    x = _rows("embeddings", embeddings)
    n, d = x.shape
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries but embeddings has {n} rows")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    config = {"kind": kind, "dim": d, "metric": "cosine", "count": n}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        nlist = positive_int("nlist", nlist) if nlist is not None else max(1, min(4 * int(math.sqrt(n)), n // 39))
        if nlist > n:
            raise ValueError(f"nlist={nlist} is more than the {n} rows to cluster")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed  # reproducible k-means
        index.train(x)
        config.update(nlist=nlist, nprobe=positive_int("nprobe", nprobe))
    index.add(x)
    return EmbeddingIndex(index, ids, config)
