"""k-means and deduplication at scale on this machine: wall time and peak memory, torch vs faiss,
plus a projection (arithmetic, not a measurement) for 100M vectors on GPUs.

Data (``make_data``, deterministic): N float32 vectors of dimension D around 2,000 Gaussian centres
(unit-variance noise per dimension, so two points of one cluster have cosine ~0.5), then 1% of the
rows replaced by near-copies of other rows (noise 0.05 per dimension: cosine ~0.997), L2-normalised.

Cases, each in its own subprocess so that its peak RSS (``resource.getrusage``) is its own:
  kmeans-torch   ``kmeans(k)`` k-means++ init (on a 100k-point sample) timed with one assignment pass,
                 then ``--iters`` Lloyd iterations from those centroids
  kmeans-faiss   the same iterations with ``backend="faiss"`` from the same initial centroids
  dedup-cluster  ``find_duplicates(method="cluster")`` on all N vectors: torch k-means (sqrt(N) cells,
                 10 iterations) + exact search inside each point's cell (nprobe 1)
  dedup-exact-torch / dedup-exact-faiss / dedup-cluster-small / dedup-ivf-small
                 on a separate ``--exact-n`` dataset of the same recipe: exact all-pairs search is
                 2 N^2 D FLOPs, hours at N = 1M on 2 cores, so it is timed at ``--exact-n`` and
                 scaled by (N / exact_n)^2 (labelled a projection); the faiss IVF scan (nlist /
                 nprobe below) is memory-bound on this CPU (each query streams its cells), so it is
                 compared at that size only

    python benchmarks/curate_scale.py [--n 1000000] [--dim 384] [--k 1000] [--iters 5]
           [--json benchmarks/results/curate_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

CENTRES = 2000
DUP_FRACTION = 0.01


def make_data(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, set[tuple[int, int]]]:
    """(N, D) unit rows and the planted near-duplicate pairs (i < j)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, d), dtype=np.float32) * 1.0
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):  # chunks keep the temporaries small
        m = min(100_000, n - s)
        x[s:s + m] = centres[rng.integers(0, CENTRES, m)] + rng.standard_normal((m, d), dtype=np.float32)
    n_dup = int(n * DUP_FRACTION)
    perm = rng.permutation(n)
    dst, src = perm[:n_dup], perm[n_dup:2 * n_dup]
    x[dst] = x[src] + 0.05 * rng.standard_normal((n_dup, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.from_numpy(x), {(min(a, b), max(a, b)) for a, b in zip(dst.tolist(), src.tolist())}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_case(case: str, args: argparse.Namespace) -> dict:
    """One measurement (in a fresh process)."""
    torch.set_num_threads(args.threads)
    from dinolab.curate.copies import pair_precision_recall
    from dinolab.curate.dedup import find_duplicates
    from dinolab.curate.kmeans import kmeans

    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        faiss = None
    base_rss, load_start = peak_rss_mib(), os.getloadavg()[0]
    n = args.exact_n if case.startswith("dedup") and case != "dedup-cluster" else args.n
    t = time.perf_counter()
    x, planted = make_data(n, args.dim)
    out: dict = {"case": case, "n": n, "dim": args.dim, "data_gib": x.numel() * 4 / 2**30,
                 "generate_s": time.perf_counter() - t, "rss_before_data_mib": base_rss}
    flop_pass = 2.0 * n * args.k * args.dim
    if case.startswith("kmeans"):
        t = time.perf_counter()
        init = kmeans(x, args.k, n_iter=0, seed=0)  # k-means++ on a 100k sample + one assignment pass
        out["init_plus_one_pass_s"] = time.perf_counter() - t
        backend = case.split("-")[1]
        t = time.perf_counter()
        res = kmeans(x, args.k, n_iter=args.iters, init=init.centroids, backend=backend)
        wall = time.perf_counter() - t
        passes = res.n_iter_run + 1  # n_iter_run (update + assignment) steps after the first assignment
        out.update(k=args.k, iterations=res.n_iter_run, wall_s=wall, assignment_passes=passes,
                   s_per_pass=wall / passes, gflops=flop_pass * passes / wall / 1e9, inertia=res.inertia)
    elif case.startswith("dedup"):
        method = {"dedup-exact-torch": "exact", "dedup-exact-faiss": "flat", "dedup-cluster": "cluster",
                  "dedup-cluster-small": "cluster", "dedup-ivf-small": "ivf"}[case]
        t = time.perf_counter()
        if method == "flat":  # faiss brute force: IndexFlatIP, same top-k as the torch search
            from dinolab.curate.faiss_index import FaissIndex

            index = FaissIndex(x, kind="flat")
            s, i = index.search(x, args.dedup_k + 1)
            keep = (s >= args.threshold) & (i != torch.arange(n)[:, None])
            found = {(min(a, b), max(a, b)) for a, b in zip(torch.arange(n)[:, None].expand_as(i)[keep].tolist(),
                                                             i[keep].tolist())}
            pairs = np.array(sorted(found)).reshape(-1, 2)
        else:
            nlist, nprobe = (None, 1) if method == "cluster" else (args.nlist, args.nprobe)
            res = find_duplicates(x, threshold=args.threshold, k=args.dedup_k, method=method, nlist=nlist,
                                  nprobe=nprobe, chunk=65536 if method == "ivf" else 4096)  # 4096: the default
            pairs = res.pairs
        wall = time.perf_counter() - t
        pr = pair_precision_recall(pairs, planted)
        out.update(method=method, wall_s=wall, pairs_found=len(pairs), planted_pairs=len(planted),
                   precision=pr["precision"], recall=pr["recall"], threshold=args.threshold, k=args.dedup_k)
        if method == "ivf":
            out.update(nlist=args.nlist, nprobe=args.nprobe)
        elif method == "cluster":
            out.update(nlist=round(n ** 0.5), nprobe=1)
        else:
            out["gflops"] = 2.0 * n * n * args.dim / wall / 1e9
    out["peak_rss_mib"] = peak_rss_mib()
    out["load_avg_1min"] = {"start": load_start, "end": os.getloadavg()[0]}  # other users of this machine
    out["faiss"] = getattr(faiss, "__version__", None)
    return out


def projection(measured: dict, args: argparse.Namespace) -> dict:
    """Arithmetic for 100M vectors; every number here is derived, none is measured on a GPU."""
    n = 100_000_000
    rates = {"bf16": 400e12, "tf32": 200e12}  # assumed sustained matmul FLOP/s on one H100 SXM
    out = {
        "label": "PROJECTION (arithmetic from the assumptions below, not a measurement)",
        "assumptions": {
            "n": n, "gpus": 8,
            "sustained_flops_per_gpu": {"bf16": "400 TFLOP/s (~40% of the H100 SXM dense bf16 peak of 989)",
                                        "tf32": "200 TFLOP/s (~40% of the dense TF32 peak of 495)"},
            "kmeans": "one assignment pass = 2 N k D FLOPs (the distance matmul; argmin and the update are "
                      "O(N k) and O(N D) and ignored); 20 Lloyd iterations per level; k = 100,000 (the DINOv2 "
                      "cluster-based retrieval size); coarser levels of a hierarchy cost far less",
            "kmeans_init": "not included: greedy k-means++ is sequential in k (measured here: ~200 s for k = 1,000 "
                           "on its 100k-point sample); for k = 100,000 use init='random' or seed from a sample",
            "dedup_exact": "all-pairs top-k = 2 N^2 D FLOPs",
            "dedup_cluster": "method='cluster' as measured here: k-means into c = sqrt(N) = 10,000 cells "
                             "(10 passes of 2 N c D) + exact search inside each point's cell (2 N (N / c) D "
                             "for balanced cells; imbalance raises the second term)",
            "memory": "100M x D vectors: 4 D bytes each in fp32, 2 D in bf16, sharded over the GPUs",
        },
        "cases": [],
    }
    for d in (384, 1024):
        c = n ** 0.5
        flops = {"kmeans_pass_k1e5": 2.0 * n * 1e5 * d, "dedup_exact": 2.0 * n * n * d,
                 "dedup_cluster": 10 * 2.0 * n * c * d + 2.0 * n * (n / c) * d}
        for name, f in flops.items():
            row = {"dim": d, "what": name, "flops": f}
            for prec, r in rates.items():
                row[f"hours_1gpu_{prec}"] = f / r / 3600
                row[f"hours_8gpu_{prec}"] = f / r / 8 / 3600
            if name == "kmeans_pass_k1e5":
                row["hours_20_iterations_8gpu_bf16"] = 20 * f / rates["bf16"] / 8 / 3600
            out["cases"].append(row)
        out[f"data_gib_fp32_d{d}"] = n * d * 4 / 2**30
    cpu = measured.get("kmeans-torch", {}).get("gflops")
    if cpu:
        f = 2.0 * n * 1e5 * 384
        out["this_cpu_kmeans_pass_k1e5_d384_days"] = f / (cpu * 1e9) / 86400
        out["this_cpu_rate_gflops"] = cpu
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=1000, help="k-means clusters")
    ap.add_argument("--iters", type=int, default=5, help="Lloyd iterations timed")
    ap.add_argument("--exact-n", type=int, default=50_000, help="size of the exact all-pairs dedup runs")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--dedup-k", type=int, default=16)
    ap.add_argument("--nlist", type=int, default=256, help="faiss IVF cells (dedup-ivf-small)")
    ap.add_argument("--nprobe", type=int, default=4, help="faiss IVF cells scanned per query")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=["kmeans-torch", "kmeans-faiss", "dedup-cluster", "dedup-exact-torch",
                                                   "dedup-exact-faiss", "dedup-cluster-small", "dedup-ivf-small"])
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "curate_scale.json")
    args = ap.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args)), flush=True)
        return
    from dinolab.io import atomic_write_json

    measured = {}
    for case in args.cases:
        cmd = [sys.executable, __file__, "--case", case, *sys.argv[1:]]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            measured[case] = {"error": proc.stderr[-2000:]}
            print(f"{case}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        measured[case] = json.loads(line[len("RESULT "):])
        r = measured[case]
        print(f"{case:18s} n={r['n']:>9,d} wall {r['wall_s']:8.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
              + (f"{r['s_per_pass']:.1f} s/pass {r['gflops']:.0f} GFLOP/s" if "s_per_pass" in r else
                 f"pairs {r['pairs_found']} recall {r['recall']:.4f} precision {r['precision']:.4f}")
              + f"  (process {time.perf_counter() - t:.0f} s)", flush=True)
    for case in ("dedup-exact-torch", "dedup-exact-faiss"):
        if "wall_s" in measured.get(case, {}):
            r = measured[case]
            r["projected_wall_s_at_n"] = r["wall_s"] * (args.n / r["n"]) ** 2
            r["projected_label"] = f"PROJECTION to n={args.n} by (n / {r['n']})^2, not measured"
    result = {"benchmark": "curate_scale", "settings": {k: v for k, v in vars(args).items() if k not in ("case",)},
              "measured": measured, "projection_100m_gpu": projection(measured, args),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "load_avg_end": os.getloadavg()},
              "command": "python " + " ".join(sys.argv)}
    result["settings"]["json"] = str(args.json)
    atomic_write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
