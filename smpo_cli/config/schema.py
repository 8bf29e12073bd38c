"""Recipe schemas: one pydantic root model per stage, built from shared blocks.

Every model forbids unknown keys and is frozen once validated. Field descriptions are the
documentation users see in ``smpo recipe show`` and in the bundled recipes' comments, so they
name units and trade-offs. Cross-field checks raise messages spelled the way users override
them (``train.grad_accum_steps must be >= 1``).

Nothing here imports torch: ``--dry-run`` validates recipes without loading any framework.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Block(BaseModel):
    """Base of every recipe block: unknown keys are errors, validated values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# ----------------------------------------------------------------------------- shared blocks
class ModelSpec(Block):
    """The diffusion model a stage loads."""

    pretrained: str = Field(
        description="Local diffusers folder, single-file .safetensors, hub id, or an embedded tiny "
        "model (tiny-sd15, tiny-sdxl)."
    )
    family: Literal["auto", "sd15", "sdxl"] = Field(
        "auto", description="Model family; auto detects it from the files."
    )
    vae: str | None = Field(
        None, description="Separate VAE (folder, file or hub id), e.g. madebyollin/sdxl-vae-fp16-fix."
    )
    unet: str | None = Field(None, description="Separate UNet to start from (folder, file or hub id).")
    config: str | None = Field(
        None, description="Architecture for a single-file checkpoint (diffusers folder or hub id)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    variant: str | None = Field(None, description="Weight variant on the hub, e.g. fp16.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Dtype of the frozen parts (VAE, text encoders, reference UNet)."
    )


class TrainModelSpec(ModelSpec):
    """The model ``smpo train`` starts from: the UNet families, or the flow-matching SD3 / FLUX.1 transformers."""

    family: Literal["auto", "sd15", "sdxl", "sd3", "flux"] = Field(
        "auto", description="Model family; auto detects it from the files (sd3 / flux: flow matching, "
        "inversion.source online, cache or none)."
    )


class LoggingSpec(Block):
    """What a run reports and where."""

    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["jsonl"],
        description="metrics.jsonl is always written; tensorboard/wandb go through accelerate trackers.",
    )
    log_every_steps: PositiveInt = Field(1, description="Write metrics every N optimiser steps.")
    progress: bool = Field(True, description="Show a progress bar (off automatically when not a TTY).")


# ----------------------------------------------------------------------------- train stage
class TrainDataSpec(Block):
    """Scored preference pairs (the output of ``smpo score``)."""

    path: str = Field(description="Scored dataset folder (parquet shards written by smpo score).")
    split: str | None = Field(None, description="Split to read when the folder holds several.")
    reward: str = Field("pickscore", description="Which reward model's scores and p to train on.")
    resolution: PositiveInt = Field(512, description="Training resolution in pixels (square).")
    random_crop: bool = Field(False, description="Random instead of centre crop to resolution.")
    random_flip: bool = Field(False, description="Horizontal flip with probability 0.5 (both images).")
    empty_prompt_prob: Probability = Field(
        0.2, description="Fraction of prompts replaced by '' (keeps classifier-free guidance working)."
    )
    latents: Literal["sample", "mean"] = Field(
        "sample",
        description="VAE posterior sample (what the model was pretrained on; diffusers and Diffusion-DPO) "
        "or its mean (ablation: shifts the data distribution at low noise).",
    )
    drop_ties: bool = Field(True, description="Drop pairs whose human label is a tie (label_0 = 0.5).")
    labels: Literal["reward", "human"] | None = Field(
        None,
        description="Which label puts the winner first: reward = data.reward's winner (SmPO, as the official code; "
        "an exact reward tie makes image 1 the winner) | human = the human label label_0 (Diffusion-DPO and the "
        "official --sft; human ties are always dropped) | null = the method's paper default (smpo: reward; dpo, "
        "sft: human), written into recipe.resolved.yaml.",
    )
    max_pairs: PositiveInt | None = Field(None, description="Use at most this many pairs (debugging).")
    num_workers: NonNegInt = Field(2, description="DataLoader worker processes.")


# The labels each method's paper orders its pairs by (method.md section 5): SmPO the reward winner,
# Diffusion-DPO and the official --sft the human label label_0.
PAPER_LABELS: dict[str, Literal["reward", "human"]] = {"smpo": "reward", "dpo": "human", "sft": "human"}


class MethodSpec(Block):
    """The objective."""

    name: Literal["smpo", "dpo", "sft"] = Field(
        "smpo", description="smpo (smoothed DPO on inverted latents) | dpo (Diffusion-DPO) | sft."
    )
    beta: float = Field(
        5000.0, gt=0, description="KL strength (Diffusion-DPO beta); higher stays closer to the reference."
    )
    gamma: float = Field(
        10.0, gt=0, description="SmPO smoothing scale g: the loss coefficient is beta*g*(2p-1)."
    )
    binary_labels: bool = Field(
        False, description="Ablation: use p in {0,1} from the reward winner instead of the smoothed p."
    )


class InversionSpec(Block):
    """How x_t is obtained: model inversion (SmPO) or random noise (Diffusion-DPO)."""

    source: Literal["online", "cache", "plan", "none"] = Field(
        "online",
        description="online: ReNoise inversion inside each step | cache: from smpo invert | plan: the visits "
        "this run makes, inverted to exactly their t by `smpo invert plan.train_recipe=...` (the same weights as "
        "online exact-t inversion by the reference) | none: random noise.",
    )
    model: Literal["reference", "policy"] = Field(
        "reference", description="Which UNet inverts online (the official code uses the policy)."
    )
    num_steps: PositiveInt = Field(10, description="DDIM inversion grid steps over [0, 1000).")
    renoise_iterations: NonNegInt = Field(1, description="ReNoise fixed-point iterations per inverse step.")
    average_window: PositiveInt = Field(
        2, description="Average the last N noise predictions of each inverse step."
    )
    timestep_mode: Literal["exact", "grid", "official", "official_0_22"] = Field(
        "exact",
        description="exact: invert to the sampled t | grid: sample t on the inversion grid | "
        "official: the official loop as under the diffusers 0.20.0 the authors pin (grid level at or above t, "
        "abar at t: the level mismatch; ablation only) | official_0_22: the same loop under diffusers >= 0.22 "
        "(stops below t). The official modes ignore first_prediction and use the model's scheduler config.",
    )
    cache_path: str | None = Field(None, description="Inversion cache folder when source=cache or source=plan.")
    first_prediction: Literal["source", "target"] = Field(
        "source", description="Timestep label of each inverse step's first noise estimate."
    )

    @model_validator(mode="after")
    def _cache_needs_path(self) -> InversionSpec:
        if self.source in ("cache", "plan") and not self.cache_path:
            raise ValueError(f"inversion.cache_path must be set when inversion.source={self.source}")
        if self.average_window > self.renoise_iterations + 1:
            raise ValueError(
                "inversion.average_window must be <= inversion.renoise_iterations + 1 "
                "(there are only that many noise predictions per step)"
            )
        return self


