"""SweepSpec: a hyper-parameter search, submitted like a training job.

"Users search hyper-parameters the same way they train: POST a spec." A sweep holds a base
JobSpec, a search space over any of its fields by dotted path (``optim.lr``, ``ema.tau``, ...) or
over the named presets (``variant``, ``base``), how many samples to draw and how many trials to
run at once, and an optional ASHA scheduler that stops weak trials early. Like spec.py it imports
nothing heavier than pydantic, so the API validates a sweep without torch or Ray.

Several fields can be searched together: a key of dotted paths joined by commas (``variant,seed``)
with a grid or choice of lists, one value per field: the study's reproduction gives its anchor
variants more seeds than the rest this way.

Every problem in a space is reported at ``("space", "<dotted key>")`` so the API's 422 names it.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails

from byol_core.presets import (
    SpecError,
    bases,
    deep_merge,
    format_validation_error,
    nest,
    resolve_spec,
    variants,
)
from byol_core.spec import JobSpec, PositiveInt, Section

# Space keys that pick a named preset instead of setting a field: each trial's spec is then
# resolved again through byol_core.presets with that base / variant.
PRESET_KEYS = ("base", "variant")
# Fields a space may not set: the kind is fixed, and every trial's name is given by the sweep.
FIXED_KEYS = ("kind", "name")
# Metrics a trial reports every epoch (the trainer's names), to rank trials and stop them early.
Metric = Literal[
    "eval/linear_top1", "eval/knn_top1", "train/loss", "diag/cos_pos", "diag/cos_neg", "diag/z_std"
]
Mode = Literal["max", "min"]


class LogUniform(Section):
    """Real values spread evenly in log space between ``low`` and ``high`` (both > 0)."""

    type: Literal["loguniform"]
    low: float
    high: float

    def problem(self) -> str | None:
        if self.low <= 0 or self.high <= 0:
            return f"loguniform bounds must be > 0 (got low={self.low}, high={self.high})"
        return _range_problem(self.low, self.high)

    def probes(self) -> list[float]:
        return [self.low, self.high, math.sqrt(self.low * self.high)]


class Uniform(Section):
    """Real values spread evenly between ``low`` and ``high``."""

    type: Literal["uniform"]
    low: float
    high: float

    def problem(self) -> str | None:
        return _range_problem(self.low, self.high)

    def probes(self) -> list[float]:
        return [self.low, self.high, (self.low + self.high) / 2]


class Choice(Section):
    """One of ``values``, drawn at random for every sample."""

    type: Literal["choice"]
    values: list[Any]

    def problem(self) -> str | None:
        return None if self.values else "choice needs at least one value"

    def probes(self) -> list[Any]:
        return list(self.values)


class Grid(Section):
    """Every one of ``values``: the trials are the cross product of all grids (times
    ``num_samples``), e.g. a grid over ``variant`` and one over ``seed``."""

    type: Literal["grid"]
    values: list[Any]

    def problem(self) -> str | None:
        return None if self.values else "grid needs at least one value"

    def probes(self) -> list[Any]:
        return list(self.values)


Domain = Annotated[LogUniform | Uniform | Choice | Grid, Field(discriminator="type")]


def _range_problem(low: float, high: float) -> str | None:
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"bounds must be finite (got low={low}, high={high})"
    if low > high:
        return f"low ({low}) is greater than high ({high})"
    if low == high:
        return f"the range is empty (low = high = {low}); use a choice of one value"
    return None


class AshaSpec(Section):
    """Asynchronous successive halving on ``metric`` by epoch: at epochs grace_period,
    grace_period·rf, grace_period·rf², ... a trial continues only if it is in the top 1/rf of
    the trials that reached that epoch before it."""

    type: Literal["asha"]
    metric: Metric = "eval/linear_top1"
    mode: Mode = "max"
    grace_period: PositiveInt = Field(1, description="Epochs every trial runs before a stop.")
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0


class SweepSpec(Section):
    """A hyper-parameter search over a base JobSpec, run as Ray Train trials inside Ray Tune."""

    kind: Literal["sweep"] = "sweep"
    name: str = Field("sweep", min_length=1, max_length=200)
    base: JobSpec = Field(description="The spec every trial starts from.")
    space: dict[str, Domain] = Field(
        min_length=1,
        description="Dotted JobSpec field (e.g. optim.lr) or preset key (variant, base) -> "
        "domain to draw it from. Fields joined by commas (variant,seed) are searched together: "
        "a grid or choice of lists, one value per field.",
    )
    num_samples: PositiveInt = Field(
        1, description="Samples drawn from the space; grids are repeated this many times."
    )
    max_concurrent_trials: PositiveInt = Field(
        2, description="Trials run at once (fewer if the cluster cannot hold them)."
    )
    metric: Metric = Field("eval/linear_top1", description="What ranks the trials.")
    mode: Mode = "max"
    scheduler: AshaSpec | None = Field(None, description="Early stopping; none runs every trial.")
    seed: int = Field(0, description="Seed of the random sampling of the space.")
    report: Literal["none", "study"] = Field(
        "none",
        description="study: when the sweep ends, write the study's table (results.csv, "
        "results.md) and figures over the trials' variants and seeds into the sweep's folder "
        "and its MLflow parent run. Needs variant in the space.",
    )

    @model_validator(mode="after")
    def _space_applies_to_the_base(self) -> SweepSpec:
        errors = [*self._space_errors(), *self._scheduler_errors(), *self._report_errors()]
        if errors:
            raise ValidationError.from_exception_data("SweepSpec", errors)
        return self

    def _space_errors(self) -> Iterator[InitErrorDetails]:
        seen: set[str] = set()
        for key, domain in self.space.items():
            fields = split_key(key)
            twice = seen.intersection(fields)
            seen.update(fields)
            problem = (
                (f"{sorted(twice)} searched by another key too" if twice else None)
                or _key_problem(key, domain)
                or domain.problem()
            )
            if problem is None:
                problem = self._probe_problem(key, domain)
            if problem is not None:
                yield _error(("space", key), problem, domain.model_dump())

    def _probe_problem(self, key: str, domain: Domain) -> str | None:
        """Validate the values a domain can take against the base: its bounds (and midpoint)
        for ranges, every value for choices and grids."""
        for value in domain.probes():
            try:
                trial_spec(self, {key: value})
            except (SpecError, ValidationError) as exc:
                detail = format_validation_error(exc) if isinstance(exc, ValidationError) else exc
                return f"{value!r} does not give a valid spec: {detail}"
        return None

    def _report_errors(self) -> Iterator[InitErrorDetails]:
        if self.report == "study" and "variant" not in {
            f for key in self.space for f in split_key(key)
        }:
            yield _error(
                ("report",),
                "the study's report compares variants: put variant in the space",
                self.report,
            )

    def values_of(self, field: str) -> list[Any]:
        """Every value the space can give ``field`` (from grids and choices, alone or with
        other fields): what admission checks, for instance dataset paths."""
        out: list[Any] = []
        for key, domain in self.space.items():
            fields = split_key(key)
            if field in fields and isinstance(domain, Choice | Grid):
                i = fields.index(field)
                out += [v[i] if len(fields) > 1 else v for v in domain.values]
        return out

    def _scheduler_errors(self) -> Iterator[InitErrorDetails]:
        if self.scheduler is None:
            return
        epochs = max_epochs(self)
        if self.scheduler.grace_period >= epochs:
            yield _error(
                ("scheduler", "grace_period"),
                f"grace_period ({self.scheduler.grace_period}) must be smaller than the trials' "
                f"epochs ({epochs}), or no trial can be stopped early",
                self.scheduler.grace_period,
            )
        if self.scheduler.metric.startswith("eval/") and any(
            s.eval.every != 1 for s in probe_specs(self)
        ):
            yield _error(
                ("base", "eval", "every"),
                f"the scheduler compares {self.scheduler.metric} every epoch: set eval.every to 1",
                self.base.eval.every,
            )


def _error(loc: tuple[str, ...], message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(
        type="value_error", loc=loc, input=value, ctx={"error": ValueError(message)}
    )


def split_key(key: str) -> list[str]:
    """``"variant,seed"`` -> ``["variant", "seed"]``: the fields a space key searches."""
    return [part.strip() for part in key.split(",")]


def expand(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config with every joint key (``variant,seed``) split into its fields. Raises
    SpecError for a joint key whose value is not one value per field."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        fields = split_key(key)
        if len(fields) == 1:
            out[key] = value
        elif isinstance(value, list | tuple) and len(value) == len(fields):
            out.update(zip(fields, value, strict=True))
        else:
            raise SpecError(f"{key} takes {len(fields)} values at once, got {value!r}")
    return out


def _key_problem(key: str, domain: Domain) -> str | None:
    """Why ``key`` cannot be searched with ``domain``, or None."""
    fields = split_key(key)
    if len(fields) > 1:
        return _joint_problem(fields, domain)
    if key in PRESET_KEYS:
        names = bases() if key == "base" else variants()
        if not isinstance(domain, Choice | Grid):
            return f"{key} names a preset: search it with a choice or a grid of names"
        unknown = [v for v in domain.values if v not in names]
        if unknown:
            return f"unknown {key} preset(s) {unknown}; one of {sorted(names)}"
        return None
    if key in FIXED_KEYS:
        return f"{key} is set by the sweep and cannot be searched"
    field = _field(key)
    if field is None:
        return f"unknown field {key!r}: not a dotted path of a JobSpec field"
    if isinstance(domain, LogUniform | Uniform) and not _real(field.annotation):
        return (
            f"{key} is not a real-valued field: {domain.type} draws fractional numbers; "
            "use a choice or a grid"
        )
    return None


def _joint_problem(fields: list[str], domain: Domain) -> str | None:
    if not isinstance(domain, Choice | Grid):
        return "fields searched together take a grid or a choice of lists, one value per field"
    if len(set(fields)) != len(fields) or not all(fields):
        return "name each field once, separated by commas"
    wrong = [v for v in domain.values if not (isinstance(v, list) and len(v) == len(fields))]
    if wrong:
        return (
            f"every value must be a list of {len(fields)} ({', '.join(fields)}); got {wrong[0]!r}"
        )
    for i, field in enumerate(fields):
        problem = _key_problem(
            field, type(domain)(type=domain.type, values=[v[i] for v in domain.values])
        )
        if problem:
            return problem
    return None


def _field(key: str):
    """The pydantic FieldInfo at a dotted JobSpec path, or None."""
    model: type[BaseModel] = JobSpec
    info = None
    for part in key.split("."):
        if info is not None:
            if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
                return None
            model = info.annotation
        info = model.model_fields.get(part)
        if info is None:
            return None
    return info


def _real(annotation: Any) -> bool:
    return annotation is float or float in typing.get_args(annotation)


def _own_fields(spec: JobSpec) -> dict[str, Any]:
    """The fields of ``spec`` that its presets did not set: what to keep when a trial swaps
    the base or variant for another (a field set to its preset's value counts as the preset's)."""
    reference = resolve_spec(base=spec.base, variant=spec.variant).model_dump(mode="json")
    return _difference(spec.model_dump(mode="json"), reference)


def _difference(doc: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        ref = reference.get(key)
        if isinstance(value, dict) and isinstance(ref, dict):
            nested = _difference(value, ref)
            if nested:
                out[key] = nested
        elif value != ref:
            out[key] = value
    return out


def trial_spec(sweep: SweepSpec, config: dict[str, Any], name: str | None = None) -> JobSpec:
    """The JobSpec of one trial: ``config`` (space key -> sampled value) applied to the base.
    Preset keys resolve the base again through the presets (keeping the fields the base set
    itself); dotted keys then override single fields. Raises ValidationError or SpecError."""
    config = expand(config)
    spec = sweep.base
    if any(k in config for k in PRESET_KEYS):
        spec = resolve_spec(
            _own_fields(spec),
            base=config.get("base", spec.base),
            variant=config.get("variant", spec.variant),
        )
    doc = spec.model_dump(mode="json")
    for key, value in config.items():
        if key not in PRESET_KEYS:
            doc = deep_merge(doc, nest(key.split("."), value))
    if name is not None:
        doc["name"] = name
    return JobSpec.model_validate(doc)


def probe_specs(sweep: SweepSpec) -> Iterator[JobSpec]:
    """The base and the spec of every probe value of every domain, one key at a time: what the
    checks of epochs, evaluation and resources look at."""
    yield sweep.base
    for key, domain in sweep.space.items():
        for value in domain.probes():
            try:
                yield trial_spec(sweep, {key: value})
            except (SpecError, ValidationError):
                continue  # reported by the space's own check


def max_epochs(sweep: SweepSpec) -> int:
    return max(s.epochs for s in probe_specs(sweep))


def _kind(value: Any) -> str:
    # A document without "kind" is a training job, as it was before sweeps existed.
    if isinstance(value, dict):
        return value.get("kind", "train")
    return getattr(value, "kind", "train")


AnySpec = Annotated[
    Annotated[JobSpec, Tag("train")] | Annotated[SweepSpec, Tag("sweep")],
    Discriminator(
        _kind,
        custom_error_type="kind",
        custom_error_message="kind must be 'train' (the default) or 'sweep'",
    ),
]
"""What a job is: a training run (kind train, the default) or a sweep (kind sweep)."""


def resolve_sweep(
    document: dict[str, Any],
    *,
    base: str | None = None,
    variant: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> SweepSpec:
    """Build a SweepSpec from a document whose ``base`` is a spec document resolved through the
    presets as ``byol train`` resolves one (base < variant < document < ``overrides``)."""
    if not isinstance(document, dict):
        raise SpecError("sweep: a sweep document must be a mapping of fields")
    doc = dict(document)
    base_doc = doc.get("base") or {}
    if not isinstance(base_doc, dict):
        raise SpecError("base: the base of a sweep is a spec document (a mapping of fields)")
    try:
        spec = resolve_spec(base_doc, base=base, variant=variant, overrides=overrides)
    except SpecError as exc:
        # Each problem starts with its field's dotted path; in a sweep that path is under base.
        raise SpecError("; ".join(f"base.{part}" for part in str(exc).split("; "))) from None
    doc["base"] = spec
    doc.setdefault("kind", "sweep")
    try:
        return SweepSpec.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None
