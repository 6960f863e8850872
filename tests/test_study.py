"""The study's reproduction: the grid `byol reproduce` builds, and the table and figures it writes
from trial results (no training here; tests/test_reproduce.py runs it for real)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from byol_core.presets import SpecError, resolve_spec
from byol_core.study import data_fields, parse_variants, reproduction_sweep, variant_groups
from byol_core.study_report import TrialResult, write_study_report
from byol_core.sweep import SweepSpec, trial_spec

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def trials_of(sweep: SweepSpec) -> list[tuple[str, int]]:
    return [(v, s) for v, s in sweep.space["variant,seed"].values]


def test_the_cpu_reproduction_is_the_table_with_three_seeds_for_byol_and_random(tmp_path):
    sweep = reproduction_sweep("cpu", data="shapes", here=tmp_path)
    assert trials_of(sweep) == [
        ("byol", 0), ("byol", 1), ("byol", 2), ("proj_bn_only", 0), ("pred_bn_only", 0),
        ("no_norm", 0), ("layer_norm", 0), ("contrastive", 0), ("random", 0), ("random", 1),
        ("random", 2),
    ]  # fmt: skip
    assert sweep.report == "study"
    spec = trial_spec(sweep, {"variant,seed": ["layer_norm", 0]})
    assert (spec.variant, spec.seed, spec.epochs, spec.batch_size) == ("layer_norm", 0, 15, 128)
    assert spec.model.projector.norm == spec.model.predictor.norm == "layer"
    assert spec.data.name == "shapes" and spec.model.encoder.width == 16
    random = trial_spec(sweep, {"variant,seed": ["random", 1]})
    assert random.pretrain is False and random.seed == 1


def test_an_explicit_seed_count_is_exact_for_every_variant(tmp_path):
    # --seeds 1 is the plain one-seed table the preset's hour is sized for: no anchor seeds
    sweep = reproduction_sweep("cpu", data="shapes", seeds=1, here=tmp_path)
    assert trials_of(sweep) == [(name, 0) for name in variant_groups()["table"]]
    two = reproduction_sweep("cpu", data="shapes", seeds=2, variant_names="byol", here=tmp_path)
    assert trials_of(two) == [("byol", 0), ("byol", 1)]


def test_options_reach_every_trial(tmp_path):
    sweep = reproduction_sweep(
        "cpu",
        data="shapes",
        image_size=24,
        epochs=3,
        seeds=3,
        variant_names="no_norm,random",
        overrides=["optim.lr=0.1"],
        here=tmp_path,
    )
    assert trials_of(sweep) == [("no_norm", s) for s in range(3)] + [
        ("random", s) for s in range(3)
    ]
    spec = trial_spec(sweep, {"variant,seed": ["no_norm", 2]})
    assert (spec.epochs, spec.data.image_size, spec.augment.crop_size) == (3, 24, 24)
    assert spec.optim.lr == 0.1 and spec.model.projector.norm == "none"


def test_the_study_preset_is_the_studys_stl10_setup():
    spec = trial_spec(reproduction_sweep("study"), {"variant,seed": ["byol", 0]})
    assert spec.data.name == "stl10" and spec.data.download and spec.data.image_size == 96
    assert (spec.epochs, spec.batch_size, spec.optim.name, spec.optim.lr) == (10, 256, "sgd", 0.8)
    assert spec.optim.momentum == 0.9 and spec.optim.weight_decay == 1e-4
    assert (spec.model.projector.hidden_dim, spec.model.projection_dim) == (512, 128)
    assert spec.ema.tau == 0.996 and spec.eval.protocol == "study"
    assert spec.model.encoder.width == 64 and not spec.model.encoder.small_stem


def test_variant_groups_and_unknown_names():
    assert parse_variants(None) == variant_groups()["table"]
    both = parse_variants("byol,appendix,byol")
    assert both[0] == "byol" and both[1:] == variant_groups()["appendix"]
    with pytest.raises(SpecError, match="--variants: unknown variant or group 'bogus'"):
        parse_variants("byol,bogus")
    with pytest.raises(SpecError, match="--preset"):
        reproduction_sweep("gpu")
    with pytest.raises(SpecError, match="--seeds"):
        reproduction_sweep("cpu", data="shapes", seeds=0)


def test_appendix_variants_change_what_the_appendix_changes():
    lars = resolve_spec(base="cifar", variant="no_norm_lars")
    assert lars.optim.name == "lars" and lars.model.projector.norm == "none"
    assert lars.model.encoder.norm == "batch"
    wd = resolve_spec(base="cifar", variant="gn_wd")
    assert wd.model.encoder.norm == "group" and wd.optim.weight_decay == 1e-5
    assert resolve_spec(base="cifar", variant="gn_sgd").optim.name == "sgd"


def test_data_a_name_a_path_or_the_first_candidate_present(tmp_path):
    assert data_fields("cifar10", [], tmp_path) == {"name": "cifar10", "download": True}
    (tmp_path / "pics" / "train").mkdir(parents=True)
    found = {"name": "imagefolder", "path": str((tmp_path / "pics").resolve())}
    assert data_fields("pics", [], tmp_path) == found
    assert data_fields(None, ["missing-folder", "pics", "cifar10"], tmp_path) == found
    assert data_fields(None, ["missing-folder", "cifar10"], tmp_path)["name"] == "cifar10"
    with pytest.raises(SpecError, match="--data"):
        data_fields(None, ["missing-folder"], tmp_path)


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"real CIFAR-10 not at {CIFAR} (shared data)")
def test_the_cpu_preset_reads_the_shared_cifar10_folder_when_it_is_there(tmp_path):
    from byol_core.data import load_data

    spec = trial_spec(reproduction_sweep("cpu", here=tmp_path), {"variant,seed": ["byol", 0]})
    assert spec.data.name == "imagefolder" and Path(spec.data.path) == CIFAR.resolve()
    small = spec.data.model_copy(update={"train_limit": 200, "eval_limit": 100})
    data = load_data(small)
    assert data.train.images.shape == (200, 3, 32, 32) and len(set(data.test.labels.tolist())) == 10


def test_joint_keys_are_validated_field_by_field():
    base = resolve_spec(base="cpu").model_dump(mode="json")

    def problem(space: dict, **extra) -> str:
        with pytest.raises(ValueError) as info:
            SweepSpec.model_validate({"base": base, "space": space, **extra})
        return str(info.value)

    assert "list of 2" in problem({"variant,seed": {"type": "grid", "values": [["byol"]]}})
    assert "unknown variant" in problem({"variant,seed": {"type": "grid", "values": [["x", 0]]}})
    assert "grid or a choice" in problem({"seed,epochs": {"type": "uniform", "low": 0, "high": 1}})
    assert "another key" in problem(
        {
            "seed": {"type": "grid", "values": [1]},
            "variant,seed": {"type": "grid", "values": [["byol", 0]]},
        }
    )
    assert "put variant in the space" in problem(
        {"seed": {"type": "grid", "values": [1]}}, report="study"
    )


# --- the report ---------------------------------------------------------------------------------


def history(top1: list[float], cos: tuple[float, float], untrained: bool = False) -> list[dict]:
    """One row per epoch (1, 2, ...), or the single epoch-0 row of an untrained baseline."""
    epochs = [0] if untrained else range(1, len(top1) + 1)
    return [
        {
            "epoch": e,
            "eval/linear_top1": t,
            "eval/knn_top1": t - 1,
            "diag/cos_pos": cos[0],
            "diag/cos_neg": cos[1],
            "diag/z_std": 0.05,
            "train/loss": 1.0,
        }
        for e, t in zip(epochs, top1, strict=True)
    ]


def result(variant: str, seed: int, hist: list[dict], seconds: float = 10.0) -> TrialResult:
    spec = resolve_spec(base="cifar", variant=variant, overrides=[f"seed={seed}", "epochs=3"])
    return TrialResult(variant, seed, spec, hist, seconds)


def test_the_report_averages_seeds_and_flags_collapse(tmp_path):
    trials = [
        result("byol", 0, history([30, 35, 40], (0.7, 0.3)), 100),
        result("byol", 1, history([31, 36, 42], (0.8, 0.4)), 120),
        result("no_norm", 0, history([25, 24, 23], (0.9999, 0.9998))),
        result("random", 0, history([30], (0.4, 0.3), untrained=True)),
        result("random", 1, history([32], (0.4, 0.3), untrained=True)),
    ]
    paths = write_study_report(trials, tmp_path, title="test table")
    assert {p.relative_to(tmp_path).as_posix() for p in paths} == {
        "results.csv", "results.md", "figures/linear_eval.png", "figures/collapse.png",
    }  # fmt: skip
    rows = {r["variant"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert list(rows) == ["byol", "no_norm", "random"]
    byol = rows["byol"]
    assert float(byol["linear_top1_mean"]) == 41.0 and byol["seeds"] == "2"
    assert float(byol["linear_top1_std"]) == pytest.approx(2**0.5)
    assert byol["linear_top1_runs"] == "40.00;42.00"
    assert float(byol["cos_pos"]) == pytest.approx(0.75) and byol["collapsed"] == "False"
    assert (byol["projector_norm"], byol["predictor_norm"], byol["loss"]) == (
        "batch",
        "batch",
        "byol",
    )
    assert byol["epochs"] == "3" and float(byol["seconds"]) == 110 and byol["study_top1"] == "57.7"
    assert rows["no_norm"]["collapsed"] == "True" and rows["no_norm"]["linear_top1_std"] == ""
    assert rows["random"]["epochs"] == "0" and float(rows["random"]["linear_top1_mean"]) == 31.0

    table = (tmp_path / "results.md").read_text()
    assert "| BYOL | Batch Norm | Batch Norm | L2 | Implicit | 57.7 | 41.0 ± 1.4 (n=2)" in table
    assert "| No Normalization | None | None | L2 | None | 28.3 | 23.0 (n=1)" in table
    row = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert row["| No Normalization"].endswith("| yes |") and row["| BYOL"].endswith("| no |")
    assert all(
        (tmp_path / "figures" / f).stat().st_size > 10_000
        for f in ("linear_eval.png", "collapse.png")
    )