class OptimSpec(Block):
    """Optimiser and learning-rate schedule."""

    name: Literal["adamw", "adafactor", "adamw8bit"] = Field("adamw", description="Optimiser.")
    lr: float = Field(1e-8, gt=0, description="Learning rate (per pair when scale_lr is true).")
    scale_lr: bool = Field(
        True, description="Multiply lr by batch_size * grad_accum_steps * processes (as the paper)."
    )
    weight_decay: float = Field(1e-2, ge=0)
    adam_beta1: float = Field(0.9, gt=0, lt=1)
    adam_beta2: float = Field(0.999, gt=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables it.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant_with_warmup"
    )
    warmup_steps: NonNegInt = Field(0, description="Linear warm-up in optimiser steps.")


class TrainLoopSpec(Block):
    """Batching, precision, checkpoints."""

    batch_size: PositiveInt = Field(1, description="Pairs per device per micro-batch.")
    grad_accum_steps: PositiveInt = Field(
        1, description="Effective batch = batch_size * grad_accum_steps * processes."
    )
    global_batch_size: PositiveInt | None = Field(
        None,
        description="Pairs per optimiser step whatever the number of processes: grad_accum_steps is derived "
        "(batch_size x processes must divide it). null: batch_size x grad_accum_steps x processes.",
    )
    max_steps: PositiveInt = Field(description="Optimiser steps.")
    sharding: Literal["none", "fsdp", "zero2", "zero3"] = Field(
        "none",
        description="none: DDP (every process holds the whole UNet); fsdp: FSDP2 (torch fully_shard) splits the "
        "trained UNet, its gradients and optimiser state, and the frozen reference across the processes; zero2: "
        "DeepSpeed ZeRO-2 splits the gradients and optimiser state; zero3: DeepSpeed ZeRO-3 also splits the UNet "
        "and the reference (full fine-tuning; zero2/zero3 need DeepSpeed installed).",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (SDXL).")
    lora_rank: PositiveInt | None = Field(
        None, description="Train LoRA adapters of this rank instead of the full UNet (null = full)."
    )
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; defaults to lora_rank.")
    checkpoint_every_steps: PositiveInt | None = Field(
        None, description="Save a resumable checkpoint every N steps (null: only at the end)."
    )
    keep_checkpoints: PositiveInt = Field(2, description="Keep the newest N checkpoints.")
    resume: str | None = Field(None, description="null | auto (newest checkpoint in output_dir) | a path.")
    max_nonfinite_steps: NonNegInt = Field(
        10, description="Stop after this many skipped steps with a non-finite loss."
    )


class TrainRecipe(Block):
    """``smpo train``: SmPO, Diffusion-DPO or SFT on scored preference pairs."""

    stage: Literal["train"] = "train"
    schema_version: int = SCHEMA_VERSION
    seed: int = Field(0, description="Seed for data order, noise, timesteps and empty prompts.")
    device: Literal["auto", "cpu"] = Field("auto", description="auto: the GPUs accelerate gives | cpu: force CPU.")
    output_dir: str = Field(description="Run folder; refused if non-empty unless resuming or --overwrite.")
    model: TrainModelSpec
    data: TrainDataSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    inversion: InversionSpec = Field(default_factory=InversionSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    train: TrainLoopSpec
    logging: LoggingSpec = Field(default_factory=LoggingSpec)

    @model_validator(mode="before")
    @classmethod
    def _paper_labels(cls, values: object) -> object:
        """data.labels: null -> the method's paper default, so the resolved recipe says which labels a run used."""
        if not isinstance(values, dict):
            return values
        method, data = values.get("method"), values.get("data")
        name = method.get("name", "smpo") if isinstance(method, dict) else getattr(method, "name", "smpo")
        default = PAPER_LABELS.get(name) if isinstance(name, str) else None
        if default is None:  # an unknown method: the field validation reports it
            return values
        if isinstance(data, dict) and data.get("labels") is None:
            return {**values, "data": {**data, "labels": default}}
        if isinstance(data, TrainDataSpec) and data.labels is None:
            return {**values, "data": data.model_copy(update={"labels": default})}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> TrainRecipe:
        if self.method.name == "sft" and self.inversion.source != "none":
            raise ValueError("method.name=sft trains on the winner with random noise: set inversion.source=none")
        if self.train.lora_alpha is not None and self.train.lora_rank is None:
            raise ValueError("train.lora_alpha is set but train.lora_rank is null (full fine-tuning)")
        if self.inversion.source == "cache" and (self.data.random_crop or self.data.random_flip):
            raise ValueError("inversion.source=cache stores centre-cropped, unflipped latents: "
                             "set data.random_crop=false and data.random_flip=false")
        if self.inversion.source == "cache" and self.inversion.timestep_mode.startswith("official"):
            raise ValueError(f"inversion.timestep_mode={self.inversion.timestep_mode} needs inversion.source=online")
        if self.model.family in ("sd3", "flux") and self.inversion.source == "plan":
            raise ValueError(f"inversion.source=plan is for the UNet families, not model.family={self.model.family}: "
                             "set inversion.source=online, cache or none")
        if self.model.family in ("sd3", "flux") and self.inversion.timestep_mode != "exact":
            raise ValueError(f"model.family={self.model.family} inverts to exactly the drawn level: "
                             "set inversion.timestep_mode=exact")
        if self.inversion.source == "plan" and self.inversion.timestep_mode != "exact":
            raise ValueError("inversion.source=plan inverts each visit to exactly its t: set inversion.timestep_mode=exact")
        if self.inversion.source == "plan" and self.inversion.model != "reference":
            raise ValueError("inversion.source=plan inverts before training, with the reference model: "
                             "set inversion.model=reference")
        return self


# ----------------------------------------------------------------------------- score stage
REWARD_NAMES = ("pickscore", "hpsv2", "hpsv3", "imagereward", "aesthetic", "clip", "shapes-judge")
RewardName = Literal["pickscore", "hpsv2", "hpsv3", "imagereward", "aesthetic", "clip", "shapes-judge"]


class ScoreDataSpec(Block):
    """Preference pairs to score."""

    path: str = Field(
        description="HF save_to_disk folder, parquet file/folder/glob (Pick-a-Pic v2, or an earlier smpo score "
        "output), or a JSONL/CSV pairs file."
    )
    split: str | None = Field(None, description="Split of a multi-split folder (e.g. train).")
    layout: Literal["auto", "pickapic", "pairs"] = Field(
        "auto", description="pickapic: jpg_0, jpg_1, caption, label_0 | pairs: image_0, image_1, prompt, label."
    )
    image_0_column: str | None = Field(None, description="Override the first image column.")
    image_1_column: str | None = Field(None, description="Override the second image column.")
    prompt_column: str | None = Field(None, description="Override the prompt column.")
    label_column: str | None = Field(None, description="Override the human label column (label_0 semantics).")
    limit: PositiveInt | None = Field(None, description="Score only the first N rows.")
    drop_ties: bool = Field(True, description="Drop pairs whose human label is a tie (0.5).")
    max_image_pixels: PositiveInt = Field(
        50_000_000, description="Refuse (skip the pair of) images larger than this many pixels."
    )
    rows_per_shard: PositiveInt = Field(
        1000, description="Rows per output shard: the unit of resumption and of multi-process splitting."
    )
    num_workers: NonNegInt = Field(2, description="Image-decoding worker processes (0 decodes in the main process).")


class RewardSpec(Block):
    """The reward model and how its scores become the smoothed preference p."""

    name: RewardName = Field(
        "pickscore", description="Reward model (registry name)."
    )
    path: str | None = Field(
        None, description="Local folder/file or hub id; null = the official weights; tiny = an embedded tiny random model; "
        "shapes-pickscore (with name pickscore) = the shapes world's PickScore shipped with smpo."
    )
    options: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="Model-specific options (e.g. hpsv2: {variant: v2.0})."
    )
    output: str | None = Field(
        None, description="Which score defines the winner and p; null = cosine for pickscore, else the model default."
    )
    batch_size: PositiveInt = Field(16, description="Pairs per forward batch.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float32 on CPU, float16 on CUDA."
    )
    normalization: Literal["auto", "fixed", "dataset"] = Field(
        "auto",
        description="fixed: r_min/r_max below | dataset: min/max of this dataset's scores (a second pass) | "
        "auto: fixed when r_min/r_max are known (PickScore cosine: the official constants), else dataset.",
    )
    r_min: float | None = Field(None, description="Min of the raw reward for normalisation.")
    r_max: float | None = Field(None, description="Max of the raw reward for normalisation.")

    @model_validator(mode="after")
    def _range(self) -> RewardSpec:
        if (self.r_min is None) != (self.r_max is None):
            raise ValueError("reward.r_min and reward.r_max must be set together")
        if self.r_min is not None and self.r_max is not None and not self.r_max > self.r_min:
            raise ValueError("reward.r_max must be greater than reward.r_min")
        if self.normalization == "fixed" and self.r_min is None and not (
            self.name == "pickscore" and self.output in (None, "cosine")
        ):
            raise ValueError("reward.normalization=fixed needs reward.r_min and reward.r_max")
        return self


class ScoreRecipe(Block):
    """``smpo score``: reward scores and smoothed preference labels for pair datasets."""

    stage: Literal["score"] = "score"
    schema_version: int = SCHEMA_VERSION
    output_dir: str = Field(description="Scored dataset folder; a rerun with the same recipe resumes it.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (under accelerate: each process its own).")
    data: ScoreDataSpec
    reward: RewardSpec = Field(default_factory=RewardSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)


# ----------------------------------------------------------------------------- invert stage
class InvertDataSpec(Block):
    """Images with prompts to invert, or scored pairs to cache for training."""

    path: str = Field(
        description="JSONL/CSV with image + prompt columns, a folder of images with metadata.jsonl (file_name, "
        "prompt), or a scored pair dataset (smpo score output: the training cache)."
    )
    split: str | None = Field(None, description="Split of a multi-split folder.")
    layout: Literal["auto", "images", "pairs"] = Field(
        "auto", description="images: one image per row | pairs: image_0/image_1 (or jpg_0/jpg_1) per row."
    )
    image_column: str | None = Field(None, description="images layout: the image column (default image or file_name).")
    prompt_column: str | None = Field(None, description="The prompt column (default prompt, caption or text).")
    resolution: PositiveInt = Field(512, description="Resize the shorter side and centre-crop to this size.")
    latents: Literal["sample", "mean"] = Field(
        "sample",
        description="pairs layout (the training cache): VAE posterior sample per image, seeded by (seed, row, side), "
        "as training without the cache uses; mean is the ablation. The images layout always inverts the mean.",
    )
    limit: PositiveInt | None = Field(None, description="Invert only the first N rows.")
    max_image_pixels: PositiveInt = Field(50_000_000, description="Refuse (skip) images larger than this.")
    rows_per_shard: PositiveInt = Field(256, description="Rows per shard: the unit of resumption.")
    num_workers: NonNegInt = Field(2, description="Image-decoding worker processes.")


class InvertMethodSpec(Block):
    """The inversion: DDIM or ReNoise, its grid and the levels to reach."""

    method: Literal["ddim", "renoise"] = Field("renoise", description="ddim | renoise (SmPO's trajectory estimate).")
    num_steps: PositiveInt = Field(10, description="DDIM grid steps over [0, 1000) (trailing spacing).")
    renoise_iterations: NonNegInt = Field(1, description="ReNoise fixed-point iterations per inverse step.")
    average_window: PositiveInt = Field(2, description="Average the last N noise predictions of each step.")
    first_prediction: Literal["source", "target"] = Field(
        "source", description="Timestep label of each step's first noise estimate (diffusers' inverse scheduler: target)."
    )
    noise_regularization: bool = Field(False, description="ReNoise's auto-correlation + KL noise regularisation.")
    lambda_ac: float = Field(20.0, ge=0, description="Auto-correlation weight (noise_regularization).")
    lambda_kl: float = Field(0.065, ge=0, description="Patch-KL weight (noise_regularization; 0 disables it).")
    reg_steps: NonNegInt = Field(4, description="Regularisation gradient steps per estimate.")
    guidance_scale: float | None = Field(None, gt=0, description="Classifier-free guidance during inversion (null: none).")
    levels: list[Annotated[int, Field(ge=0, le=999)]] = Field(
        default_factory=lambda: [999],
        description="Timesteps to invert to. images: the highest is inverted and reconstructed; pairs: every "
        "level is cached (training samples t among them). Flow models (SD3, FLUX.1): t is the noise level "
        "s = t / 1000, t in 1..999.",
    )
    batch_size: PositiveInt = Field(4, description="Images per UNet batch (a pair counts 2).")
    cache_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Storage dtype of cached latents (pairs layout)."
    )

    @model_validator(mode="after")
    def _levels(self) -> InvertMethodSpec:
        if not self.levels:
            raise ValueError("inversion.levels must name at least one timestep")
        if len(set(self.levels)) != len(self.levels):
            raise ValueError("inversion.levels must not repeat a timestep")
        if self.average_window > self.renoise_iterations + 1 and self.method == "renoise":
            raise ValueError("inversion.average_window must be <= inversion.renoise_iterations + 1")
        return self


