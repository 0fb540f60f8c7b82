"""Pretraining step throughput and peak memory of the official recipes, one process, synthetic crops.

Measures the full training step of ``dinolab train`` (teacher forward, student forward on masked
global crops and on local crops, DINO + iBOT + KoLeo, backward, gradient clipping, AdamW, EMA) on
random crops already on the device, so data loading is not part of the number; images/s counts
images (each with 2 global + n local crops), as the issue's reference figures do.

    python benchmarks/train_throughput.py --device cuda --presets vits14:64,vitl14:32 --modes eager,compile
    python benchmarks/train_throughput.py --device cuda --presets vitl14:32 --modes compile,compile+packed
    python benchmarks/train_throughput.py --device cpu --presets small-cpu:32 --modes eager,packed --repeats 3

Preset models and crop sizes come from ``dinolab/configs/train/<preset>.yaml`` (vits14/vitl14: 2 x 224
+ 8 x 98, patch 14, 65,536 prototypes, bf16 autocast on CUDA). ``--modes``: eager, compile (every
block compiled), ckpt (activation checkpointing), packed (the student's global and local crops in
one packed pass, ``train.packed_crops``; without it two passes), joined with ``+``. ``ratio`` is
each mode's images/s over the first mode's, same preset, same run. ``--repeats`` cycles through
the modes that many times and keeps each mode's median (noisy machines). Results in ``--json``
(default benchmarks/results/train_throughput-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from dinolab.config import load_config, patch_size
from dinolab.data.collate import collate_multicrop
from dinolab.train.build import build_arch, build_optimizer
from dinolab.train.optim import apply_schedules
from dinolab.train.parallelize import parallelize


def _batch(cfg, batch: int, device: torch.device) -> dict:
    c, p = cfg.crops, patch_size(cfg.model)
    g = torch.Generator().manual_seed(0)
    samples = [{"global": [torch.randn(3, c.global_size, c.global_size, generator=g) for _ in range(2)],
                "local": [torch.randn(3, c.local_size, c.local_size, generator=g) for _ in range(c.n_local)]}
               for _ in range(batch)]
    out = collate_multicrop(samples, grid=(c.global_size // p,) * 2, rng=np.random.default_rng(0))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


MODE_PARTS = {"eager", "compile", "ckpt", "packed"}


def run_one(preset: str, batch: int, mode: str, device: torch.device, iters: int, warmup: int) -> dict:
    parts = set(mode.split("+"))
    if not parts <= MODE_PARTS:
        raise SystemExit(f"unknown mode {mode!r}: join {sorted(MODE_PARTS)} with '+'")
    cfg = load_config(preset, ["train.packed_crops=true"] if "packed" in parts else [])
    torch.manual_seed(0)
    arch = parallelize(build_arch(cfg), device=device, mode="none", compile="compile" in parts,
                       activation_checkpointing="ckpt" in parts)
    optimizer = build_optimizer(cfg, arch)
    apply_schedules(optimizer, 1e-4, 0.04, 1e-4)
    data = _batch(cfg, batch, device)
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    cuda = device.type == "cuda"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with amp:
            arch.forward_backward(data, teacher_temp=0.04)
        torch.nn.utils.clip_grad_norm_(arch.student.parameters(), 3.0)
        optimizer.step()
        arch.update_teacher(0.994)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / iters
    res = {"preset": preset, "arch": cfg.model.arch, "batch": batch, "mode": mode,
           "crops": f"2x{cfg.crops.global_size} + {cfg.crops.n_local}x{cfg.crops.local_size}",
           "images_per_s": batch / sec, "step_s": sec, "warmup_s": warm_s}
    if cuda:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res  # arch, optimizer and data are freed with this frame; main() empties the CUDA cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default="vits14:64,vitl14:32", help="preset:batch,... (training presets)")
    ap.add_argument("--modes", default="eager,compile",
                    help="comma-separated; each joins eager|compile, ckpt, packed with '+' (e.g. compile+packed)")
    ap.add_argument("--iters", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--repeats", type=int, default=1, help="cycle through the modes this many times; median")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for item in args.presets.split(","):
        preset, batch = item.split(":")
        modes = args.modes.split(",")
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.repeats):  # modes alternate, so slow phases of a noisy machine hit them all
            for mode in modes:
                try:
                    r = run_one(preset, int(batch), mode, device, args.iters, args.warmup)
                except torch.OutOfMemoryError as e:
                    r = {"preset": preset, "batch": int(batch), "mode": mode, "error": f"OOM: {e}"[:200]}
                except Exception as e:  # noqa: BLE001 - a mode that fails (e.g. compile) must not lose the others
                    r = {"preset": preset, "batch": int(batch), "mode": mode,
                         "error": f"{type(e).__name__}: {e}"[:300]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                runs[mode].append(r)
                print(json.dumps(r), flush=True)
        for mode in modes:
            ok = [r for r in runs[mode] if "images_per_s" in r]
            if not ok:
                rows.append(runs[mode][0])
                continue
            r = dict(sorted(ok, key=lambda r: r["images_per_s"])[len(ok) // 2])  # median run
            r["images_per_s_all"] = [round(x["images_per_s"], 2) for x in ok]
            rows.append(r)
        first = rows[-len(modes)].get("images_per_s")
        for r in rows[-len(modes):]:
            if first and "images_per_s" in r:
                r["ratio"] = r["images_per_s"] / first
    machine = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"\n{machine}, torch {torch.__version__}")
    print(f"{'preset':10} {'batch':>5} {'mode':16} {'img/s':>8} {'ratio':>6} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['preset']:10} {r['batch']:5d} {r['mode']:16} {r.get('images_per_s', float('nan')):8.1f} "
              f"{r.get('ratio', float('nan')):6.2f} {r.get('peak_gib', float('nan')):9.1f}")
    out = args.json or Path(__file__).parent / "results" / f"train_throughput-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "torch": torch.__version__, "command": " ".join(sys.argv),
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
