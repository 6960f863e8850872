"""The study's table and figures from a reproduction's trials: results.csv, results.md, and the
linear-evaluation curves and collapse bars (the study's cosine-similarity figure).

Each variant's row is the mean over its seeds of the last epoch's numbers (linear top-1 also
with its sample standard deviation and every seed's value): nothing is picked or re-evaluated.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from byol_core.spec import JobSpec
from byol_core.study import STUDY_COSINE, STUDY_TABLE

# Both cosines at or above this at the end: the projections collapsed to one vector.
COLLAPSED = 0.99
NORM_NAMES = {"batch": "Batch Norm", "layer": "Layer Norm", "group": "Group Norm", "none": "None"}
COLUMNS = [
    "variant",
    "projector_norm",
    "predictor_norm",
    "encoder_norm",
    "loss",
    "seeds",
    "linear_top1_mean",
    "linear_top1_std",
    "linear_top1_runs",
    "knn_top1",
    "cos_pos",
    "cos_neg",
    "z_std",
    "collapsed",
    "epochs",
    "seconds",
    "study_top1",
]


@dataclass
class TrialResult:
    """One finished trial: its spec, its per-epoch metrics and how long it ran."""

    variant: str
    seed: int
    spec: JobSpec
    history: list[dict[str, float]]
    seconds: float
    status: str = "finished"

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}

    def final_eval(self) -> dict[str, float]:
        evals = [m for m in self.history if "eval/linear_top1" in m]
        return evals[-1] if evals else {}


@dataclass
class VariantRow:
    variant: str
    trials: list[TrialResult] = field(default_factory=list)

    def values(self, key: str, final_eval: bool = False) -> list[float]:
        out = []
        for t in self.trials:
            value = (t.final_eval() if final_eval else t.last).get(key)
            if value is not None and math.isfinite(value):
                out.append(float(value))
        return out

    def as_dict(self) -> dict[str, Any]:
        spec = self.trials[0].spec
        top1 = self.values("eval/linear_top1", final_eval=True)
        cos_pos, cos_neg = _mean(self.values("diag/cos_pos")), _mean(self.values("diag/cos_neg"))
        study = STUDY_TABLE.get(self.variant)
        return {
            "variant": self.variant,
            "projector_norm": spec.model.projector.norm,
            "predictor_norm": spec.model.predictor.norm,
            "encoder_norm": spec.model.encoder.norm,
            "loss": spec.loss.kind if spec.pretrain else "none (untrained)",
            "seeds": len(self.trials),
            "linear_top1_mean": _mean(top1),
            "linear_top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
            "linear_top1_runs": ";".join(f"{v:.2f}" for v in top1),
            "knn_top1": _mean(self.values("eval/knn_top1", final_eval=True)),
            "cos_pos": cos_pos,
            "cos_neg": cos_neg,
            "z_std": _mean(self.values("diag/z_std")),
            "collapsed": _collapsed(cos_pos, cos_neg),
            "epochs": max(int(t.last.get("epoch", 0)) for t in self.trials),
            "seconds": _mean([t.seconds for t in self.trials]),
            "study_top1": study.top1 if study else None,
        }


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _collapsed(cos_pos: float | None, cos_neg: float | None) -> bool | None:
    if cos_pos is None or cos_neg is None:
        return None
    return cos_pos >= COLLAPSED and cos_neg >= COLLAPSED


def group(trials: Sequence[TrialResult]) -> list[VariantRow]:
    """Trials by variant, in the order the variants first appear."""
    rows: dict[str, VariantRow] = {}
    for t in sorted(trials, key=lambda t: t.seed):
        rows.setdefault(t.variant, VariantRow(t.variant)).trials.append(t)
    order = list(dict.fromkeys(t.variant for t in trials))
    return [rows[v] for v in order]


def write_study_report(
    trials: Sequence[TrialResult], out_dir: str | Path, title: str = ""
) -> list[Path]:
    """results.csv, results.md and figures/{linear_eval,collapse}.png in ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    rows = group(trials)
    records = [r.as_dict() for r in rows]
    paths = [
        write_csv(records, out_dir / "results.csv"),
        write_markdown(records, trials, out_dir / "results.md", title),
        plot_linear_eval(rows, out_dir / "figures" / "linear_eval.png"),
        plot_collapse(records, out_dir / "figures" / "collapse.png"),
    ]
    return paths


