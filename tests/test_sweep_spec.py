"""SweepSpec: the search space is checked against JobSpec, and every problem is reported at
("space", "<dotted field>") so the API's 422 and the CLI name the field."""

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from byol_core.presets import SpecError, load_document, resolve_spec
from byol_core.spec import JobSpec
from byol_core.sweep import AnySpec, SweepSpec, resolve_sweep, trial_spec

ROOT = Path(__file__).resolve().parents[1]
LARS = resolve_spec(overrides=["optim.name=lars"])


def sweep(space: dict, **fields) -> SweepSpec:
    return SweepSpec(base=fields.pop("base", LARS), space=space, **fields)


def errors(space: dict, **fields) -> dict[tuple, str]:
    with pytest.raises(ValidationError) as info:
        sweep(space, **fields)
    return {e["loc"]: e["msg"].removeprefix("Value error, ") for e in info.value.errors()}


def test_the_lars_sweep_validates_and_applies_dotted_overrides():
    s = sweep(
        {
            "optim.lr": {"type": "loguniform", "low": 0.05, "high": 2.0},
            "ema.tau": {"type": "uniform", "low": 0.95, "high": 0.999},
        },
        scheduler={"type": "asha", "grace_period": 1},
    )
    spec = trial_spec(s, {"optim.lr": 0.3, "ema.tau": 0.97}, name="t1")
    assert (spec.optim.name, spec.optim.lr, spec.ema.tau, spec.name) == ("lars", 0.3, 0.97, "t1")
    assert spec.model.projector == LARS.model.projector  # everything else is the base's
    assert s.scheduler.metric == "eval/linear_top1" and s.scheduler.mode == "max"


@pytest.mark.parametrize(
    ("key", "domain", "message"),
    [
        ("optim.lrr", {"type": "uniform", "low": 0.1, "high": 1}, "unknown field 'optim.lrr'"),
        ("optimizer.lr", {"type": "choice", "values": [0.1]}, "unknown field 'optimizer.lr'"),
        ("optim.lr.x", {"type": "choice", "values": [0.1]}, "unknown field 'optim.lr.x'"),
        ("optim.lr", {"type": "uniform", "low": 0.5, "high": 0.5}, "the range is empty"),
        ("optim.lr", {"type": "uniform", "low": 0.9, "high": 0.1}, "low (0.9) is greater"),
        ("optim.lr", {"type": "loguniform", "low": 0, "high": 1}, "bounds must be > 0"),
        ("optim.lr", {"type": "loguniform", "low": -1, "high": 1}, "bounds must be > 0"),
        ("ema.tau", {"type": "uniform", "low": 0.9, "high": 1.1}, "1.1 does not give a valid"),
        ("optim.lr", {"type": "choice", "values": []}, "at least one value"),
        ("seed", {"type": "grid", "values": []}, "at least one value"),
        ("epochs", {"type": "uniform", "low": 1, "high": 5}, "not a real-valued field"),
        ("optim.name", {"type": "choice", "values": ["adam"]}, "optim.name: Input should be"),
        ("variant", {"type": "grid", "values": ["byol", "nope"]}, "unknown variant preset"),
        ("variant", {"type": "uniform", "low": 0, "high": 1}, "search it with a choice"),
        ("name", {"type": "choice", "values": ["x"]}, "set by the sweep"),
    ],
)
def test_a_bad_search_space_is_refused_naming_the_field(key, domain, message):
    found = errors({"optim.momentum": {"type": "uniform", "low": 0.8, "high": 0.95}, key: domain})
    assert list(found) == [("space", key)]
    assert message in found[("space", key)]


def test_every_bad_entry_is_reported_at_once():
    found = errors(
        {
            "optim.lrr": {"type": "uniform", "low": 0.1, "high": 1},
            "ema.tau": {"type": "uniform", "low": 0.99, "high": 0.9},
        }
    )
    assert set(found) == {("space", "optim.lrr"), ("space", "ema.tau")}


def test_an_unknown_domain_type_is_refused_at_its_key():
    with pytest.raises(ValidationError) as info:
        sweep({"optim.lr": {"type": "gaussian", "low": 0.1, "high": 1}})
    assert info.value.errors()[0]["loc"][:2] == ("space", "optim.lr")


def test_asha_needs_an_evaluation_every_epoch_and_room_to_stop():
    paper = resolve_spec(base="paper")  # evaluates every 10 epochs
    space = {"optim.lr": {"type": "loguniform", "low": 0.1, "high": 1}}
    found = errors(space, base=paper, scheduler={"type": "asha"})
    assert "set eval.every to 1" in found[("base", "eval", "every")]
    found = errors(space, scheduler={"type": "asha", "grace_period": LARS.epochs})
    assert "must be smaller than the trials' epochs" in found[("scheduler", "grace_period")]
    with pytest.raises(ValidationError):
        sweep(space, scheduler={"type": "asha", "reduction_factor": 1})


