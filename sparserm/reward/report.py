"""What a user looks at after ``rm train``: report.md, figures and the latent report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sparserm.config import Config
from sparserm.manifest import write_json

SNIPPETS = 3
SNIPPET_CHARS = 160


def latent_report(rd, neuronpedia_id: str | None = None) -> list[dict]:
    """Each selected latent: its side, frequencies, difference and the texts whose pooled state activates it most."""
    pooled = rd.cache.read_pooled(rd.layer)
    with torch.no_grad():
        acts = rd.sae.encode(pooled.states.to(rd.sae.device)).cpu()
    mu_w, mu_l = np.asarray(rd.freqs.mu_w), np.asarray(rd.freqs.mu_l)
    rows = []
    for side, ids in (("chosen", rd.pos_ids), ("rejected", rd.neg_ids)):
        for j in ids.tolist():
            top = torch.topk(acts[:, j], k=min(SNIPPETS, len(acts))).indices.tolist()
            rows.append({
                "latent": j, "favours": side, "mu_chosen": round(float(mu_w[j]), 4),
                "mu_rejected": round(float(mu_l[j]), 4), "difference": round(float(mu_w[j] - mu_l[j]), 4),
                "top_snippets": [{"activation": round(float(acts[i, j]), 3), "side": str(pooled.meta["side"][i]),
                                  "text": str(pooled.meta["text"][i])[-SNIPPET_CHARS:]}
                                 for i in top if acts[i, j] > 0],
                "neuronpedia": f"https://www.neuronpedia.org/{neuronpedia_id}/{j}" if neuronpedia_id else None,
            })
    return rows


def _plot(out_dir: Path, rd, result) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparserm.reward.directions import project

    v_w, v_l = project(rd.eval.h_w, rd.dirs), project(rd.eval.h_l, rd.dirs)
    x = torch.cat([v_w, v_l])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    _, _, vt = torch.linalg.svd(x, full_matrices=False)
    z = (x @ vt[:2].T).numpy()
    n = len(v_w)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(z[:n, 0], z[:n, 1], s=6, alpha=0.6, label="chosen")
    ax.scatter(z[n:, 0], z[n:, 1], s=6, alpha=0.6, label="rejected")
    ax.set_title("held-out projection vectors (PCA)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "embedding.png", dpi=110)
    plt.close(fig)

    hist = result.history
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in hist]
    a1.plot(epochs, [h["train_loss"] for h in hist], label="train")
    a1.plot(epochs, [h["val_loss"] for h in hist], label="validation")
    a1.set_xlabel("epoch"); a1.set_title("loss"); a1.legend()
    a2.plot(epochs, [h["val_accuracy"] for h in hist])
    a2.axvline(result.best_epoch, ls="--", c="grey")
    a2.set_xlabel("epoch"); a2.set_title("validation accuracy")
    fig.tight_layout()
    fig.savefig(out_dir / "training_curves.png", dpi=110)
    plt.close(fig)
    return "embedding.png", "training_curves.png"


def write_report(out_dir: Path, cfg: Config, rd, result, metrics: dict) -> Path:
    latents = latent_report(rd, getattr(rd.sae, "neuronpedia_id", None))
    write_json(out_dir / "latents.json", latents)
    emb, curves = _plot(out_dir, rd, result)
    acc = metrics["eval_accuracy"]
    lines = [
        "# SparseRM report", "",
        f"Backbone `{cfg.model.name}`, layer {cfg.model.layer}, pooling `{cfg.model.pooling}`, "
        f"K = {cfg.reward.top_k} ({2 * cfg.reward.top_k} directions), loss `{cfg.reward.loss}`.", "",
        "| held-out accuracy | value |", "| --- | --- |",
        *[f"| {k} | {v:.3f} |" for k, v in acc.items()], "",
        f"Pairs: {metrics['n_pairs']}. Best epoch {result.best_epoch} of {len(result.history)}.", "",
        "SAE on held-out tokens: " + ", ".join(f"{k}={v}" for k, v in metrics["sae"].items()), "",
        f"![embedding]({emb})", "", f"![training curves]({curves})", "",
        "## Selected latents (top 10 per side; all in latents.json)", "",
        "| latent | favours | mu chosen | mu rejected | top snippet |", "| --- | --- | --- | --- | --- |",
    ]
    for side in ("chosen", "rejected"):
        for row in [r for r in latents if r["favours"] == side][:10]:
            snip = row["top_snippets"][0]["text"].replace("|", "/").replace("\n", " ") if row["top_snippets"] else ""
            name = f"[{row['latent']}]({row['neuronpedia']})" if row["neuronpedia"] else str(row["latent"])
            lines.append(f"| {name} | {side} | {row['mu_chosen']} | {row['mu_rejected']} | {snip[-100:]} |")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