def write_csv(records: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return path


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _top1(record: dict[str, Any]) -> str:
    mean, std = record["linear_top1_mean"], record["linear_top1_std"]
    if mean is None:
        return "—"
    spread = f" ± {std:.1f}" if std is not None else ""
    return f"{mean:.1f}{spread} (n={record['seeds']})"


def write_markdown(
    records: list[dict[str, Any]], trials: Sequence[TrialResult], path: Path, title: str
) -> Path:
    spec = trials[0].spec
    data = spec.data.path if spec.data.name == "imagefolder" else spec.data.name
    lines = [
        f"# {title or 'Reproduction of the study'}",
        "",
        f"Setup: {spec.model.encoder.arch} (width {spec.model.encoder.width}), "
        f"{data} at {spec.data.image_size} px"
        + (f", {spec.data.train_limit} training images" if spec.data.train_limit else "")
        + f", {spec.epochs} epochs, batch {spec.batch_size}, {spec.optim.name} lr "
        f"{spec.optim.lr:g}, MLP {spec.model.projector.hidden_dim} -> "
        f"{spec.model.projection_dim}, tau {spec.ema.tau:g}; linear evaluation "
        f"({spec.eval.protocol} protocol) after the last epoch. Ours: mean ± sample std over "
        "seeds. Study: ResNet-18 on STL-10, 10 epochs (its blog post's table).",
        "",
        "| Name | Projection MLP norm | Prediction MLP norm | Loss | Contrastive "
        "| Study top-1 (STL-10) | Ours linear top-1 | kNN top-1 | cos_pos | cos_neg | collapsed |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        study = STUDY_TABLE.get(r["variant"])
        name = study.name if study else r["variant"]
        untrained = r["loss"].startswith("none")
        proj = "—" if untrained else NORM_NAMES[r["projector_norm"]]
        pred = "—" if untrained else NORM_NAMES[r["predictor_norm"]]
        loss = "—" if untrained else ("Cross Entropy" if r["loss"] == "infonce" else "L2")
        contrastive = study.contrastive if study else _contrastive(r)
        if r["encoder_norm"] != "batch":
            name += f" (encoder: {r['encoder_norm']})"
        lines.append(
            f"| {name} | {proj} | {pred} | {loss} | {contrastive} "
            f"| {_num(r['study_top1'])} | {_top1(r)} | {_num(r['knn_top1'])} "
            f"| {_num(r['cos_pos'], 3)} | {_num(r['cos_neg'], 3)} "
            f"| {'yes' if r['collapsed'] else 'no' if r['collapsed'] is not None else '—'} |"
        )
    lines += [
        "",
        f"collapsed: cos_pos and cos_neg both ≥ {COLLAPSED} at the end (the study measured "
        "0.9999 for no normalisation and 0.88 / 0.27 for BYOL in its tenth epoch).",
        "",
        "![linear evaluation per epoch](figures/linear_eval.png)",
        "",
        "![cosine similarity of positive and negative pairs](figures/collapse.png)",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def _contrastive(record: dict[str, Any]) -> str:
    if record["loss"] == "infonce":
        return "Explicit"
    if "batch" in (record["projector_norm"], record["predictor_norm"]):
        return "Implicit"
    return "None"


def plot_linear_eval(rows: list[VariantRow], path: Path) -> Path:
    """Linear top-1 per epoch, mean over seeds with the seeds' range shaded; an untrained
    baseline (one evaluation) is a dashed line across."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    epochs = max((int(t.last.get("epoch", 0)) for r in rows for t in r.trials), default=0)
    for row in rows:
        curves = [
            {int(m["epoch"]): m["eval/linear_top1"] for m in t.history if "eval/linear_top1" in m}
            for t in row.trials
        ]
        xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not xs:
            continue
        mean = [statistics.fmean(c[x] for c in curves) for x in xs]
        if xs == [0]:
            ax.axhline(mean[0], linestyle="--", color="grey", label=f"{row.variant} (untrained)")
            continue
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=row.variant)
        if len(curves) > 1:
            low = [min(c[x] for c in curves) for x in xs]
            high = [max(c[x] for c in curves) for x in xs]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("linear evaluation top-1 (%)")
    ax.set_xlim(0, max(epochs, 1))
    ax.set_title("Linear evaluation per epoch (mean over seeds, range shaded)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_collapse(records: list[dict[str, Any]], path: Path) -> Path:
    """The study's collapse figure: mean cosine similarity of the projections of positive pairs
    (two views of one image) and of negative pairs (different images), per variant."""
    shown = [r for r in records if r["cos_pos"] is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(shown) + 2), 4.2))
    xs = range(len(shown))
    width = 0.38
    ax.bar(
        [x - width / 2 for x in xs],
        [r["cos_pos"] for r in shown],
        width,
        label="positive pairs (cos_pos)",
        color="tab:blue",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [r["cos_neg"] for r in shown],
        width,
        label="negative pairs (cos_neg)",
        color="tab:red",
    )
    for i, r in enumerate(shown):
        reference = STUDY_COSINE.get(r["variant"])
        if reference:
            ax.plot([i - width, i + width], [reference[0]] * 2, color="black", linewidth=1)
    ax.axhline(COLLAPSED, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(list(xs), [r["variant"] for r in shown], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(min(0.0, *(r["cos_neg"] for r in shown)) if shown else 0.0, 1.05)
    ax.set_ylabel("cosine similarity of z and z'")
    ax.set_title(
        "Collapse: both bars near 1 = one vector for every image (black tick: study's cos_pos)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
