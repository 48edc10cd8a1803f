"""Augmentation throughput: writes bench/results/augment-<device>-<date>.{json,md} (see fastcl.augment.bench).

python bench/bench_augment.py                 # writes bench/results/augment-<device>-<date>.{json,md}
python bench/bench_augment.py --quick         # smaller batches, for a smoke run
pytest bench/bench_augment.py                 # pytest-benchmark versions of the small case
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastcl.augment import MultiViewAugment
from fastcl.augment.bench import environment, run, to_markdown

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description="Augmentation throughput (fastcl.augment.bench)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="batches / 16 (smoke run; not for the README)")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timed calls per case")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (1 is steadier on a shared, loaded machine)"
    )
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
