"""The per-round table (Markdown + JSON), the filtered-minus-WO-RM difference of every metric per round with a
95% paired bootstrap interval (same questions, pairs and prompts on both sides), and a PNG of the metrics
over rounds, one line per filter."""
from __future__ import annotations

from pathlib import Path

from sparserm.manifest import write_json

METRICS = ("mc1", "mc2", "harmless", "rm_win_rate")
COLUMNS = ("round", "filter", "n_kept", "n_pairs", "rm_agreement", "dpo_loss", "dpo_reward_accuracy", *METRICS,
           "rm_score_mean")


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table_md(rows: dict[str, list[dict]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for filt, rs in rows.items():
        for row in rs:
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    for ax, metric in zip(axes, METRICS):
        for filt, rs in rows.items():
            pts = [(r["round"], r[metric]) for r in rs if r.get(metric) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label={"rm": "SparseRM-filtered", "none": "WO RM"}.get(filt, filt))
        ax.set_xticks(sorted({r["round"] for rs in rows.values() for r in rs}))
        ax.set_title(metric)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def paired_intervals(per_item: dict[str, dict[str, list[float]]], a: str = "rm", b: str = "none") -> list[dict]:
    """Per round and metric: mean of filter ``a`` minus filter ``b`` over the same items, with its interval."""
    from sparserm.reward.accuracy import paired_difference

    out = []
    rounds = sorted({int(k.split("/")[1]) for k in per_item if k.startswith(f"{a}/")})
    for r in rounds:
        pa, pb = per_item.get(f"{a}/{r}", {}), per_item.get(f"{b}/{r}", {})
        for metric in METRICS:
            if pa.get(metric) and len(pa[metric]) == len(pb.get(metric, [])):
                out.append({"round": r, "metric": metric, "n": len(pa[metric]),
                            **paired_difference(pa[metric], pb[metric], seed=r)})
    return out


def intervals_md(diffs: list[dict]) -> str:
    lines = ["| round | metric | n | SparseRM-filtered minus WO RM | 95% paired bootstrap |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {d['round']} | {d['metric']} | {d['n']} | {d['diff']:+.3f} | [{d['lo']:+.3f}, {d['hi']:+.3f}] |"
              for d in diffs]
    return "\n".join(lines)


def write_report(out: Path, rows: dict[str, list[dict]], timings: dict | None = None,
                 per_item: dict[str, dict[str, list[float]]] | None = None) -> Path:
    diffs = paired_intervals(per_item or {})
    write_json(out / "report.json", {"rows": rows, "paired_differences": diffs, "timings": timings or {}})
    plot(rows, out / "metrics.png")
    text = ["# Iterative alignment", "", table_md(rows), "", "![metrics over rounds](metrics.png)", ""]
    if diffs:
        text += [intervals_md(diffs), ""]
    if timings:
        phases = ", ".join(f"{k} {v}" for k, v in timings.items() if k != "this_invocation")
        text += [f"Seconds per phase, summed over every invocation on this folder: {phases}; "
                 f"wall time of the last invocation: {timings.get('this_invocation')} s.", ""]
    (out / "report.md").write_text("\n".join(text))
    return out / "report.md"
