"""Peak memory and time of one SimCLR training step with and without fastcl.GradCache, batch 256 → 8192.

The step is the reference trainer's (``fastcl train``): the ConvNet encoder with its MLP head, a batch of
B rows = two views of B/2 images encoded as one view-major input (``--batch-size B/2`` in ``fastcl train``),
NT-Xent (τ = 0.5) on the projections, a backward into every parameter. Uncached: one forward of all B rows
with a graph. Cached: ``GradCache(chunk_size=256)``
(BatchNorm per chunk, ``batchnorm="accept"``). Memory is the profiler's (docs/bench.md, "Memory": the peak
resident set of the step above the resident set right before it, allocator in exact mode), so the inputs
and the model count in neither figure and the gradients count in both. Time is the median of steady-state
steps (allocator in its steady mode), both modes in the same run, interleaved per batch.

    python bench/bench_gradcache.py                         # writes bench/results/gradcache-cpu-<date>.{json,md,png}
    python bench/bench_gradcache.py --batches 256 512 --out /tmp/gc   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import fastcl
from fastcl.models import ContrastiveModel, build_encoder
from fastcl.profiler.measure import _CpuPeak, _steady_allocator, loadavg
from fastcl.profiler.runner import environment

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.3  # the cached step's peak may be at most this multiple of the (uncached) batch-256 step's


def build(encoder: str, seed: int = 0):
    torch.manual_seed(seed)
    model = ContrastiveModel(build_encoder(encoder), "mlp", proj_dim=128)
    return model, fastcl.NTXentLoss(temperature=0.5)


def make_step(model, loss_fn, batch: int, chunk):
    """One training step's forward and backward on ``batch`` rows (two views, view-major), as a closure."""
    x = torch.randn(batch, 3, 32, 32)

    def loss_of_z(z):
        return loss_fn(*z.chunk(2))

    if chunk is None:

        def step():
            model.zero_grad(set_to_none=True)
            loss = loss_of_z(model(x)[1])
            loss.backward()
            return loss.detach()
    else:
        cache = fastcl.GradCache(lambda rows: model(rows)[1], loss_of_z, chunk, batchnorm="accept")

        def step():
            model.zero_grad(set_to_none=True)
            return cache(x)

    return step


def measure(model, loss_fn, batch: int, chunk, repeats: int) -> dict:
    step = make_step(model, loss_fn, batch, chunk)
    _steady_allocator()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    gc.collect()
    meter = _CpuPeak()
    with meter.measure():
        step()
    return {
        "batch_rows": batch,
        "images": batch // 2,
        "chunk_size": chunk,
        "peak_mem_bytes": int(meter.peak),
        "step_s": statistics.median(times),
        "runs": len(times),
        "loadavg_1min": loadavg(),
    }


