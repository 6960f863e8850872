"""JobSpec: one pydantic model that describes a training run completely.

It is the single truth for the CLI, the API and the worker, so it imports nothing heavier than
pydantic (the service validates specs without torch). Every section forbids unknown fields, so a
typo fails loudly with the field's dotted path instead of being ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Norm = Literal["batch", "layer", "group", "none"]
EncoderNorm = Literal["batch", "group", "group_ws", "none"]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    # No NaN or infinity in any number: none is a setting, and JSON (the API, MLflow, the
    # job store) has no spelling for them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataSpec(Section):
    """Where images come from. Small datasets are decoded once and held as uint8 tensors."""

    name: Literal["shapes", "digits", "cifar10", "cifar100", "stl10", "imagefolder"] = "shapes"
    root: str = Field("data", description="Folder of torchvision downloads / caches.")
    path: str | None = Field(None, description="ImageFolder root (for name=imagefolder).")
    download: bool = Field(False, description="Let torchvision download the dataset.")
    image_size: PositiveInt = Field(32, description="Side the held images are resized to.")
    train_limit: PositiveInt | None = Field(None, description="Use at most this many images.")
    eval_limit: PositiveInt | None = Field(None, description="Evaluate on at most this many.")

    @model_validator(mode="after")
    def _imagefolder_needs_path(self) -> DataSpec:
        if self.name == "imagefolder" and not self.path:
            raise ValueError("data.path is required when data.name is 'imagefolder'")
        return self


class AugmentSpec(Section):
    """The augmentation pair. Per-view fields are (view 1, view 2) for the asymmetric pair."""

    crop_size: PositiveInt = 32
    crop_scale: tuple[Fraction, Fraction] = (0.2, 1.0)
    jitter_p: Fraction = 0.8
    brightness: Annotated[float, Field(ge=0)] = 0.4
    contrast: Annotated[float, Field(ge=0)] = 0.4
    saturation: Annotated[float, Field(ge=0)] = 0.4
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    grayscale_p: Fraction = 0.2
    flip_p: Fraction = 0.5
    blur_p: tuple[Fraction, Fraction] = (0.5, 0.5)
    blur_sigma: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.1, 2.0)
    solarize_p: tuple[Fraction, Fraction] = (0.0, 0.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @model_validator(mode="after")
    def _ordered_ranges(self) -> AugmentSpec:
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError("augment.crop_scale must be (low, high) with low <= high")
        if self.blur_sigma[0] > self.blur_sigma[1]:
            raise ValueError("augment.blur_sigma must be (low, high) with low <= high")
        return self


class EncoderSpec(Section):
    arch: Literal["resnet18", "resnet50"] = "resnet18"
    small_stem: bool = Field(True, description="3x3 stride-1 first conv and no max-pool.")
    width: PositiveInt = Field(64, description="Channels of the first stage (64 = torchvision).")
    norm: EncoderNorm = "batch"
    groups: PositiveInt = Field(16, description="GroupNorm groups (norm=group / group_ws).")

    @model_validator(mode="after")
    def _groups_divide_width(self) -> EncoderSpec:
        if self.norm in ("group", "group_ws") and self.width % self.groups:
            raise ValueError(
                f"model.encoder.groups ({self.groups}) must divide model.encoder.width "
                f"({self.width})"
            )
        return self


class MLPSpec(Section):
    """Linear -> norm -> ReLU -> Linear, as in the BYOL paper's projector and predictor."""

    hidden_dim: PositiveInt = 512
    norm: Norm = "batch"
    groups: PositiveInt = Field(16, description="GroupNorm groups (norm=group).")


class ModelSpec(Section):
    encoder: EncoderSpec = EncoderSpec()
    projector: MLPSpec = MLPSpec()
    predictor: MLPSpec = MLPSpec()
    projection_dim: PositiveInt = 128
    concat_views: bool = Field(
        False,
        description="Run both views through the networks as one batch (BN statistics shared "
        "across views). The reference implementations run them separately.",
    )

    @model_validator(mode="after")
    def _mlp_groups_divide(self) -> ModelSpec:
        for name in ("projector", "predictor"):
            mlp: MLPSpec = getattr(self, name)
            if mlp.norm == "group" and mlp.hidden_dim % mlp.groups:
                raise ValueError(
                    f"model.{name}.groups ({mlp.groups}) must divide "
                    f"model.{name}.hidden_dim ({mlp.hidden_dim})"
                )
        return self


