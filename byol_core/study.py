"""The study's reproduction as a sweep: its variants × seeds over one preset, and its reference
figures.

"Understanding self-supervised and contrastive learning with BYOL" (2020) trained ResNet-18 on
STL-10 for 10 epochs with each normalisation variant of the MLPs and scored linear evaluation
on halves of the test set. ``reproduction_sweep`` turns ``byol reproduce``'s options into the
SweepSpec that runs that grid on Ray Tune; the reproductions themselves are data in
presets.toml. Pure pydantic, like spec.py: the service builds the same sweep without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from byol_core.presets import SpecError, preset_tables, variants
from byol_core.spec import DataSpec
from byol_core.sweep import SweepSpec, resolve_sweep

ANCHORS = ("byol", "random")


@dataclass(frozen=True)
class StudyRow:
    """One row of the study's table: "Performance for each variation"."""

    name: str
    projector_norm: str
    predictor_norm: str
    loss: str
    contrastive: str
    top1: float


# The study's STL-10 figures (linear evaluation top-1 after 10 epochs), from its blog post.
STUDY_TABLE: dict[str, StudyRow] = {
    "contrastive": StudyRow("Contrastive Loss", "None", "None", "Cross Entropy", "Explicit", 44.1),
    "byol": StudyRow("BYOL", "Batch Norm", "Batch Norm", "L2", "Implicit", 57.7),
    "proj_bn_only": StudyRow("Projection BN Only", "Batch Norm", "None", "L2", "Implicit", 55.3),
    "pred_bn_only": StudyRow("Prediction BN Only", "None", "Batch Norm", "L2", "Implicit", 48.0),
    "no_norm": StudyRow("No Normalization", "None", "None", "L2", "None", 28.3),
    "layer_norm": StudyRow("Layer Norm", "Layer Norm", "Layer Norm", "L2", "None", 29.4),
    "random": StudyRow("Random", "—", "—", "—", "None", 28.8),
}
# Its collapse figure: mean cosine similarity of projections in the tenth epoch.
STUDY_COSINE = {"byol": (0.88, 0.27), "no_norm": (0.9999, 0.9999)}


def reproductions() -> dict[str, dict[str, Any]]:
    return preset_tables()["reproductions"]


def variant_groups() -> dict[str, list[str]]:
    return preset_tables()["variant_groups"]


def parse_variants(text: str | None) -> list[str]:
    """``"table,gn_ws"`` -> the table's seven variants then gn_ws; names or group names."""
    names: list[str] = []
    for item in (text or "table").split(","):
        item = item.strip()
        group = variant_groups().get(item)
        if group is None and item not in variants():
            known = sorted(variant_groups()) + sorted(variants())
            raise SpecError(f"--variants: unknown variant or group {item!r}; one of {known}")
        names += [n for n in group or [item] if n not in names]
    return names


BUILT_IN_DATA = tuple(
    n for n in get_args(DataSpec.model_fields["name"].annotation) if n != "imagefolder"
)


def data_fields(
    data: str | None, candidates: list[str], here: Path | None = None
) -> dict[str, Any]:
    """The ``data`` fields for ``--data NAME_OR_PATH``, or for the reproduction's candidates when
    it is not given: a built-in name, or an ImageFolder path (made absolute when it exists here,
    so that Ray workers started elsewhere find it)."""
    here = here or Path.cwd()
    if data is not None:
        return _data_entry(data, here)
    for entry in candidates:
        if entry in BUILT_IN_DATA:
            return _data_entry(entry, here)
        found = _existing_folder(entry, here)
        if found is not None:
            return {"name": "imagefolder", "path": str(found)}
    raise SpecError(f"--data: none of {candidates} is present; pass --data NAME_OR_PATH")


def _data_entry(entry: str, here: Path) -> dict[str, Any]:
    if entry in BUILT_IN_DATA:
        # A reproduction names a dataset to get it: let torchvision fetch it when it is missing.
        return {"name": entry, "download": entry not in ("shapes", "digits")}
    found = _existing_folder(entry, here)
    return {"name": "imagefolder", "path": str(found) if found else entry}


def _existing_folder(entry: str, here: Path) -> Path | None:
    # Relative candidates are tried from the working directory, then from the checkout's parent
    # (where ../shared sits beside a checkout of this repository).
    path = Path(entry).expanduser()
    roots = [here] if path.is_absolute() else [here, Path(__file__).resolve().parents[1]]
    for root in roots:
        candidate = (root / path).resolve()
        if candidate.is_dir():
            return candidate
    return None


def reproduction_sweep(
    preset: str = "cpu",
    *,
    data: str | None = None,
    image_size: int | None = None,
    epochs: int | None = None,
    seeds: int | None = None,
    variant_names: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    here: Path | None = None,
) -> SweepSpec:
    """The SweepSpec of ``byol reproduce``: every variant × seed of the reproduction ``preset``
    as one grid, with the study's report. Raises SpecError naming the option at fault."""
    if preset not in reproductions():
        raise SpecError(
            f"--preset: unknown reproduction {preset!r}; one of {sorted(reproductions())}"
        )
    setup = reproductions()[preset]
    names = parse_variants(variant_names)
    k = setup["seeds"] if seeds is None else seeds
    if k < 1:
        raise SpecError(f"--seeds: must be at least 1 (got {k})")
    # The preset's default gives byol and random their anchor seeds (the headline margin is a
    # mean over seeds); an explicit --seeds is exactly that many for every variant, so
    # `--seeds 1` is the plain one-seed table the preset's time budget is sized for.
    anchor_k = max(k, setup.get("anchor_seeds", k)) if seeds is None else k
    trials = [[name, seed] for name in names for seed in range(anchor_k if name in ANCHORS else k)]
    base: dict[str, Any] = {"data": data_fields(data, setup["data"], here)}
    if image_size is not None:
        base["data"]["image_size"] = image_size
        base["augment"] = {"crop_size": image_size}
    if epochs is not None:
        base["epochs"] = epochs
    document = {
        "name": f"reproduce-{preset}",
        "base": base,
        "space": {"variant,seed": {"type": "grid", "values": trials}},
        "max_concurrent_trials": setup.get("max_concurrent_trials", 1),
        "report": "study",
    }
    return resolve_sweep(document, base=setup["base"], overrides=overrides)