@pytest.mark.parametrize(
    "domain",
    [
        {"type": "uniform", "low": 0.1, "high": 1},
        {"type": "grid", "values": [["byol", 0], "byol"]},
        {"type": "choice", "values": [["byol", 0, 1]]},
    ],
)
def test_fields_searched_together_without_a_value_each_are_refused_under_a_scheduler(domain):
    # the scheduler's checks look at every probe's spec; a probe that is not one value per
    # field was a TypeError there (a 500 from the API, found by schemathesis)
    found = errors({"variant,seed": domain}, scheduler={"type": "asha", "grace_period": 1})
    assert list(found) == [("space", "variant,seed")]
    assert (
        "one value per field" in found[("space", "variant,seed")]
        or "list of 2" in found[("space", "variant,seed")]
    )


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_non_finite_number_in_a_spec_is_refused_naming_its_field(value):
    with pytest.raises(SpecError, match=r"^optim\.lr: Input should be a finite number"):
        resolve_spec(overrides=[f"optim.lr={value}"])
    with pytest.raises(SpecError, match=r"^ema\.tau: Input should be a finite number"):
        resolve_spec(overrides=[f"ema.tau={value}"])  # bounded: refused before, as out of range


def test_a_preset_grid_resolves_each_trial_through_the_presets():
    """The study's reproduction: variants × seeds, keeping what the base set itself."""
    base = resolve_spec({"epochs": 3, "optim": {"lr": 0.1}}, base="cpu", variant="byol")
    s = sweep(
        {
            "variant": {"type": "grid", "values": ["byol", "no_norm", "contrastive", "random"]},
            "seed": {"type": "grid", "values": [0, 1, 2]},
        },
        base=base,
    )
    contrastive = trial_spec(s, {"variant": "contrastive", "seed": 2})
    assert contrastive == resolve_spec(
        {"epochs": 3, "optim": {"lr": 0.1}, "seed": 2}, base="cpu", variant="contrastive"
    )
    assert contrastive.loss.kind == "infonce" and contrastive.name == "cpu-contrastive"
    no_norm = trial_spec(s, {"variant": "no_norm", "seed": 0})
    assert (no_norm.model.projector.norm, no_norm.epochs, no_norm.optim.lr) == ("none", 3, 0.1)
    assert trial_spec(s, {"variant": "random", "seed": 1}).pretrain is False
    # A grid over the bases works the same way.
    study = trial_spec(
        sweep({"base": {"type": "grid", "values": ["study"]}}, base=base), {"base": "study"}
    )
    assert (study.data.name, study.epochs, study.optim.lr) == ("stl10", 3, 0.1)


def test_any_spec_tells_jobs_and_sweeps_apart_by_kind():
    adapter = TypeAdapter(AnySpec)
    assert isinstance(adapter.validate_python({"name": "plain"}), JobSpec)  # kind defaults
    space = {"optim.lr": {"type": "choice", "values": [0.1, 0.2]}}
    parsed = adapter.validate_python({"kind": "sweep", "base": {}, "space": space})
    assert isinstance(parsed, SweepSpec)
    with pytest.raises(ValidationError) as info:
        adapter.validate_python(
            {"kind": "sweep", "base": {}, "space": {"optim.lrx": space["optim.lr"]}}
        )
    assert info.value.errors()[0]["loc"] == ("sweep", "space", "optim.lrx")
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "tune"})


def test_the_example_resolves_through_the_presets():
    s = resolve_sweep(load_document(ROOT / "examples" / "sweep-lars.yaml"))
    assert s.base.optim.name == "lars" and set(s.space) == {"optim.lr", "ema.tau"}
    assert s.space["optim.lr"].type == "loguniform" and s.space["ema.tau"].type == "uniform"
    assert s.scheduler is not None and s.scheduler.metric == "eval/linear_top1"
    with pytest.raises(SpecError, match=r"base\.optim\.lr: Input should be greater than 0"):
        resolve_sweep({"base": {"optim": {"lr": 0}}, "space": {}})


def test_the_cli_refuses_a_bad_space_in_one_line_before_starting_ray(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("space:\n  optim.lrr: {type: loguniform, low: 0.1, high: 1}\n")
    out = subprocess.run(
        [sys.executable, "-m", "byol_core.cli", "sweep", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "byol: error: space.optim.lrr: unknown field 'optim.lrr': not a dotted path of a "
        "JobSpec field"
    ]


def test_the_sweep_spec_loads_without_torch_or_ray():
    code = (
        "import sys, byol_core.sweep;"
        "assert not {'torch', 'ray'} & set(sys.modules), 'torch or ray was imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
