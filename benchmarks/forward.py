"""Backbone forward throughput: dinolab vs timm vs HuggingFace transformers, one process, same weights.

Every runner gets the same random weights (ours -> converted into timm / HF), the same input batch and
the same dtype policy, and is timed side by side; the table prints each runner's images/s, its
ratio to the fastest peer of the same mode (eager / compiled), peak memory, and the max abs
difference of its CLS output from our fp32 output (proof of "same outputs").

    python benchmarks/forward.py --device cuda --models s,b,l --batch 256          # GPU, bf16 autocast
    python benchmarks/forward.py --device cpu --models s --batch 16 --dtype fp32   # CPU

Runners: ``ours``, ``timm``, ``hf`` (SDPA attention), each ``eager`` and ``compile``
(``torch.compile`` default mode). ``ours-bf16w`` is our model with bf16 weights and activations
(no autocast, residual stream in bf16) - a different dtype policy, listed separately.
Results go to ``--json`` (default benchmarks/results/forward-<device>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from dinolab.models import create_model
from dinolab.models.checkpoints import save_hf_folder
from dinolab.models.convert import official_to_timm
from dinolab.models.inference import optimize_for_inference

SIZES = {"s": "dinov2_vits14", "b": "dinov2_vitb14", "l": "dinov2_vitl14", "g": "dinov2_vitg14"}


class PeakRSS:
    """Peak resident memory above the start, sampled every 2 ms from /proc (CPU runs)."""

    def __enter__(self):
        self.start, self.peak, self._stop = self._rss(), 0, False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _loop(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss() - self.start)
            time.sleep(0.002)


def build_peers(name: str, device: str, runners: list[str], img: int):
    """Our model with random weights and the same weights in timm and HF; each returns CLS (B, D).

    The position-embedding table is built for ``img`` so no runner resizes it (the peers' resize
    differs from the official one for the non-register models, see tests/models/test_parity.py)."""
    torch.manual_seed(0)
    ours = create_model(name, img_size=img).eval()
    with torch.no_grad():  # LayerScale ~1 so every block matters for the output comparison
        for k, p in ours.named_parameters():
            if k.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    models = {"ours": (ours, lambda m, x: m(x).cls_token)}
    for peer in ("timm", "hf"):
        if peer in runners:
            try:
                models[peer] = (_timm if peer == "timm" else _hf)(ours, name, img)
            except Exception as e:  # a missing or broken peer is reported, the rest still runs
                print(f"{name} {peer}: cannot build ({type(e).__name__}: {e})".splitlines()[0], flush=True)
    return {k: (m.to(device), f) for k, (m, f) in models.items()}


def _timm(ours, name: str, img: int):
    import timm

    tm = timm.create_model(ours_alias(name), pretrained=False, num_classes=0, img_size=img)
    tm.load_state_dict(official_to_timm(ours.state_dict()), strict=True)
    # call the module itself (not .forward_features): torch.compile wraps __call__/forward only.
    # With num_classes=0 timm's forward returns the normed CLS token (global_pool="token").
    return tm.eval(), lambda m, x: m(x)


def _hf(ours, name: str, img: int):
    import transformers

    with tempfile.TemporaryDirectory() as d:
        save_hf_folder(ours, d)
        hf = transformers.Dinov2Model.from_pretrained(d, attn_implementation="sdpa")
    return hf.eval(), lambda m, x: m(pixel_values=x).last_hidden_state[:, 0]


def ours_alias(name: str) -> str:
    from dinolab.models import get_variant

    return get_variant(name).aliases[0]


def timeit(fn, x, device: str, warmup: int, iters: int, repeats: int = 3) -> tuple[float, float]:
    """Best-of-``repeats`` seconds per call after ``warmup`` calls, and peak memory in bytes."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() if device == "cpu" else contextlib.nullcontext() as rss:
        for _ in range(warmup):
            fn(x)
        sync()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(x)
            sync()
            best = min(best, (time.perf_counter() - t0) / iters)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    return best, peak