class InvertPlanSpec(Block):
    """The plan cache: invert exactly the (pair, t) visits a training run will make, not every pair to every level."""

    train_recipe: str = Field(
        description="The smpo train recipe (bundled name or YAML path) whose visits to invert; its seed, steps, "
        "global batch, data, model and inversion settings define the plan (train it with inversion.source=plan)."
    )
    train_overrides: list[str] = Field(
        default_factory=list, description="key=value overrides applied to train_recipe, as on the train command line."
    )
    processes: PositiveInt = Field(
        1, description="Training processes (only matters when the train recipe has no train.global_batch_size)."
    )
    steps_per_shard: PositiveInt = Field(10, description="Optimiser steps per plan shard: the unit of resumption.")


class InvertRecipe(Block):
    """``smpo invert``: ReNoise/DDIM inversion of images, or the SmPO training cache of scored pairs."""

    stage: Literal["invert"] = "invert"
    schema_version: int = SCHEMA_VERSION
    seed: int = Field(0, description="Seed of the regularisation noise.")
    output_dir: str = Field(description="Output folder; a rerun with the same recipe resumes it.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (under accelerate: each process its own).")
    model: TrainModelSpec = Field(description="The (reference) model that inverts (SD1.5, SDXL, SD3 or FLUX.1).")
    data: InvertDataSpec
    inversion: InvertMethodSpec = Field(default_factory=InvertMethodSpec)
    plan: InvertPlanSpec | None = Field(
        None,
        description="Invert the visits of one training run (its model, data and inversion settings; data.path and "
        "model.pretrained must match it) into a plan cache; null: the images or pairs layouts.",
    )
    logging: LoggingSpec = Field(default_factory=LoggingSpec)