class LossSpec(Section):
    kind: Literal["byol", "infonce"] = "byol"
    temperature: Annotated[float, Field(gt=0)] = Field(0.2, description="InfoNCE only.")
    queue_size: Annotated[int, Field(ge=0)] = Field(
        0, description="InfoNCE only: MoCo-style queue of past target projections (0 = off)."
    )


class OptimSpec(Section):
    name: Literal["sgd", "lars"] = "sgd"
    lr: Annotated[float, Field(gt=0)] = Field(0.2, description="Base rate, for a batch of 256.")
    scale_lr_by_batch: bool = Field(True, description="lr = lr * global batch / 256.")
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    exclude_bias_and_norm: bool = Field(
        True, description="No weight decay (and no LARS adaptation) for biases and norm params."
    )
    lars_eta: Annotated[float, Field(gt=0)] = Field(1e-3, description="LARS trust coefficient.")
    lars_modules: list[str] | None = Field(
        None,
        description="Module paths that get LARS (e.g. encoder.layer1); the rest gets SGD. "
        "None = every module.",
    )
    predictor_lr_mult: Annotated[float, Field(gt=0)] = 1.0
    warmup_epochs: Annotated[float, Field(ge=0)] = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"


class EMASpec(Section):
    tau: Annotated[float, Field(ge=0, le=1)] = Field(0.996, description="tau_base.")
    schedule: Literal["cosine", "constant"] = Field(
        "constant", description="cosine: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2."
    )


class EvalSpec(Section):
    every: Annotated[int, Field(ge=0)] = Field(1, description="Evaluate every N epochs (0 = end).")
    protocol: Literal["study", "standard"] = Field(
        "study",
        description="study: fit on one half of the evaluation split, score on the other. "
        "standard: fit on the training split, score on the evaluation split.",
    )
    knn_k: PositiveInt = 20
    max_iter: PositiveInt = 1000
    C: Annotated[float, Field(gt=0)] = 1.0


class DistributedSpec(Section):
    workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: PositiveInt = 1
    bn_sync: Literal["global", "local"] = Field(
        "global", description="BN statistics over all workers' examples, or per worker."
    )
    shared_memory: bool = Field(
        True,
        description="Global batch norm's collectives between CPU workers on one host go through "
        "shared memory instead of gloo (gloo between hosts). Same maths, less waiting.",
    )


class RuntimeSpec(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bf16 autocast on GPUs with bf16 and on CPUs where a start-up probe "
        "measures it at least 1.1x faster than fp32.",
    )
    channels_last: bool | None = Field(None, description="None: on where it is faster.")
    threads: PositiveInt | None = None


class JobSpec(Section):
    """A complete BYOL training run. Presets only fill fields of this model."""

    kind: Literal["train"] = "train"
    name: str = Field("byol", min_length=1, max_length=200)
    base: str | None = Field(None, description="Preset base this spec was built from.")
    variant: str | None = Field(None, description="Study variant this spec was built from.")
    pretrain: bool = Field(True, description="False: evaluate the untrained encoder only.")
    epochs: Annotated[int, Field(ge=0)] = 10
    batch_size: PositiveInt = Field(256, description="Global batch over all workers.")
    seed: int = 0
    checkpoint_every: Annotated[int, Field(ge=0)] = Field(
        0, description="Checkpoint every N epochs (0 = only at the end)."
    )
    data: DataSpec = DataSpec()
    augment: AugmentSpec = AugmentSpec()
    model: ModelSpec = ModelSpec()
    loss: LossSpec = LossSpec()
    optim: OptimSpec = OptimSpec()
    ema: EMASpec = EMASpec()
    eval: EvalSpec = EvalSpec()
    distributed: DistributedSpec = DistributedSpec()
    runtime: RuntimeSpec = RuntimeSpec()

    @model_validator(mode="after")
    def _batch_divides(self) -> JobSpec:
        if self.batch_size % self.distributed.workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by "
                f"distributed.workers ({self.distributed.workers})"
            )
        if self.batch_size // self.distributed.workers < 2:
            raise ValueError("batch_size per worker must be at least 2 (batch norm needs it)")
        return self
