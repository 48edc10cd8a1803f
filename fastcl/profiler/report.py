"""Output of a benchmark run: the stdout / markdown table, the JSON file and the log-log plot."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["RECORD_FIELDS", "format_table", "write_json", "write_markdown", "write_plot"]

# Every record carries these keys (None where a value does not exist, e.g. for a skipped impl).
RECORD_FIELDS = (
    "loss", "impl", "M", "D", "sub_dim", "dtype", "device", "status", "note",
    "fwd_ms", "bwd_ms", "total_ms", "peak_mem_bytes", "flops", "tflops",
    "ratio_vs_naive", "mem_ratio_vs_naive", "matmul_tflops", "fraction_of_matmul", "loadavg_1min",
)

_COLUMNS = (
    ("loss", "loss", "{}"),
    ("impl", "impl", "{}"),
    ("M", "M", "{}"),
    ("fwd_ms", "fwd ms", "{:.2f}"),
    ("bwd_ms", "bwd ms", "{:.2f}"),
    ("total_ms", "total ms", "{:.2f}"),
    ("peak_mem_bytes", "peak MiB", None),
    ("tflops", "TFLOP/s", "{:.4f}"),
    ("ratio_vs_naive", "time ×naive", "{:.2f}"),
    ("mem_ratio_vs_naive", "mem ×naive", "{:.3f}"),
    ("fraction_of_matmul", "% of matmul", None),
    ("loadavg_1min", "load", "{:.1f}"),
    ("status", "status", "{}"),
)


def _cell(record: dict, key: str, fmt: Optional[str]) -> str:
    value = record.get(key)
    if value is None:
        return "—"
    if key == "peak_mem_bytes":
        return f"{value / 2**20:.1f}"
    if key == "fraction_of_matmul":
        return f"{100 * value:.1f}"
    if key == "status" and record.get("note"):
        note = record["note"]
        return f"{value}: {note if len(note) <= 90 else note[:87] + '...'}"
    return fmt.format(value)


def format_table(records: Sequence[dict], markdown: bool = False) -> str:
    """Side-by-side table, one row per (loss, impl, M)."""
    header = [title for _, title, _ in _COLUMNS]
    rows = [[_cell(r, key, fmt) for key, _, fmt in _COLUMNS] for r in records]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines)
    # The free-text status column goes last and is not padded.
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt_row = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]  # noqa: E731
    return "\n".join([fmt_row(header)] + [fmt_row(row) for row in rows])


def write_json(path: str | Path, meta: dict, records: Sequence[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "records": list(records)}, indent=2) + "\n")


def write_markdown(path: str | Path, meta: dict, records: Sequence[dict], command: str) -> None:
    """The results file committed under bench/results/: provenance, then the table."""
    lines = [
        f"# fastcl bench — {meta['device_name']} — {meta['date']}",
        "",
        f"- device: {meta['device']} ({meta['device_name']}), threads: {meta['threads']}",
        f"- versions: python {meta['python']}, torch {meta['torch']}, fastcl {meta['fastcl']}, "
        + ", ".join(f"{name} {version}" for name, version in meta["peers"].items()),
        f"- D = {meta['dim']}, sub_dim = {meta['sub_dim']}, dtype = {meta['dtype']}, "
        f"median of {meta['repeats']} after {meta['warmup']} warm-up",
        f"- command: `{command}`",
        f"- M mapping: {meta['size_mapping']}",
        f"- FLOP model: {meta['flop_model']}",
        f"- memory: {meta['memory_method']}; limit per case: "
        + (f"{meta['mem_limit'] / 2**30:.1f} GiB (beyond it: OOM)" if meta["mem_limit"] else "none"),
        f"- 1-min load average before / after the run: {meta['loadavg_1min_before']} / {meta['loadavg_1min_after']} "
        f"(above the thread count, other processes competed for the CPU during the run)",
        "- matmul ceiling, [M, D'] @ [D', M] timed in each case's worker (median over cases): "
        + ", ".join(f"M={m}: {t:.4f} TFLOP/s" if t else f"M={m}: —" for m, t in meta["matmul_tflops"].items()),
        "",
        format_table(records, markdown=True),
        "",
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))


def write_plot(path: str | Path, records: Sequence[dict], title: str) -> None:
    """Log-log time and peak memory vs M, one line per impl, one row of panels per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(dict.fromkeys(r["loss"] for r in records))
    fig, axes = plt.subplots(len(losses), 2, figsize=(11, 3.6 * len(losses)), squeeze=False)
    for row, loss in enumerate(losses):
        ok = [r for r in records if r["loss"] == loss and r["status"] == "ok"]
        ax_time, ax_mem = axes[row]
        for impl in dict.fromkeys(r["impl"] for r in ok):
            points = sorted((r["M"], r) for r in ok if r["impl"] == impl)
            ms = [m for m, _ in points]
            if any(r.get("total_ms") is not None for _, r in points):
                ax_time.plot(ms, [r["total_ms"] for _, r in points], marker="o", label=impl)
            ax_mem.plot(ms, [max(r["peak_mem_bytes"], 1) / 2**20 for _, r in points], marker="o", label=impl)
        ceiling_ms: dict[int, list[float]] = {}
        for r in ok:
            if r.get("matmul_tflops"):
                ceiling_ms.setdefault(r["M"], []).append(r["flops"] / (r["matmul_tflops"] * 1e9))
        if ceiling_ms:
            ms = sorted(ceiling_ms)
            ax_time.plot(ms, [statistics.median(ceiling_ms[m]) for m in ms], "k--", label="matmul, same FLOPs")
        for ax, ylabel in ((ax_time, "fwd+bwd median [ms]"), (ax_mem, "peak extra memory [MiB]")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("M (rows of the similarity)")
            ax.set_ylabel(ylabel)
            ax.set_title(loss)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