# ----------------------------------------------------------------------------- generate stage
class GenerateModelSpec(ModelSpec):
    """The model to sample from, optionally with LoRA weights from ``smpo train``."""

    lora: str | None = Field(None, description="LoRA weights folder (diffusers format, e.g. a run's lora/).")
    lora_scale: float = Field(1.0, description="LoRA strength.")


class PromptsSpec(Block):
    """The prompt set."""

    path: str = Field(description="Prompt file or folder: .txt, .jsonl (GenEval metadata too), .json (HPDv2, "
                      "ImageReward), .tsv/.csv (PartiPrompts), parquet/datasets folder (Pick-a-Pic captions).")
    column: str | None = Field(None, description="The prompt field/column when it is not prompt/Prompt/caption.")
    limit: PositiveInt | None = Field(None, description="The first N prompts only.")


class SamplingSpec(Block):
    """How each image is sampled."""

    images_per_prompt: PositiveInt = Field(1, description="Images per prompt (GenEval: 4).")
    num_inference_steps: PositiveInt = Field(50)
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance (GenEval's generator: 9.0).")
    scheduler: str | None = Field(None, description="diffusers scheduler class name; null = the model's own.")
    height: PositiveInt | None = Field(None, description="null = the model's default size.")
    width: PositiveInt | None = Field(None)
    negative_prompt: str | None = Field(None)
    batch_size: PositiveInt = Field(4, description="Images per forward pass: the fixed batches a resume redraws whole (another size changes pixels by float rounding only).")

    @model_validator(mode="after")
    def _size(self) -> SamplingSpec:
        # SD1.5/SDXL pipelines need sides divisible by 8 (the VAE's factor): say so before any weight loads
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and value % 8:
                raise ValueError(f"sampling.{key}={value} must be a multiple of 8 (e.g. {value - value % 8 or 8} or {value - value % 8 + 8})")
        return self


class GenerateRecipe(Block):
    """``smpo generate``: images for a prompt set, deterministic per (prompt, sample index)."""

    stage: Literal["generate"] = "generate"
    schema_version: int = SCHEMA_VERSION
    seed: int = Field(0, description="Base seed; image k of prompt i uses a seed derived from (seed, i, k).")
    output_dir: str = Field(description="Image folder; a rerun with the same recipe fills in what is missing.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (under accelerate: prompts split by process).")
    layout: Literal["flat", "geneval"] = Field(
        "flat", description="flat: images/PPPPP_KK.png + metadata.jsonl | geneval: PPPPP/samples/KKKK.png + PPPPP/metadata.jsonl."
    )
    model: GenerateModelSpec
    prompts: PromptsSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)


# ----------------------------------------------------------------------------- pairs stage
class PairsRewardSpec(Block):
    """One reward model voting on the pairs (its own p stays in the output; the pair's p is the mixture)."""

    name: RewardName
    path: str | None = Field(None, description="As in smpo score: null = official weights, tiny, shapes-pickscore, a folder.")
    options: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    output: str | None = Field(None, description="The score used; null = cosine for pickscore, else the model's default.")
    weight: float = Field(1.0, gt=0, description="Weight in the mixture of p and of the utility pairs are chosen by.")
    label: str | None = Field(None, description="Column prefix of this model's scores and p (default: its name).")
    r_min: float | None = Field(None, description="Normalisation range; null = the model's known range, else quantiles.")
    r_max: float | None = Field(None)
    quantiles: tuple[Probability, Probability] = Field(
        (0.01, 0.99), description="Without a known range: the range is these quantiles of this run's scores."
    )

    @model_validator(mode="after")
    def _range(self) -> PairsRewardSpec:
        if (self.r_min is None) != (self.r_max is None):
            raise ValueError("r_min and r_max must be set together")
        if self.r_min is not None and not self.r_max > self.r_min:
            raise ValueError("r_max must be greater than r_min")
        if not self.quantiles[1] > self.quantiles[0]:
            raise ValueError("quantiles must be (low, high) with high > low")
        return self

    @property
    def prefix(self) -> str:
        return self.label or self.name


class PairingSpec(Block):
    """Which of a prompt's images become pairs (chosen on the mixture utility of each image)."""

    strategy: Literal["best_worst", "all", "top_bottom", "random"] = Field(
        "best_worst", description="best_worst: one pair per prompt | all: N(N-1)/2 | top_bottom: k*k | random: pairs_per_prompt."
    )
    k: PositiveInt = Field(1, description="top_bottom: images taken from each end (2k <= images_per_prompt).")
    pairs_per_prompt: PositiveInt = Field(1, description="random: distinct pairs per prompt.")
    min_margin: float = Field(0.0, ge=0, description="Drop pairs whose utilities (normalised, in [0, 1] units) differ by less.")


