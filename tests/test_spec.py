import json
import subprocess
import sys

import pytest

from byol_core.presets import SpecError, bases, parse_set, resolve_spec, variants
from byol_core.spec import JobSpec

STUDY_VARIANTS = {
    "byol",
    "proj_bn_only",
    "pred_bn_only",
    "no_norm",
    "layer_norm",
    "contrastive",
    "random",
    "gn_ws",
    "gn_ws_mlp_bn",
    "no_norm_lars",
    "gn_sgd",
    "gn_lars",
    "gn_wd",
}


def byol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "byol_core.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("base", ["cpu", "cifar", "study", "paper"])
@pytest.mark.parametrize("variant", sorted(STUDY_VARIANTS))
def test_every_preset_validates(base, variant):
    spec = resolve_spec(base=base, variant=variant)
    assert (spec.base, spec.variant) == (base, variant)
    # A dumped spec is complete: it validates again to the same spec.
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_variants_set_the_study_table():
    norms = {
        v: (s.model.projector.norm, s.model.predictor.norm, s.loss.kind)
        for v in STUDY_VARIANTS
        for s in [resolve_spec(variant=v)]
    }
    assert norms["byol"] == ("batch", "batch", "byol")
    assert norms["proj_bn_only"] == ("batch", "none", "byol")
    assert norms["pred_bn_only"] == ("none", "batch", "byol")
    assert norms["no_norm"] == ("none", "none", "byol")
    assert norms["layer_norm"] == ("layer", "layer", "byol")
    assert norms["contrastive"] == ("none", "none", "infonce")
    assert resolve_spec(variant="contrastive").loss.temperature == 0.2
    assert resolve_spec(variant="random").pretrain is False
    assert resolve_spec(variant="gn_ws").model.encoder.norm == "group_ws"
    assert resolve_spec(variant="gn_ws_mlp_bn").model.projector.norm == "batch"
    # The appendix's ways out of collapse: no norm in the MLPs, and for gn_* none in the encoder.
    appendix = {
        v: (s.model.encoder.norm, s.optim.name, s.optim.lr, s.optim.weight_decay)
        for v in ("no_norm_lars", "gn_sgd", "gn_lars", "gn_wd")
        for s in [resolve_spec(variant=v)]
    }
    assert appendix == {
        "no_norm_lars": ("batch", "lars", 0.2, 1.5e-6),
        "gn_sgd": ("group", "sgd", 0.2, 1e-4),
        "gn_lars": ("group", "lars", 0.2, 1.5e-6),
        "gn_wd": ("group", "sgd", 0.2, 1e-5),
    }
    assert all(norms[v][:2] == ("none", "none") for v in appendix)
    assert set(variants()) == STUDY_VARIANTS


def test_study_and_paper_bases_match_their_setups():
    s = resolve_spec(base="study")
    assert (s.model.encoder.arch, s.data.image_size, s.batch_size) == ("resnet18", 96, 256)
    assert (s.optim.name, s.optim.momentum, s.optim.lr, s.optim.weight_decay) == (
        "sgd",
        0.9,
        0.8,
        1e-4,
    )
    assert (s.model.projector.hidden_dim, s.model.projection_dim, s.ema.tau) == (512, 128, 0.996)
    assert (s.data.name, s.epochs, s.eval.protocol) == ("stl10", 10, "study")
    p = resolve_spec(base="paper")
    assert (p.optim.name, p.model.projector.hidden_dim, p.model.projection_dim) == (
        "lars",
        4096,
        256,
    )
    assert p.optim.warmup_epochs == 10 and p.optim.schedule == "cosine"
    assert p.ema.schedule == "cosine" and p.augment.blur_p == (1.0, 0.1)
    assert p.augment.solarize_p == (0.0, 0.2)


def test_overrides_win_and_any_preset_can_override_optimizer_fields():
    spec = resolve_spec(
        {"optim": {"lr": 0.5}},
        variant="no_norm",
        overrides=["optim.name=lars", "optim.weight_decay=1e-5", "ema.tau=0.99", "optim.lr=0.3"],
    )
    assert (spec.optim.name, spec.optim.weight_decay, spec.ema.tau, spec.optim.lr) == (
        "lars",
        1e-5,
        0.99,
        0.3,
    )
    assert spec.model.projector.norm == "none"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"model": {"projector": {"norm": "bn"}}}, "model.projector.norm"),
        ({"optim": {"lrr": 0.1}}, "optim.lrr"),
        ({"batch_size": 0}, "batch_size"),
        ({"ema": {"tau": 1.5}}, "ema.tau"),
        ({"augment": {"crop_scale": [0.9, 0.1]}}, "augment.crop_scale"),
        ({"data": {"name": "imagefolder"}}, "data.path"),
        ({"model": {"encoder": {"norm": "group", "groups": 5}}}, "model.encoder.groups"),
        ({"distributed": {"workers": 3}}, "distributed.workers"),
    ],
)
def test_bad_specs_name_the_field(doc, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        resolve_spec(doc)


def test_unknown_presets_and_bad_set_syntax():
    with pytest.raises(SpecError, match="variant"):
        resolve_spec(variant="nope")
    with pytest.raises(SpecError, match="base"):
        resolve_spec(base="nope")
    with pytest.raises(SpecError, match="key=value"):
        parse_set("optim.lr")
    assert parse_set("optim.lars_modules=[encoder.layer1]") == (
        ["optim", "lars_modules"],
        ["encoder.layer1"],
    )


def test_cli_lists_variants():
    out = byol("variants")
    assert out.returncode == 0
    for name in STUDY_VARIANTS | set(bases()):
        assert f"  {name} " in out.stdout


def test_cli_bad_spec_is_one_line_naming_the_field(tmp_path):
    out = byol("train", "--preset", "byol", "--set", "model.projector.norm=bn")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "model.projector.norm" in out.stderr
    bad = tmp_path / "spec.yaml"
    bad.write_text("optim:\n  momentun: 0.9\n")
    out = byol("spec", str(bad))
    assert out.returncode == 2 and "optim.momentun: unknown field" in out.stderr
    out = byol("train", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    # A dataset that is not there: one line naming the path, no traceback.
    out = byol("train", "--set", "data.name=imagefolder", "--set", f"data.path={tmp_path}/nope")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stderr and "nope" in out.stderr


def test_cli_spec_prints_resolved_json(tmp_path):
    f = tmp_path / "spec.json"
    f.write_text(json.dumps({"variant": "layer_norm", "epochs": 3}))
    out = byol("spec", str(f), "--set", "seed=7")
    spec = JobSpec.model_validate_json(out.stdout)
    assert (spec.variant, spec.epochs, spec.seed, spec.model.projector.norm) == (
        "layer_norm",
        3,
        7,
        "layer",
    )