def run_size(size: str, args, out_json: Path, meta: dict, done: list[dict]) -> list[dict]:
    name = SIZES[size]
    peers = build_peers(name, args.device, args.runners, args.img)
    x = torch.randn(args.batch, 3, args.img, args.img, device=args.device)
    amp = args.dtype == "bf16"
    with torch.no_grad():
        ref = peers["ours"][1](peers["ours"][0], x).float()
    if amp and "ours" in args.runners:  # our pure-bf16 policy, measured beside the autocast ones
        m16 = copy.deepcopy(peers["ours"][0]).to(torch.bfloat16)
        peers["ours-bf16w"] = (m16, lambda m, x: m(x.to(torch.bfloat16)).cls_token)
    if amp and args.fast_mode:  # optimize_for_inference: bf16 weights + a tuned compile mode
        fast = optimize_for_inference(copy.deepcopy(peers["ours"][0]), compile=False)
        peers["ours-fast"] = (fast, lambda m, x: m(x.to(torch.bfloat16)).cls_token)
    rows = []
    for runner, (model, call) in peers.items():
        for mode in args.modes if runner != "ours-fast" else ["compile"]:
            t_start = time.perf_counter()
            if f"{runner}:{mode}" in args.skip:
                continue
            if time.perf_counter() - T0 > args.time_budget:
                print(f"skip {name} {runner} {mode}: time budget spent", flush=True)
                continue
            kw = {"mode": args.fast_mode} if runner == "ours-fast" else {}
            target = torch.compile(model, **kw) if mode == "compile" else model
            use_amp = amp and not runner.startswith(("ours-bf16w", "ours-fast"))

            def fn(inp, target=target, call=call, use_amp=use_amp):
                with torch.inference_mode(), torch.autocast(args.device, torch.bfloat16, enabled=use_amp):
                    return call(target, inp)

            try:
                sec, peak = timeit(fn, x, args.device, args.warmup, args.iters)
                out = fn(x).float()
                diff = (out - ref).abs().max().item()
                cos = torch.nn.functional.cosine_similarity(out, ref).min().item()
            except Exception as e:  # a peer that fails to compile is reported, not fatal
                print(f"{name} {runner} {mode}: FAILED {type(e).__name__}: {e}".splitlines()[0], flush=True)
                continue
            row = {"model": name, "runner": runner, "mode": mode, "img_s": args.batch / sec, "ms": sec * 1e3,
                       "peak_mib": peak / 2**20, "max_abs_diff_cls": diff, "min_cos_cls": cos, "setup_s": time.perf_counter() - t_start}
            rows.append(row)
            add_ratios(done + rows)
            out_json.write_text(json.dumps({"meta": meta, "rows": done + rows}, indent=1))  # survives a kill
            print(f"{name:14s} {runner:10s} {mode:8s} {row['img_s']:10.1f} img/s  {row['peak_mib']:9.0f} MiB  "
                  f"diff {diff:.2e} cos {cos:.5f}  ({row['setup_s']:.0f}s)", flush=True)
    del peers
    return rows


def add_ratios(rows: list[dict]) -> None:
    """ratio = img/s over the fastest peer (timm / hf) of the same model and mode."""
    for r in rows:
        peers = [p["img_s"] for p in rows if p["model"] == r["model"] and p["mode"] == r["mode"]
                 and p["runner"] in ("timm", "hf")]
        r["vs_fastest_peer"] = r["img_s"] / max(peers) if peers else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="s,b,l", help="comma list of s,b,l,g (default s,b,l)")
    ap.add_argument("--runners", default="ours,timm,hf", help="comma list of ours,timm,hf")
    ap.add_argument("--modes", default="eager,compile", help="comma list of eager,compile")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--warmup", type=int, default=None, help="default: 10 on cuda, 2 on cpu")
    ap.add_argument("--iters", type=int, default=None, help="default: 20 on cuda, 3 on cpu")
    ap.add_argument("--fast-mode", default=None, help="also time optimize_for_inference with this "
                    "torch.compile mode (e.g. max-autotune-no-cudagraphs) as runner ours-fast (GPU, bf16)")
    ap.add_argument("--skip", default="", help="comma list of runner:mode pairs to leave out, e.g. hf:compile")
    ap.add_argument("--time-budget", type=float, default=1e9, help="skip remaining configs after this many s")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.iters = args.iters or (20 if cuda else 3)
    args.runners, args.modes, args.skip = args.runners.split(","), args.modes.split(","), args.skip.split(",")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"device {device_name}, torch {torch.__version__}, batch {args.batch}, {args.img}px, {args.dtype}", flush=True)
    out = args.json or Path(__file__).parent / "results" / f"forward-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device_name=device_name, torch=torch.__version__, python=sys.version.split()[0],
                **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    rows = []
    for size in args.models.split(","):
        rows += run_size(size, args, out, meta, rows)
    for r in rows:
        ratio = f"{r['vs_fastest_peer']:.2f}x" if r["vs_fastest_peer"] else "-"
        print(f"| {r['model']} | {r['runner']} | {r['mode']} | {r['img_s']:.0f} | {ratio} | {r['peak_mib']:.0f} |"
              f" {r['max_abs_diff_cls']:.1e} |")
    print(f"wrote {out}")


T0 = time.perf_counter()
if __name__ == "__main__":
    main()
