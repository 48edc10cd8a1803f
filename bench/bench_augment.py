"""Throughput of MultiViewAugment: views/s of the kornia pipeline and (on CUDA) the fused Triton kernel.

Cases (issue 4): 2 views, uint8 input; 32² output from 32² input (batch 512) and 224² output from
256² input (batch 256); presets simclr and byol (byol blurs: view 0 always, view 1 with p = 0.1).
The fused kernel is timed only on a CUDA device (under the CPU interpreter its speed means nothing).

    python bench/bench_augment.py                 # writes bench/results/augment-<device>-<date>.{json,md}
    python bench/bench_augment.py --quick         # smaller batches, for a smoke run
    pytest bench/bench_augment.py                 # pytest-benchmark versions of the small case
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Dict, List

import torch

from fastcl.augment import MultiViewAugment

RESULTS = Path(__file__).resolve().parent / "results"
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
        rows.append(dict(preset=preset, backend=backend, size=size, input_size=in_size, batch=batch, views=2,
                         **result))
    return rows


def environment(device: torch.device) -> Dict[str, str]:
    import kornia

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
            platform.machine(), "torch": torch.__version__, "kornia": kornia.__version__,
            "threads": str(torch.get_num_threads()), "load_average_1min": f"{os.getloadavg()[0]:.1f}",
            "cpu_count": str(os.cpu_count()), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    return info


def to_markdown(env: Dict[str, str], rows: List[Dict[str, object]]) -> str:
    lines = [f"# MultiViewAugment throughput ({env['device']})", "",
             ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| preset | backend | input → output | batch | views/s | ms / call | reps |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['backend']} | {r['input_size']}² → {r['size']}² | {r['batch']} | "
                     f"{r['views_per_s']:.0f} | {1000 * r['seconds_per_call']:.1f} | {r['reps']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="batches / 16 (smoke run; not for the README)")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timed calls per case")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is steadier on a shared, loaded machine)")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default bench/results/augment-...)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = run(device, args.quick, args.min_time)
    env = environment(device)  # after the run, so the load average covers it
    suffix = f"-t{torch.get_num_threads()}" + ("-quick" if args.quick else "")
    stem = args.out or RESULTS / f"augment-{device.type}-{env['date'][:10]}{suffix}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    markdown = to_markdown(env, rows)
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)


# ---------------------------------------------------------------- pytest-benchmark (small case)


def _small_case(backend: str, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    return MultiViewAugment("simclr", size=32, views=2, backend=backend, generator=g), x


def test_kornia_pipeline_32px(benchmark):
    aug, x = _small_case("kornia", torch.device("cpu"))
    views = benchmark(aug, x)
    assert views.shape == (64, 2, 3, 32, 32)


def test_fused_pipeline_32px(benchmark):
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("the fused kernel is only timed on CUDA")
    aug, x = _small_case("triton", torch.device("cuda"))

    def call():
        out = aug(x)
        torch.cuda.synchronize()
        return out

    assert benchmark(call).shape == (64, 2, 3, 32, 32)


if __name__ == "__main__":
    main()