class PairsRecipe(Block):
    """``smpo pairs``: sample N images per prompt, score them with reward models, write scored preference pairs."""

    stage: Literal["pairs"] = "pairs"
    schema_version: int = SCHEMA_VERSION
    seed: int = Field(0, description="smpo generate's seed (per-image seeds follow) and the random pairing's seed.")
    output_dir: str = Field(description="Run folder: samples/, pairs.parquet (smpo invert/train read it), image_scores.jsonl, summary.json.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    model: GenerateModelSpec
    prompts: PromptsSpec
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec(images_per_prompt=4))
    rewards: list[PairsRewardSpec] = Field(min_length=1, description="Reward models; several = a weighted mixture of their p.")
    pairing: PairingSpec = Field(default_factory=PairingSpec)
    prefix: str | None = Field(
        None, description="Column prefix of the pair's winner and p (smpo train's data.reward); null = the only reward's "
        "label, or mix with several.",
    )  # fmt: skip
    reward_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: float16 on CUDA.")
    reward_batch_size: PositiveInt = Field(
        32, description="Images per reward forward pass; also the scoring chunk (whole prompts), the unit of resumption."
    )  # fmt: skip
    pipeline: bool = Field(True, description="Score each chunk of images while the next ones are generated (false: generate all, then score).")
    images: Literal["paths", "bytes"] = Field(
        "paths", description="pairs.parquet's image_0/image_1: paths relative to the run folder | the PNG bytes (self-contained)."
    )  # fmt: skip
    logging: LoggingSpec = Field(default_factory=LoggingSpec)

    @model_validator(mode="after")
    def _check(self) -> PairsRecipe:
        if self.sampling.images_per_prompt < 2:
            raise ValueError("sampling.images_per_prompt must be >= 2: a pair needs two images of one prompt")
        labels = [r.prefix for r in self.rewards]
        if len(set(labels)) != len(labels):
            raise ValueError(f"rewards need distinct labels (got {labels}); set rewards[].label")
        if self.pairing.strategy == "top_bottom" and 2 * self.pairing.k > self.sampling.images_per_prompt:
            raise ValueError("pairing.k: top_bottom needs 2k <= sampling.images_per_prompt")
        return self

    @property
    def pair_prefix(self) -> str:
        return self.prefix or (self.rewards[0].prefix if len(self.rewards) == 1 else "mix")


# ----------------------------------------------------------------------------- rounds stage
class RoundStageSpec(Block):
    """One stage of every round: a recipe (bundled name or YAML path) and overrides; rounds set the rest."""

    recipe: str | None = Field(None, description="Bundled recipe name or YAML file of this stage; null: the stage's defaults.")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides, as on the command line.")


class RoundsRecipe(Block):
    """``smpo rounds``: iterative (self-play) alignment, pairs -> invert (cache) -> train, each round on the last's model."""

    stage: Literal["rounds"] = "rounds"
    schema_version: int = SCHEMA_VERSION
    seed: int = Field(0, description="Round r samples its pairs with seed + r (and trains with the train recipe's seed + r).")
    output_dir: str = Field(description="Run folder: round_<r>/{pairs,cache,train,model}, eval/ and summary.json.")
    rounds: PositiveInt = Field(2, description="Rounds R; round r samples from round r-1's model (round 0: the start model).")
    model: str | None = Field(
        None, description="The start model (sets model.pretrained of every stage of round 0); null: the train recipe's."
    )
    pairs: RoundStageSpec = Field(description="smpo pairs recipe; model.pretrained, output_dir and seed are set per round.")
    invert: RoundStageSpec | None = Field(
        None, description="smpo invert recipe for the training cache (needed when the train recipe has "
        "inversion.source=cache); model, data.path, data.layout and output_dir are set per round.",
    )  # fmt: skip
    train: RoundStageSpec = Field(
        description="smpo train recipe; model.pretrained, data.path, data.reward, inversion.cache_path and output_dir "
        "are set per round. LoRA runs are fused into a full pipeline (round_<r>/model) for the next round."
    )  # fmt: skip
    evaluate_final: bool = Field(
        True, description="Also sample and score the last round's model with the pairs recipe (eval/): R + 1 models' rewards."
    )  # fmt: skip
    logging: LoggingSpec = Field(default_factory=LoggingSpec)


# ----------------------------------------------------------------------------- bench stage
class BenchRewardSpec(Block):
    """One reward model of a benchmark."""

    name: RewardName
    path: str | None = Field(None, description="Weights (null: the official ones; tiny: the embedded tiny model; shapes-pickscore with pickscore: the shipped shapes reward).")
    options: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class BenchRecipe(Block):
    """``smpo bench rewards``: score a model (and a baseline) on a prompt set with reward models."""

    stage: Literal["bench"] = "bench"
    schema_version: int = SCHEMA_VERSION
    seed: int = Field(0, description="Sampling seed; model and baseline use the same seed per (prompt, sample).")
    output_dir: str = Field(description="Benchmark folder: images, results.json, results.md, chart and report.")
    device: str = Field("auto")
    model: GenerateModelSpec
    baseline: GenerateModelSpec | None = Field(None, description="Compared model (win rates); null: the model alone.")
    prompts: PromptsSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    rewards: list[BenchRewardSpec] = Field(
        default_factory=lambda: [BenchRewardSpec(name=n) for n in ("pickscore", "hpsv2", "imagereward", "aesthetic", "clip")],
        description="Reward models to score with.",
    )
    reward_batch_size: PositiveInt = Field(16, description="Images per reward-model batch.")
    report_samples: NonNegInt = Field(16, description="Prompts shown side by side in report.html.")
    logging: LoggingSpec = Field(default_factory=LoggingSpec)


# ----------------------------------------------------------------------------- geneval stage
class GenevalSamplingSpec(SamplingSpec):
    """Sampling for GenEval: its reference generator's settings (4 images, 50 steps, guidance 9)."""

    images_per_prompt: PositiveInt = Field(4, description="Images per prompt (GenEval: 4).")
    guidance_scale: float = Field(9.0, ge=0, description="Classifier-free guidance (GenEval's generator: 9.0).")


