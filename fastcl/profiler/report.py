"""Output of a benchmark run: streamed table rows, the side-by-side summary, JSON, markdown and the plot.

>>> row = dict.fromkeys(RECORD_FIELDS)
>>> row.update(loss="nt_xent", impl="torch", M=1024, status="ok", total_ms=1.5, fraction_of_matmul=1.2,
...            above_ceiling=True)
>>> "120.0!" in format_row(row)
True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

__all__ = [
    "RECORD_FIELDS",
    "format_header",
    "format_row",
    "format_table",
    "format_summary",
    "format_notes",
    "ROW_WIDTH",
    "write_json",
    "write_markdown",
    "write_plot",
]

# Every record carries these keys (None where a value does not exist, e.g. for a skipped impl).
RECORD_FIELDS = (
    "loss",
    "impl",
    "M",
    "D",
    "sub_dim",
    "dtype",
    "device",
    "status",
    "note",
    "fwd_ms",
    "bwd_ms",
    "total_ms",
    "runs",
    "peak_mem_bytes",
    "flops",
    "tflops",
    "ratio_vs_naive",
    "mem_ratio_vs_naive",
    "matmul_tflops",
    "fraction_of_matmul",
    "above_ceiling",
    "loadavg_1min",
)

# (record key, title, width in the streamed table, format). The widths add up to at most 120 columns with the
# status word; a non-ok row's note is printed below the table (format_notes), not in the row.
ROW_WIDTH = 120
_COLUMNS = (
    ("loss", "loss", 8, "{}"),
    ("impl", "impl", 7, "{}"),
    ("M", "M", 6, "{}"),
    ("fwd_ms", "fwd ms", 8, "{:.2f}"),
    ("bwd_ms", "bwd ms", 8, "{:.2f}"),
    ("total_ms", "total ms", 8, "{:.2f}"),
    ("peak_mem_bytes", "peak MiB", 8, None),
    ("tflops", "TFLOP/s", 7, None),
    ("ratio_vs_naive", "t×naive", 7, "{:.2f}"),
    ("mem_ratio_vs_naive", "mem×naive", 9, "{:.3f}"),
    ("fraction_of_matmul", "%matmul", 7, None),
    ("loadavg_1min", "load", 4, "{:.1f}"),
    ("status", "status", 0, "{}"),
)


def _cell(record: dict, key: str, fmt: Optional[str], note: bool = True) -> str:
    value = record.get(key)
    if value is None:
        return "—"
    if key == "peak_mem_bytes":
        return f"{value / 2**20:.1f}"
    if key == "fraction_of_matmul":  # "!" marks a rate above the matmul ceiling (see the row's note)
        percent = 100 * value
        return (f"{percent:.1f}" if percent < 1000 else f"{percent:.0f}") + ("!" if record.get("above_ceiling") else "")
    if key == "tflops":  # at most 7 characters, from a tiny CPU case to a GPU's peak
        return f"{value:.0f}" if value >= 1000 else f"{value:.3g}" if value >= 1e-3 else f"{value:.1e}"
    if key == "status" and note and record.get("note"):
        return f"{value}: {record['note']}"
    return fmt.format(value)


def _line(cells: Sequence[str]) -> str:
    # The free-text status column goes last and is not padded.
    return "  ".join(c.rjust(w) for c, (_, _, w, _) in zip(cells[:-1], _COLUMNS)) + "  " + cells[-1]


def format_header() -> str:
    """The streamed table's header line."""
    return _line([title for _, title, _, _ in _COLUMNS])


def format_row(record: dict) -> str:
    """One record as a line of the streamed table (fixed widths, so rows can be printed as they finish; at
    most ``ROW_WIDTH`` columns for the numbers of any CPU or GPU run: the note is left out)."""
    return _line([_cell(record, key, fmt, note=False) for key, _, _, fmt in _COLUMNS])


def format_notes(records: Sequence[dict]) -> list[str]:
    """Lines for below the table: each skipped implementation once with its reason, then each row that did
    not finish (error, OOM) with its note."""
    lines = []
    skipped: dict = {}
    for r in records:
        if r["status"] == "skipped":
            skipped.setdefault((r["impl"], r["note"]), []).append(r["loss"])
    for (impl, note), losses in skipped.items():
        losses = list(dict.fromkeys(losses))
        lines.append(f"skipped {impl} ({', '.join(losses)}): {note}")
    for r in records:
        if r["status"] not in ("ok", "skipped") and r.get("note"):
            lines.append(f"{r['status']}: {r['loss']} {r['impl']} M={r['M']}: {r['note']}")
    return lines