def to_markdown(env: dict, rows: list[dict], command: str) -> str:
    base = min((r for r in rows if r["chunk_size"] is None), key=lambda r: r["batch_rows"])  # the plain step
    by_batch = {}
    for r in rows:
        by_batch.setdefault(r["batch_rows"], {})["cached" if r["chunk_size"] else "uncached"] = r
    lines = [
        f"# GradCache: peak memory and time of one SimCLR step ({env['encoder']}, CPU)",
        "",
        f"Command: `{command}`  ",
        f"Device: {env['device_name']}, {env['threads']} threads; torch {env['torch']}, fastcl {env['fastcl']}, "
        f"Python {env['python']}; {env['date']}.  ",
        f"Load average (1 min) before / after the run: {env['loadavg_before']} / {env['loadavg_after']} "
        f"on {env['cpu_count']} cores — the machine was shared with other jobs, so the times are noisy; the "
        "memory figures do not depend on load.  ",
        f"Memory: {env['memory_method']}",
        "",
        f"Step: a batch of B rows of 3×32×32 (two views of B/2 images) through the {env['encoder']} + MLP head, "
        "NT-Xent on z, backward. "
        f"Cached: `fastcl.GradCache(chunk_size={rows[-1]['chunk_size']})`. Target: cached peak ≤ {TARGET}× the "
        f"plain batch-{base['batch_rows']} step's.",
        "",
        "| batch B (rows) | uncached peak MiB | cached peak MiB | cached / uncached memory "
        f"| cached / uncached B={base['batch_rows']} "
        "| uncached s | cached s | cached / uncached time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, pair in sorted(by_batch.items()):
        u, c = pair.get("uncached"), pair.get("cached")
        lines.append(
            f"| {batch} | {u['peak_mem_bytes'] / 2**20:.0f} | {c['peak_mem_bytes'] / 2**20:.0f} "
            f"| {c['peak_mem_bytes'] / u['peak_mem_bytes']:.3f} | {c['peak_mem_bytes'] / base['peak_mem_bytes']:.2f}× "
            f"| {u['step_s']:.2f} | {c['step_s']:.2f} | {c['step_s'] / u['step_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, tim) = plt.subplots(1, 2, figsize=(11, 4))
    chunk = rows[-1]["chunk_size"]
    for label, cached in (("uncached", False), (f"GradCache (chunk {chunk})", True)):
        sel = sorted((r for r in rows if (r["chunk_size"] is not None) == cached), key=lambda r: r["batch_rows"])
        mem.plot([r["batch_rows"] for r in sel], [r["peak_mem_bytes"] / 2**20 for r in sel], "o-", label=label)
    cached = sorted((r for r in rows if r["chunk_size"] is not None), key=lambda r: r["batch_rows"])
    base = min((r for r in rows if r["chunk_size"] is None), key=lambda r: r["batch_rows"])
    target = f"{TARGET}× the plain B={base['batch_rows']} step"
    mem.axhline(TARGET * base["peak_mem_bytes"] / 2**20, ls="--", c="gray", label=target)
    mem.set(
        xscale="log",
        yscale="log",
        xlabel="batch B (rows: two views of B/2 images)",
        ylabel="peak MiB",
        title="peak memory",
    )
    mem.set_xticks([r["batch_rows"] for r in cached], [str(r["batch_rows"]) for r in cached])
    mem.minorticks_off()
    mib = [r["peak_mem_bytes"] / 2**20 for r in rows]
    ticks = [2**k for k in range(int(math.log2(min(mib))), int(math.log2(max(mib))) + 2)]
    mem.set_yticks(ticks, [str(t) for t in ticks])
    mem.legend()
    uncached = {r["batch_rows"]: r for r in rows if r["chunk_size"] is None}
    tim.plot(
        [r["batch_rows"] for r in cached], [r["step_s"] / uncached[r["batch_rows"]]["step_s"] for r in cached], "o-"
    )
    tim.set(xscale="log", xlabel="batch B (rows)", ylabel="cached / uncached step time", title="time ratio (same run)")
    tim.set_xticks([r["batch_rows"] for r in cached], [str(r["batch_rows"]) for r in cached])
    tim.minorticks_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="convnet", choices=("convnet", "resnet18"))
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192], help="rows per step (even)"
    )
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case up to batch 2048, then 1")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default bench/results/gradcache-...)")
    parser.add_argument(
        "--memory-model", action="store_true", help="write the per-GPU memory model (ResNet-50, ViT-B) instead"
    )
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    if args.memory_model:
        model = memory_model(args.chunk)
        stem = args.out or RESULTS / "gradcache-memory-model"
        stem.with_suffix(".json").write_text(json.dumps({"command": command, **model}, indent=2) + "\n")
        stem.with_suffix(".md").write_text(memory_model_markdown(model, command))
        print(stem.with_suffix(".md").read_text())
        return
    model, loss_fn = build(args.encoder)
    before = loadavg()
    make_step(model, loss_fn, args.batches[0], args.chunk)()  # warm-up: thread pools, first-call costs
    make_step(model, loss_fn, args.batches[0], None)()
    rows = []
    for batch in args.batches:
        repeats = args.repeats if batch <= 2048 else 1  # the large steps take minutes on a small CPU
        for chunk in (None, args.chunk):
            rows.append(measure(model, loss_fn, batch, chunk, repeats))
            print(json.dumps(rows[-1]), flush=True)
    env = environment("cpu") | {"encoder": args.encoder, "loadavg_before": before, "loadavg_after": loadavg()}
    stem = args.out or RESULTS / f"gradcache-cpu-{env['date'][:10]}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"environment": env, "command": command, "results": rows}, indent=2) + "\n"
    )
    markdown = to_markdown(env, rows, command)
    stem.with_suffix(".md").write_text(markdown)
    plot(rows, stem.with_suffix(".png"), f"one SimCLR step, {args.encoder}, CPU")
    print(markdown)


# ---------------------------------------------------------------- per-GPU memory model (docs/gradcache.md)


def imagenet_resnet50() -> torch.nn.Module:
    """torchvision's ResNet-50 topology from fastcl's CIFAR ResNet: the 7×7/2 stem and max-pool restored."""
    from torch import nn

    net = build_encoder("resnet50")
    net.stem = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
    )
    return net