class DetectorSpec(Block):
    """The object detector whose detections the GenEval rules judge."""

    backend: Literal["auto", "transformers", "mmdet"] = Field(
        "auto", description="auto: mmdet when path is a .pth checkpoint (mmdet must be installed), else transformers | "
        "transformers: Mask2Former via transformers (installs anywhere) | mmdet: the official evaluator's detector."
    )
    path: str | None = Field(
        None, description="transformers: folder or hub id (null: facebook/mask2former-swin-small-coco-instance; "
        "tiny: a random tiny model for plumbing) | mmdet: the official .pth checkpoint."
    )
    mmdet_config: str | None = Field(
        None, description="mmdet: the config file (null: mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py of the installed mmdet)."
    )
    batch_size: PositiveInt = Field(4, description="Images per detector forward pass (does not change any result).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("float32", description="Detector weights' dtype.")


class ColourJudgeSpec(Block):
    """The zero-shot CLIP colour classifier."""

    path: str | None = Field(
        None, description="CLIP folder or hub id (null: openai/clip-vit-large-patch14, as GenEval; tiny: random tiny CLIP)."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "float32", description="The official run uses CUDA fp16 autocast; float32 is the reference here."
    )


class GenevalRulesSpec(Block):
    """The official evaluator's thresholds (its --options), defaults as shipped."""

    threshold: Probability = Field(0.3, description="Minimum detection score (all tasks but counting).")
    counting_threshold: Probability = Field(0.9, description="Minimum detection score for counting prompts.")
    max_objects: PositiveInt = Field(16, description="Keep at most N detections per class, best first.")
    max_overlap: Probability = Field(1.0, description="Per-class greedy NMS IoU; 1.0 disables it (the default).")
    position_threshold: float = Field(0.1, ge=0, description="Margin factor of the relative-position rule.")


class GenevalRecipe(Block):
    """``smpo bench geneval``: GenEval (Ghosh et al. 2023) on a model's samples or an existing image folder."""

    stage: Literal["geneval"] = "geneval"
    schema_version: int = SCHEMA_VERSION
    seed: int = Field(0, description="Sampling seed; image k of prompt i uses a seed derived from (seed, i, k).")
    output_dir: str = Field(description="Benchmark folder: images/, results.jsonl, results.json, results.md, failures.html.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    metadata: str | None = Field(
        None, description="GenEval's evaluation_metadata.jsonl: a path, or hf://datasets/OWNER/NAME/FILE on the hub. "
        "Needed to generate; an existing image folder carries its own metadata."
    )
    images: str | None = Field(None, description="Evaluate this existing GenEval image folder (NNNNN/metadata.jsonl + NNNNN/samples/*.png).")
    model: GenerateModelSpec | None = Field(None, description="Generate the images with this model (into output_dir/images).")
    limit: PositiveInt | None = Field(None, description="The first N prompts only (a quick look; not a GenEval score).")
    sampling: GenevalSamplingSpec = Field(default_factory=GenevalSamplingSpec)
    detector: DetectorSpec = Field(default_factory=DetectorSpec)
    colour: ColourJudgeSpec = Field(default_factory=ColourJudgeSpec)
    rules: GenevalRulesSpec = Field(default_factory=GenevalRulesSpec)
    failures_per_task: NonNegInt = Field(12, description="Failed images shown per task in failures.html.")
    logging: LoggingSpec = Field(default_factory=LoggingSpec)

    @model_validator(mode="after")
    def _one_source(self) -> GenevalRecipe:
        if (self.images is None) == (self.model is None):
            raise ValueError("give exactly one of model (--model M: generate the images) or images (--images DIR: an existing GenEval folder)")
        if self.model is not None and self.metadata is None:
            raise ValueError("metadata is required to generate: the path of GenEval's evaluation_metadata.jsonl")
        return self


# ----------------------------------------------------------------------------- shapes base model
class ShapesDataSpec(Block):
    """Rendered scenes of the shapes world the base model learns from."""

    images: PositiveInt = Field(60_000, description="Scenes rendered (deterministic by seed; ~2 s for 60k).")
    size: PositiveInt = Field(32, description="Image side in pixels.")
    split_seed: int = Field(0, description="Seed of the train/held-out caption split (held-out captions are never rendered).")
    colour_swap: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Fraction of training captions that name every colour by its partner (red/orange, green/yellow, "
        "blue/purple, cyan/white) while the image keeps the true colours: a caption source that disagrees with the "
        "evaluators, so the base model is misaligned in a way preference data can fix. 0 = clean captions.",
    )  # fmt: skip


class ShapesModelSpec(Block):
    """Sizes of the tiny SD1.5-layout model."""

    vae_channels: list[PositiveInt] = Field([32, 64, 64], description="AutoencoderKL block widths (3 levels: 4x down-sampling).")
    unet_channels: list[PositiveInt] = Field([64, 128, 128], description="UNet block widths (3 levels).")
    text_width: PositiveInt = Field(128, description="CLIP text encoder width (= cross-attention dim).")
    text_layers: PositiveInt = Field(2, description="CLIP text encoder layers.")

    @model_validator(mode="after")
    def _three_levels(self) -> ShapesModelSpec:
        if len(self.vae_channels) != 3 or len(self.unet_channels) != 3:
            raise ValueError("model.vae_channels and model.unet_channels need 3 entries each (the SD1.5-like layout)")
        return self


class ShapesTextEncoderSpec(Block):
    """How the base model's CLIP text encoder is made."""

    training: Literal["joint", "contrastive"] = Field(
        "joint",
        description="joint: trained with the UNet, so words its captions use interchangeably collapse (the shipped "
        "shapes-sd15) | contrastive: CLIP-pretrained first on renders with their true captions (InfoNCE with "
        "near-miss negatives), then frozen while the UNet trains, as SD1.5 keeps OpenAI's CLIP frozen.",
    )  # fmt: skip
    steps: PositiveInt = Field(1500, description="contrastive: CLIP optimiser steps.")
    batch_size: PositiveInt = Field(128, description="contrastive: images (and captions) per step.")
    lr: float = Field(2e-3, gt=0, description="contrastive: AdamW peak learning rate (cosine to 0).")
    warmup_steps: NonNegInt = Field(100, description="contrastive: linear warm-up steps.")
    vision_layers: PositiveInt = Field(3, description="contrastive: layers of the ViT image tower (discarded after).")
    patch_size: PositiveInt = Field(4, description="contrastive: ViT patch side in pixels.")


class ShapesVaeSpec(Block):
    steps: PositiveInt = Field(900, description="VAE optimiser steps (~0.33 s each on 2 CPU cores at batch 64).")
    batch_size: PositiveInt = Field(64)
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate, cosine-decayed to final_lr.")
    final_lr: float = Field(2e-5, gt=0)
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the posterior KL term.")


class ShapesUnetSpec(Block):
    steps: PositiveInt = Field(3800, description="UNet + text encoder optimiser steps (~0.31 s each on 2 CPU cores at batch 64).")
    batch_size: PositiveInt = Field(64)
    lr: float = Field(6e-4, gt=0, description="AdamW peak learning rate.")
    final_lr_fraction: Probability = Field(0.1, description="Cosine decay to this fraction of lr.")
    warmup_steps: NonNegInt = Field(200)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    empty_prompt_prob: Probability = Field(0.1, description="Caption dropped (classifier-free guidance).")
    ema_decay: Probability = Field(0.999, description="EMA decay cap (warm-up (1+s)/(10+s)); the EMA weights are saved.")


class ShapesPretrainRecipe(Block):
    """``smpo shapes pretrain``: the shapes world's base model, trained from scratch on a CPU."""

    stage: Literal["shapes_pretrain"] = "shapes_pretrain"
    schema_version: int = SCHEMA_VERSION
    seed: int = Field(0, description="Seed of the scenes, the initial weights and every random draw of training.")
    output_dir: str = Field(description="Run folder: tokenizer/, pipeline/ (diffusers format), summary.json.")
    data: ShapesDataSpec = Field(default_factory=ShapesDataSpec)
    model: ShapesModelSpec = Field(default_factory=ShapesModelSpec)
    text_encoder: ShapesTextEncoderSpec = Field(default_factory=ShapesTextEncoderSpec)
    vae: ShapesVaeSpec = Field(default_factory=ShapesVaeSpec)
    unet: ShapesUnetSpec = Field(default_factory=ShapesUnetSpec)
    export_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of the saved weights (float16 halves the shipped size; load in float32)."
    )
    logging: LoggingSpec = Field(default_factory=LoggingSpec)


