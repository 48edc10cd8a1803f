"""Throughput of MultiViewAugment: views/s of the kornia pipeline and (on CUDA) the fused Triton kernel.

Cases (issue 4): 2 views, uint8 input; 32² output from 32² input (batch 512) and 224² output from
256² input (batch 256); presets simclr and byol (byol blurs: view 0 always, view 1 with p = 0.1).
The fused kernel is timed only on a CUDA device (under the CPU interpreter its speed means nothing).
Used by ``fastcl bench --augment`` and ``bench/bench_augment.py``.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Dict, List

import torch

from fastcl.augment import MultiViewAugment

CASES = [  # (output size, input size, batch)
    (32, 32, 512),
    (224, 256, 256),
]
PRESETS = ("simclr", "byol")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(aug: MultiViewAugment, x: torch.Tensor, min_time: float, max_reps: int) -> Dict[str, float]:
    """Median seconds per call over repeated calls (one warm-up call first), and views/s from it."""
    aug(x)
    _sync(x.device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 3):
        t0 = time.perf_counter()
        aug(x)
        _sync(x.device)
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"seconds_per_call": median, "views_per_s": x.shape[0] * aug.views / median, "reps": len(times)}


def run(device: torch.device, quick: bool, min_time: float) -> List[Dict[str, object]]:
    from tqdm import tqdm

    backends = ["kornia"] + (["triton"] if device.type == "cuda" else [])
    jobs = [(p, c, b) for p in PRESETS for c in CASES for b in backends]
    rows = []
    for preset, (size, in_size, batch), backend in tqdm(jobs, desc="augment bench"):
        batch = max(8, batch // 16) if quick else batch
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (batch, 3, in_size, in_size), dtype=torch.uint8, generator=g).to(device)
        aug = MultiViewAugment(preset, size=size, views=2, backend=backend, generator=g)
        result = measure(aug, x, min_time=min_time, max_reps=50)
        rows.append(dict(preset=preset, backend=backend, size=size, input_size=in_size, batch=batch, views=2, **result))
    return rows


def environment(device: torch.device) -> Dict[str, str]:
    import kornia

    info = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "kornia": kornia.__version__,
        "threads": str(torch.get_num_threads()),
        "load_average_1min": f"{os.getloadavg()[0]:.1f}",
        "cpu_count": str(os.cpu_count()),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    return info


def to_markdown(env: Dict[str, str], rows: List[Dict[str, object]]) -> str:
    lines = [
        f"# MultiViewAugment throughput ({env['device']})",
        "",
        ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "| preset | backend | input → output | batch | views/s | ms / call | reps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['backend']} | {r['input_size']}² → {r['size']}² | {r['batch']} | "
            f"{r['views_per_s']:.0f} | {1000 * r['seconds_per_call']:.1f} | {r['reps']} |"
        )
    return "\n".join(lines) + "\n"
