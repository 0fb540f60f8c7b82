"""Exact top-k cosine neighbours, chunked: the one search that kNN evaluation, the retrieval index
and deduplication share."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dinolab.errors import DinolabError


def _as_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float tensor: float64 stays float64 (exact comparisons), anything else becomes float32."""
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return t if t.dtype == torch.float64 else t.float()


@torch.no_grad()
def topk_cosine(
    queries: np.ndarray | torch.Tensor,
    database: np.ndarray | torch.Tensor,
    k: int,
    *,
    query_chunk: int = 1024,
    db_chunk: int = 65536,
    device: str | torch.device | None = None,
    normalized: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine neighbours of each query row among ``database`` rows.

    Returns ``(scores, indices)``, both (M, min(k, N)) on the CPU, best first; scores are float64
    when either input is, else float32. Chunked over queries and database with a running top-k
    merge, so memory stays at one ``query_chunk x db_chunk`` block. ``normalized=True`` skips the L2
    normalisation when the inputs already are unit rows. Computation happens on ``device`` (default:
    the database's device).
    """
    if k < 1:
        raise DinolabError(f"k must be >= 1, got {k}")
    if query_chunk < 1 or db_chunk < 1:
        raise DinolabError("query_chunk and db_chunk must be >= 1")
    q, db = _as_float(queries), _as_float(database)
    if q.ndim != 2 or db.ndim != 2:
        raise DinolabError(f"queries and database must be 2-D, got {tuple(q.shape)} and {tuple(db.shape)}")
    if q.shape[1] != db.shape[1]:
        raise DinolabError(f"query dim {q.shape[1]} != database dim {db.shape[1]}")
    dtype = torch.promote_types(q.dtype, db.dtype)
    dev = torch.device(device) if device is not None else db.device
    db = db.to(dev, dtype)
    if not normalized:
        db = F.normalize(db, dim=-1)
    m, n = q.shape[0], db.shape[0]
    k = min(k, n)
    out_s = torch.empty(m, k, dtype=dtype)
    out_i = torch.empty(m, k, dtype=torch.int64)
    for qs in tqdm(range(0, m, query_chunk), disable=not progress, desc="neighbours", unit="chunk"):
        qc = q[qs : qs + query_chunk].to(dev, dtype)
        qc = qc if normalized else F.normalize(qc, dim=-1)
        best_s = torch.full((qc.shape[0], 0), float("-inf"), dtype=dtype, device=dev)  # running top-k
        best_i = torch.empty((qc.shape[0], 0), dtype=torch.int64, device=dev)
        for ds in range(0, n, db_chunk):
            sims = qc @ db[ds : ds + db_chunk].T  # (m_chunk, n_chunk), the largest temporary
            s, i = sims.topk(min(k, sims.shape[1]), dim=1)
            cat_s, cat_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i + ds], dim=1)
            best_s, pos = cat_s.topk(min(k, cat_s.shape[1]), dim=1)  # sorted, descending
            best_i = cat_i.gather(1, pos)
        out_s[qs : qs + qc.shape[0]] = best_s.cpu()
        out_i[qs : qs + qc.shape[0]] = best_i.cpu()
    return out_s, out_i