def _sorted(records: Sequence[dict]) -> list[dict]:
    losses = list(dict.fromkeys(r["loss"] for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    return sorted(records, key=lambda r: (losses.index(r["loss"]), r["M"], impls.index(r["impl"])))


def format_table(records: Sequence[dict], markdown: bool = False) -> str:
    """Every record, grouped by (loss, M); a markdown table when ``markdown``."""
    rows = _sorted(records)
    if not markdown:
        return "\n".join([format_header()] + [format_row(r) for r in rows])
    header = [title for _, title, _, _ in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [_cell(r, key, fmt).replace("|", "\\|") for key, _, _, fmt in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _summary_cell(record: Optional[dict]) -> str:
    if record is None:
        return ""
    if record["status"] != "ok" or record.get("total_ms") is None:
        return record["status"]
    parts = [f"{record['total_ms']:.2f} ms"]
    if record.get("ratio_vs_naive") is not None and record["impl"] != "naive":
        parts.append(f"{record['ratio_vs_naive']:.2f}×")
    if record.get("fraction_of_matmul") is not None:
        parts.append(f"{100 * record['fraction_of_matmul']:.0f}%" + ("!" if record.get("above_ceiling") else ""))
    return " ".join(parts)


def format_summary(records: Sequence[dict], markdown: bool = False) -> str:
    """Side by side per (loss, M): each implementation's fwd+bwd time, its ratio to naive, its % of matmul."""
    # An implementation that ran nowhere gets no column (format_notes says why it was skipped).
    impls = list(dict.fromkeys(r["impl"] for r in records if r["status"] != "skipped"))
    keys = list(dict.fromkeys((r["loss"], r["M"]) for r in _sorted(records)))
    by_key = {(r["loss"], r["M"], r["impl"]): r for r in records}
    header = ["loss", "M", *impls]
    rows = [[loss, str(m), *(_summary_cell(by_key.get((loss, m, impl))) for impl in impls)] for loss, m in keys]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header, *rows])


def write_json(path: str | Path, meta: dict, records: Sequence[dict]) -> None:
    """``{"meta": meta, "records": records}``, indented; parent folders are created."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "records": list(records)}, indent=2) + "\n")


def _load_note(meta: dict) -> str:
    """Whether other processes competed for the CPU during the run, by the 1-min load averages."""
    loads = [v for v in (meta.get("loadavg_1min_before"), meta.get("loadavg_1min_after")) if v is not None]
    threads = meta.get("threads")
    if not loads or not threads:
        return "load unknown"
    if max(loads) > threads:
        return "above the thread count, other processes competed for the CPU"
    return "within the thread count"


def write_markdown(path: str | Path, meta: dict, records: Sequence[dict]) -> None:
    """Provenance, the side-by-side summary, then every record."""
    peers = ", ".join(f"{name} {version}" for name, version in meta.get("peers", {}).items())
    limit = meta.get("mem_limit")
    lines = [
        f"# fastcl bench — {meta['device_name']} — {meta['date']}",
        "",
        f"- command: `{meta.get('command', '')}`",
        f"- device: {meta['device']} ({meta['device_name']}), threads: {meta['threads']}",
        f"- versions: python {meta['python']}, torch {meta['torch']}, fastcl {meta['fastcl']}"
        + (f", {peers}" if peers else ""),
        (
            f"- D = {meta['dim']}, sub_dim = {meta['sub_dim']}, dtype = {meta['dtype']}, median of "
            f"{meta['repeats']} runs (see each row's runs) after {meta['warmup']} warm-up; isolation: {meta['isolate']}"
        ),
        "- M = rows of the similarity matrix; τ and GEMM-units per loss: "
        + ", ".join(f"{loss} τ={tau} ({meta['gemm_units'][loss]})" for loss, tau in meta["temperatures"].items()),
        f"- FLOP model: {meta['flop_model']}",
        f"- ceiling: {meta['ceiling_method']}",
        f"- memory: {meta['memory_method']}; limit per case: "
        + (f"{limit / 2**30:.1f} GiB (beyond it: OOM)" if limit else "none"),
        (
            f"- 1-min load average before / after: {meta.get('loadavg_1min_before')} / "
            f"{meta.get('loadavg_1min_after')} ({_load_note(meta)}); run time: {meta.get('elapsed_s')} s"
        ),
        "",
        "## Side by side (fwd+bwd time, × naive, % of matmul; ! = above the ceiling)",
        "",
        format_summary(records, markdown=True),
        "",
        "## Every case",
        "",
        format_table(records, markdown=True),
        "",
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))


def write_plot(path: str | Path, records: Sequence[dict], title: str) -> None:
    """Log-log time and peak memory vs M, one line per implementation, one row of panels per loss; the matmul
    ceiling is the dashed line. Needs matplotlib (the ``plot`` extra)."""
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
            style = {"color": "k", "linestyle": "--"} if impl == "matmul" else {"marker": "o"}
            if all(r.get("total_ms") is not None for _, r in points):
                ax_time.plot(
                    ms,
                    [r["total_ms"] for _, r in points],
                    label="matmul ceiling" if impl == "matmul" else impl,
                    **style,
                )
            if all(r.get("peak_mem_bytes") is not None for _, r in points):
                ax_mem.plot(ms, [max(r["peak_mem_bytes"], 1) / 2**20 for _, r in points], label=impl, **style)
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
