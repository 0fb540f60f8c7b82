"""Retrieval and data curation (the DINOv2 / Vo et al. 2024 recipe), one module per stage:

``embed`` (features to disk, resumable, torchrun-sharded) -> ``dedup`` (near-duplicates, evaluation
leaks) -> ``selection`` (retrieval-based, from seed images) -> ``kmeans`` (hierarchical) ->
``sampling`` (balanced over the tree); ``pipeline`` chains them behind ``dinolab curate`` with
``config`` (options) and ``report`` (report.json / .md, figures). Retrieval: ``index`` (exact torch
search, metrics), ``faiss_index`` (flat / IVF / HNSW / IVF-PQ), ``retrieval`` (``dinolab index``),
``revisited`` (Oxford / Paris protocol); ``copies`` makes and scores planted copies.
"""