def vit_b16() -> torch.nn.Module:
    """ViT-B/16 at 224 px (86 M parameters): patch embedding, 12 pre-norm blocks (SDPA attention), class token."""
    from torch import nn

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 768, 16, 16)
            self.cls = nn.Parameter(torch.zeros(1, 1, 768))
            self.pos = nn.Parameter(torch.zeros(1, 197, 768))
            layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, activation="gelu", batch_first=True)
            layer.norm_first = True
            self.blocks = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(768)

        def forward(self, x):
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1) + self.pos
            return self.norm(self.blocks(tokens))[:, 0]

    return ViT()


def saved_activation_bytes(net: torch.nn.Module, images: int) -> int:
    """Bytes of the tensors autograd saves for the backward of one bf16-autocast forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(images, 3, 224, 224))
    return sum(storages.values())


def memory_model(chunk: int, dim: int = 128) -> dict:
    """Per-GPU bytes of one SimCLR step (two views) with and without GradCache; a model, see docs/gradcache.md."""
    from fastcl.distributed import scaling_model

    nets = {"ResNet-50": (imagenet_resnet50(), 12), "ViT-B/16": (vit_b16(), 16)}  # optimizer bytes per parameter
    setups = [("one GPU", 65536, 1), ("64 GPUs, ring", 1 << 20, 64)]
    out = {"chunk_rows": chunk, "dim": dim, "nets": {}, "rows": []}
    for name, (net, state_per_param) in nets.items():
        net.train()
        small, large = saved_activation_bytes(net, 2), saved_activation_bytes(net, 4)
        per_image, per_step = (large - small) // 2, small - (large - small)  # slope; intercept: bf16 weight casts
        n_params = sum(p.numel() for p in net.parameters())
        out["nets"][name] = {"params": n_params, "activation_bytes_per_row": per_image, "per_step_bytes": per_step}
        weights = n_params * state_per_param + per_step
        for setup, images, world in setups:
            rows = 2 * images // world  # two views per image, this rank's rows
            loss = scaling_model(2 * images, world, dim, element_bytes=2)["ring" if world > 1 else "gather"]
            loss_bytes = loss["held_bytes"] + loss["tile_bytes"] if world > 1 else loss["tile_bytes"] + 4 * rows * dim
            embeddings = rows * dim * (2 + 2)  # the cached bf16 embeddings and their gradient
            out["rows"].append(
                {
                    "net": name,
                    "setup": setup,
                    "images": images,
                    "world": world,
                    "rows_per_gpu": rows,
                    "weights_grads_optimizer": weights,
                    "activations_uncached": rows * per_image,
                    "activations_cached": min(chunk, rows) * per_image,
                    "embeddings": embeddings,
                    "loss": loss_bytes,
                    "loss_gemm_flops": loss["gemm_flops"],
                }
            )
    return out


def memory_model_markdown(model: dict, command: str) -> str:
    gib = 2**30
    lines = [
        "# GradCache: per-GPU memory MODEL of one SimCLR step (not a measurement)",
        "",
        f"Command: `{command}`. Chunk: {model['chunk_rows']} rows; embeddings D = {model['dim']}, bf16.",
        "",
        "| net | parameters | saved activations per row (bf16 autocast, 224 px, counted on the CPU) |",
        "|---|---|---|",
    ]
    for name, net in model["nets"].items():
        lines.append(f"| {name} | {net['params'] / 1e6:.1f} M | {net['activation_bytes_per_row'] / 2**20:.1f} MiB |")
    lines += [
        "",
        "| net | setup | rows per GPU | weights + grads + optimizer | activations, uncached → GradCache "
        "| embeddings + grads | loss "
        "| total, uncached | total, GradCache | loss TFLOP per GPU (FLOP model) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in model["rows"]:
        fixed = r["weights_grads_optimizer"] + r["embeddings"] + r["loss"]
        lines.append(
            f"| {r['net']} | {r['setup']} ({r['images']:,} images) | {r['rows_per_gpu']:,} "
            f"| {r['weights_grads_optimizer'] / gib:.2f} GiB "
            f"| {r['activations_uncached'] / gib:,.0f} GiB → {r['activations_cached'] / gib:.1f} GiB "
            f"| {r['embeddings'] / gib:.3f} GiB | {r['loss'] / gib:.3f} GiB "
            f"| {(fixed + r['activations_uncached']) / gib:,.0f} GiB "
            f"| {(fixed + r['activations_cached']) / gib:.1f} GiB | {r['loss_gemm_flops'] / 1e12:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