# ----------------------------------------------------------------------------- shapes experiment
ShapesSkill = Literal["single_object", "two_object", "counting", "colors", "position", "color_attr"]


class ShapesPairsSpec(Block):
    """Preference pairs sampled from the base model on training captions, labelled by simulated annotators."""

    count: PositiveInt = Field(1024, description="Pairs (one per training caption).")
    images_per_caption: int = Field(
        4, ge=2, description="Samples per caption (smpo pairs); the pair is the reward's best and worst of them."
    )  # fmt: skip
    reward: Literal["shapes-pickscore", "shapes-judge"] = Field(
        "shapes-pickscore",
        description="The reward that picks each caption's best and worst sample and gives the reward arms' winner "
        "and p: shapes-pickscore (the learned reward, as PickScore on real data) | shapes-judge (the evaluator "
        "itself: an ablation).",
    )
    num_inference_steps: PositiveInt = Field(20, description="DDIM steps when sampling pairs and evaluation images.")
    guidance_scale: float = Field(4.0, ge=0, description="Classifier-free guidance when sampling the pairs.")
    reward_noise_std: float = Field(0.0, ge=0, description="Gaussian noise on the judge's score used as the smoothing reward.")
    batch_size: PositiveInt = Field(64, description="Images per sampling forward pass.")
    skill_weights: dict[ShapesSkill, Annotated[float, Field(ge=0)]] | Literal["headroom"] | None = Field(
        None,
        description="Relative share of each skill among the pair captions (a skill left out gets none) | headroom: "
        "each skill in proportion to its share of pilot pairs with exactly one correct image (where best vs worst "
        "can teach; pairs.pilot_captions_per_skill) | null: the world's uniform mix. results.md lists, per skill, "
        "the pairs with one correct image.",
    )
    pilot_captions_per_skill: PositiveInt = Field(
        32, description="skill_weights=headroom: pilot captions per skill, sampled and judged like the pairs."
    )

    @model_validator(mode="after")
    def _some_skill(self) -> ShapesPairsSpec:
        weights = self.skill_weights
        if isinstance(weights, dict) and not any(w > 0 for w in weights.values()):
            raise ValueError("pairs.skill_weights: give at least one skill a weight above 0 (or null for the uniform mix)")
        return self


class ShapesMethodSpec(Block):
    """One arm of the experiment: a training method and its data."""

    name: str = Field(description="Label in the tables, e.g. smpo, dpo, smpo_no_inversion.")
    method: Literal["smpo", "dpo", "sft"] = Field(description="Loss (method.name of smpo train).")
    labels: Literal["human", "reward", "judge"] = Field(
        description="human: the sampled annotator's vote orders the pair | reward: pairs.reward's winner and p (SmPO) "
        "| judge: the judge's (the 'judge as reward' ablation)."
    )
    inversion: Literal["cache", "none"] = Field("none", description="cache: SmPO's ReNoise trajectory | none: random noise.")
    binary_labels: bool = Field(False, description="SmPO with p = 1 (no smoothing).")
    beta: float | None = Field(None, gt=0, description="null: the experiment's train.beta.")
    lr: float | None = Field(None, gt=0, description="null: the experiment's train.lr (each method's own, as chosen on "
                             "a validation split: bench/shapes_grid.py).")


def _default_arms() -> list[ShapesMethodSpec]:
    return [
        ShapesMethodSpec(name="dpo", method="dpo", labels="human", beta=5000.0),
        ShapesMethodSpec(name="smpo", method="smpo", labels="reward", inversion="cache"),
        ShapesMethodSpec(name="smpo_no_inversion", method="smpo", labels="reward"),
        ShapesMethodSpec(name="smpo_binary", method="smpo", labels="reward", inversion="cache", binary_labels=True),
        ShapesMethodSpec(name="sft", method="sft", labels="human"),
    ]


class ShapesTrainSpec(Block):
    """The compute budget every arm gets (same pairs, same steps, same batch)."""

    steps: PositiveInt = Field(200, description="Optimiser steps per run.")
    batch_size: PositiveInt = Field(16, description="Pairs per step.")
    lr: float = Field(4e-5, gt=0, description="AdamW learning rate (constant after warm-up).")
    warmup_steps: NonNegInt = Field(0, description="Linear learning-rate warm-up steps.")
    empty_prompt_prob: Probability = Field(
        0.0, description="Fraction of captions dropped (classifier-free guidance's unconditional branch, as in pretraining)."
    )
    beta: float = Field(2000.0, gt=0, description="Temperature of arms without their own beta (the paper's SD1.5 SmPO value).")
    gamma: float = Field(10.0, gt=0, description="SmPO's gamma.")
    inversion_steps: PositiveInt = Field(10, description="ReNoise grid steps of the inversion cache.")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="Training seeds per arm.")


