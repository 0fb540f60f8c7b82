"""Load test of ``dinolab serve``: N concurrent clients against ``POST /v1/embed`` for M seconds.

The server is started as the real command line (``python -m dinolab serve``) in a child process on a
free loopback port, so the numbers include HTTP, multipart parsing, image decoding and the model
queue. Clients are threads of this process, each with its own keep-alive connection, uploading the
same JPEG (a scikit-image sample photo) in a loop. Reported: requests/s, latency p50/p90/p99, errors
(must be 0: every non-200 answer or transport failure counts) and the server's peak resident memory
(``VmHWM`` from ``/proc``, Linux).

    python benchmarks/serve_load.py                                  # random ViT-Ti/14, 4 clients, 15 s
    python benchmarks/serve_load.py --model dinov2_vits14 --clients 8 --seconds 30
    python benchmarks/serve_load.py --model runs/x/teacher_backbone.pth --short-side 224

Bounded on purpose: loopback only, at most 64 clients and 300 s. JSON goes to ``--out``
(default benchmarks/results/serve_load.json).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from dinolab.io import atomic_write_json

HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def proc_memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of a process in bytes; empty off Linux or after it exited."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (ln.split(":", 1) for ln in lines)
    return {k: int(v.split()[0]) * 1024 for k, v in fields if k in ("VmRSS", "VmHWM")}


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dinolab", "serve", "--host", HOST, "--port", str(port),
           "--model", args.model, "--max-queue", str(args.max_queue), "--timeout", str(args.timeout)]
    if args.model == "tiny":
        cmd[cmd.index("tiny")] = "vit_tiny_patch14"
    if args.model == "tiny" or args.random_init:
        cmd += ["--random-init"]
    if args.short_side:
        cmd += ["--short-side", str(args.short_side)]
    if args.device:
        cmd += ["--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else None
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"the server did not answer /healthz within {timeout:.0f} s")


def jpeg_of(photo_id: str) -> bytes:
    from dinolab.serve.gallery import load_photo

    buf = io.BytesIO()
    load_photo(photo_id).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def run_clients(url: str, body: bytes, clients: int,
                seconds: float) -> tuple[list[float], dict[str, int], float]:
    """Latencies (s) of successful requests, error counts by kind, and the wall time."""
    import httpx
    from tqdm.auto import tqdm

    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = c.post("v1/embed", files={"image": ("photo.jpg", body, "image/jpeg")})
                    kind = None if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    kind = type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    if kind is None:
                        latencies.append(dt)
                    else:
                        errors[kind] = errors.get(kind, 0) + 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    with tqdm(total=int(seconds), unit="s", desc=f"{clients} clients") as bar:
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            bar.n = min(int(time.monotonic() - t0), int(seconds))
            bar.set_postfix(ok=len(latencies), errors=sum(errors.values()))
            bar.refresh()
    return latencies, errors, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (random ViT-Ti/14) or what dinolab serve accepts")
    ap.add_argument("--random-init", action="store_true", help="random weights for a named --model")
    ap.add_argument("--short-side", type=int, help="inference short side (default: 32 patches)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--photo", default="astronaut", help="scikit-image sample photo uploaded by every client")
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--device", help="server device (default: cuda when available)")
    ap.add_argument("--server-threads", type=int, help="OMP_NUM_THREADS of the server (default: unset)")
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the server")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.seconds <= 300:
        ap.error("keep it bounded: 1-64 clients, 1-300 seconds")
    port = free_port()
    url = f"http://{HOST}:{port}/"
    proc = start_server(args, port)
    try:
        wait_ready(proc, url, args.ready_timeout)
        body = jpeg_of(args.photo)
        _, warm_err, _ = run_clients(url, body, 1, 3)  # first calls: allocations, caches
        idle = proc_memory(proc.pid)
        lat, errors, wall = run_clients(url, body, args.clients, args.seconds)
        mem = proc_memory(proc.pid)
        import httpx

        models = httpx.get(url + "v1/models").json()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    ms = np.array(lat) * 1000
    m = models["models"][0]
    res = {
        "endpoint": "POST /v1/embed", "clients": args.clients, "seconds": round(wall, 2), "photo": args.photo,
        "upload_bytes": len(body),
        "model": {k: m[k] for k in ("name", "kind", "patch_size", "embed_dim", "depth", "short_side")},
        "requests": len(lat), "requests_per_s": round(len(lat) / wall, 2),
        "latency_ms": {f"p{p}": round(float(np.percentile(ms, p)), 1) for p in (50, 90, 99)} if len(ms)
        else {},
        "errors": sum(errors.values()), "errors_by_kind": errors,
        "warmup_errors": sum(warm_err.values()),
        "server_rss_mib": {"after_warmup": round(idle.get("VmRSS", 0) / 2**20, 1),
                           "peak": round(mem.get("VmHWM", 0) / 2**20, 1)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
    }
    atomic_write_json(args.out, res)
    lq = res["latency_ms"]
    print(f"{res['requests']} requests in {wall:.1f} s = {res['requests_per_s']} req/s with {args.clients} "
          f"clients; latency p50 {lq.get('p50')} ms, p99 {lq.get('p99')} ms; errors {res['errors']}; "
          f"server peak RSS {res['server_rss_mib']['peak']} MiB -> {args.out}")
    return 0 if res["errors"] == 0 and res["warmup_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