class ShapesEvalSpec(Block):
    heldout_captions: PositiveInt = Field(48, description="GenEval-form held-out captions evaluated (all when fewer).")
    train_captions: PositiveInt = Field(48, description="GenEval-form training captions evaluated.")
    images_per_caption: PositiveInt = Field(4, description="Samples per caption (same seeds for every model).")
    images_per_skill: NonNegInt = Field(
        0,
        description="> 0: the GenEval-balanced evaluation instead: this many images per skill on training captions "
        "(the score is the mean of the skills' accuracies) and paired bootstrap intervals of every arm - base and "
        "arm - arm | 0: held-out and training captions x images_per_caption.",
    )
    max_captions_per_skill: PositiveInt = Field(64, description="Balanced evaluation: captions sampled from a large skill.")
    guidance_scale: float | None = Field(None, ge=0, description="Guidance of the evaluation images (null: pairs.guidance_scale).")
    grid_captions: PositiveInt = Field(8, description="Captions shown in the sample grids.")


class ShapesBenchRecipe(Block):
    """``smpo shapes run`` / ``smpo bench shapes``: SmPO vs DPO and ablations in the shapes world."""

    stage: Literal["shapes_bench"] = "shapes_bench"
    schema_version: int = SCHEMA_VERSION
    seed: int = Field(0, description="Seed of the pair captions, sampling, annotator votes and evaluation captions.")
    output_dir: str = Field(description="Experiment folder: pairs/, cache/, runs/, eval/, results.json, results.md, PNGs.")
    device: Literal["auto", "cpu"] = Field("cpu", description="The testbed is sized for a CPU.")
    model: str = Field("shapes-sd15", description="Base model: the shipped shapes-sd15 or a pipeline from smpo shapes pretrain.")
    split_seed: int = Field(0, description="Train/held-out caption split (must match the base model's pretraining).")
    pairs: ShapesPairsSpec = Field(default_factory=ShapesPairsSpec)
    arms: list[ShapesMethodSpec] = Field(default_factory=_default_arms, min_length=1)
    train: ShapesTrainSpec = Field(default_factory=ShapesTrainSpec)
    eval: ShapesEvalSpec = Field(default_factory=ShapesEvalSpec)
    workers: PositiveInt = Field(
        1, description="Runs trained and evaluated at a time, each in its own process with one torch thread (tiny "
        "models use a core far better with one thread: 2 on a 2-core machine).",
    )  # fmt: skip
    logging: LoggingSpec = Field(default_factory=LoggingSpec)

    @model_validator(mode="after")
    def _unique_arms(self) -> ShapesBenchRecipe:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names) or "base" in names:
            raise ValueError("arms[].name must be unique and not 'base'")
        return self


# ----------------------------------------------------------------------------- shapes reward model
class ShapesSamplesSpec(Block):
    """Images of one model for the reward model's preference pairs (Pick-a-Pic mixes several models too)."""

    model: str = Field(description="A model smpo generate takes: shapes-sd15 or a pipeline from smpo shapes pretrain.")
    captions: PositiveInt = Field(1024, description="Training captions sampled (skills uniform, as in the world).")
    images_per_caption: int = Field(4, ge=2, description="Samples per caption; every pair of them is voted on.")
    guidance_scale: float = Field(4.0, ge=0, description="Classifier-free guidance when sampling.")
    seed: int = Field(100, description="smpo generate seed (per-image seeds follow from it).")


class ShapesRewardNetSpec(Block):
    """Sizes of the CLIP model (PickScore's architecture, at the world's scale)."""

    width: PositiveInt = Field(64, description="Hidden size of both towers and of the projection.")
    vision_layers: PositiveInt = Field(3)
    text_layers: PositiveInt = Field(2)
    patch_size: PositiveInt = Field(4, description="ViT patch side in pixels (32x32 images: 64 patches at 4).")


class ShapesRewardPhaseSpec(Block):
    steps: PositiveInt = Field(description="Optimiser steps.")
    batch_size: PositiveInt = Field(description="Images (contrastive) or pairs (votes) per step.")
    lr: float = Field(gt=0, description="AdamW peak learning rate; linear warm-up, cosine decay to 0.")
    warmup_steps: NonNegInt = Field(50)


class ShapesRewardRecipe(Block):
    """``smpo shapes reward``: shapes-pickscore, the world's PickScore, trained on rendered captions then votes."""

    stage: Literal["shapes_reward"] = "shapes_reward"
    schema_version: int = SCHEMA_VERSION
    seed: int = Field(0, description="Seed of captions, votes, the held-out split, initial weights and batches.")
    output_dir: str = Field(description="Run folder: samples/, reward/ (the model folder load_reward reads), summary.json.")
    device: Literal["auto", "cpu"] = Field("cpu", description="The reward model is sized for a CPU.")
    split_seed: int = Field(0, description="World caption split: only training captions are sampled (as the base models saw).")
    samples: list[ShapesSamplesSpec] = Field(
        default_factory=lambda: [ShapesSamplesSpec(model="shapes-sd15")], min_length=1,
        description="Models whose samples make the voted pairs.",
    )  # fmt: skip
    num_inference_steps: PositiveInt = Field(20, description="DDIM steps when sampling.")
    heldout_fraction: float = Field(0.15, gt=0, lt=1, description="Share of sampled caption texts whose pairs are kept out of fine-tuning, for the held-out vote accuracy.")
    renders: PositiveInt = Field(60_000, description="Rendered scenes for contrastive pretraining.")
    net: ShapesRewardNetSpec = Field(default_factory=ShapesRewardNetSpec)
    contrastive: ShapesRewardPhaseSpec = Field(
        default_factory=lambda: ShapesRewardPhaseSpec(steps=1500, batch_size=128, lr=2e-3, warmup_steps=100)
    )
    votes: ShapesRewardPhaseSpec = Field(
        default_factory=lambda: ShapesRewardPhaseSpec(steps=600, batch_size=64, lr=2e-5, warmup_steps=50)
    )
    export_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of the saved weights.")
    logging: LoggingSpec = Field(default_factory=LoggingSpec)


# ----------------------------------------------------------------------------- registry
Recipe = ScoreRecipe | InvertRecipe | TrainRecipe | GenerateRecipe | BenchRecipe | GenevalRecipe | ShapesPretrainRecipe | ShapesBenchRecipe | ShapesRewardRecipe | PairsRecipe
STAGE_SCHEMAS: dict[str, type[Block]] = {
    "score": ScoreRecipe, "invert": InvertRecipe, "train": TrainRecipe, "generate": GenerateRecipe,
    "bench": BenchRecipe, "geneval": GenevalRecipe,
    "shapes_pretrain": ShapesPretrainRecipe, "shapes_bench": ShapesBenchRecipe, "shapes_reward": ShapesRewardRecipe,
    "pairs": PairsRecipe, "rounds": RoundsRecipe,
}  # fmt: skip
