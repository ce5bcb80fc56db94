"""Typed config of a training job (stored in every checkpoint: see pipelines/artifact.py)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from omegaconf import MISSING

from pipelines.data.clips import ClipConfig
from pipelines.detection.config import DetectionConfig
from pipelines.raycluster import RayConfig
from pipelines.tracking import MlflowConfig


@dataclass
class OptimConfig:
    """The optimizer, LR schedule and loss of a run (pipelines/train/optim.py, objective.py)."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 1.6e-3  # at the global batch `lr_batch`; scaled linearly to the run's effective global batch
    lr_batch: int = 512  # videos per optimizer step at which `lr` holds
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 0.05  # never on 1-D params (norms, biases)
    zero_decay_pos_cls: bool = False  # no decay on position embeddings / cls token / rel-pos tables either
    warmup_epochs: float = 30.0
    warmup_start_factor: float = 1e-3  # warmup starts at lr x this
    min_lr: float = 1e-6  # cosine ends here (at the scaled lr; layer decay scales it per group)
    grad_clip: float = 1.0  # max global L2 norm (0: off)
    label_smoothing: float = 0.1  # folded into the soft targets (with or without MixUp)
    layer_decay: float = 1.0  # layer-wise LR decay (fine-tuning): block i of D gets lr x layer_decay^(D - i)
    head_lr_mult: float = 1.0  # the head's LR relative to the rest
    freeze_backbone: bool = False  # train the head only (linear probe)


@dataclass
class MixupConfig:
    """MixUp / CutMix (pipelines/train/objective.py); label smoothing is optim.label_smoothing."""

    enabled: bool = False
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5  # share of batches that get CutMix instead of MixUp


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is cut: `micro_batches` forward passes of `micro_batch` clips per optimizer step,
    spread over `world` ranks (rank r takes `accumulation(r)` of them: as even as the division allows)."""

    micro_batch: int
    world: int
    micro_batches: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.micro_batches

    def accumulation(self, rank: int) -> int:
        """The micro-batches rank `rank` accumulates per optimizer step."""
        return self.micro_batches // self.world + (rank < self.micro_batches % self.world)

    @property
    def loss_scale(self) -> float:
        """What each micro-batch's (mean) loss is multiplied by before backward: DDP averages the ranks'
        gradients, so world / micro_batches makes the step's gradient the mean over all its clips, however
        unevenly the micro-batches fall on the ranks."""
        return self.world / self.micro_batches

    @property
    def accumulations(self) -> str:
        """The micro-batches a rank accumulates per step: "2", or "1-2" when the ranks' shares differ."""
        low, high = self.accumulation(self.world - 1), self.accumulation(0)
        return str(high) if low == high else f"{low}-{high}"

    def describe(self) -> str:
        return (f"{self.world} workers x {self.accumulations} micro-batches of {self.micro_batch} = global batch "
                f"{self.global_batch}")

    @classmethod
    def of(cls, global_batch: int, micro_batch: int, world: int) -> "BatchPlan":
        micro_batches, left = divmod(global_batch, micro_batch)
        if left or micro_batches < world:
            raise ValueError(
                f"config key 'global_batch_size': {global_batch} videos is not a multiple of batch_size ({micro_batch}) "
                f"of at least one micro-batch for each of {world} workers; make it a multiple of batch_size and at "
                "least batch_size x num_workers"
            )
        return cls(micro_batch, world, micro_batches)


@dataclass
class FaultConfig:
    """Faults injected on purpose, to test the run's defences (tests only; never set in a recipe)."""

    nan_loss_at_step: int = 0  # rank 0's loss is NaN at this optimizer step (1-based; 0 = never) ...
    nan_loss_steps: int = 1  # ... and at the steps after it, this many in all (-1 = every step from there)

    def nan_at(self, step: int) -> bool:
        if self.nan_loss_at_step <= 0 or step < self.nan_loss_at_step:
            return False
        return self.nan_loss_steps < 0 or step < self.nan_loss_at_step + self.nan_loss_steps


@dataclass
class TrainConfig:
    dataset: str = MISSING  # preprocessed dataset prefix (holds manifest.json)
    storage_path: str = "runs"  # checkpoints and run state, local or s3://
    run_name: str = ""  # "" = derived from the config, so rerunning the same command resumes
    model: str = "mvit_b_16x4"
    # Weights to start from: a path or s3:// URI (ours, SlowFast .pyth, torchvision), models:/NAME@alias,
    # models:/NAME/VERSION or runs:/RUN_ID/path; read once by the driver (pipelines/train/init.py).
    init_checkpoint: str = ""
    drop_path_rate: float = -1.0  # < 0: the variant's default
    epochs: int = 200
    # videos per worker and forward pass (a micro-batch; the model sees batch_size x clip.repeated_augment clips)
    batch_size: int = 8
    # Videos per optimizer step over all workers (a multiple of batch_size); 0 = batch_size x num_workers.
    # With fewer workers (min_workers), gradient accumulation makes up the difference: lr and steps stay.
    global_batch_size: int = 0
    num_workers: int = 2  # the workers the run asks for (the most it uses)
    min_workers: int = 0  # > 0 and < num_workers: elastic, goes on with as few as this many (0 = fixed)
    cpus_per_worker: int = 1
    use_gpu: bool = False
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    activation_checkpointing: bool = False
    shuffle_buffer: int = 256
    loader_workers: int = 0  # DataLoader processes per training worker
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before giving up
    checkpoint_every_steps: int = 0  # also checkpoint every this many steps (0 = at epoch ends only)
    checkpoints_to_keep: int = 2  # the best this many by val/top1, plus always the latest
    max_bad_steps: int = 5  # stop after this many non-finite (skipped) steps in a row
    log_every_steps: int = 10  # a progress line and the step metrics every this many steps
    system_metrics_interval_s: float = 10.0  # MLflow system metrics (CPU, memory, GPU) sampling; 0 = off
    audit_sample_keys: bool = False  # write the keys each rank trained on (data-lineage audits)
    seed: int = 0
    clip: ClipConfig = field(default_factory=ClipConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)  # AVA datasets only
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)

    # Where the job runs and how it is watched, not what it trains: left out of the workflow's config hash
    # and the run name (so a rerun that only checkpoints more often still resumes the same run).
    NOT_AFFECTING_OUTPUT: ClassVar[tuple[str, ...]] = (
        "ray", "checkpoint_every_steps", "system_metrics_interval_s", "min_workers", "max_bad_steps",
    )

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"config key 'precision' must be fp32 or bf16, got {self.precision!r}")
        self.clip.validate()
        if self.optim.name not in ("adamw", "sgd"):
            raise ValueError(f"config key 'optim.name' must be adamw or sgd, got {self.optim.name!r}")
        if self.mixup.enabled and self.batch_size * self.clip.repeated_augment < 2:
            raise ValueError("config key 'mixup.enabled' needs >= 2 clips per batch (batch_size x clip.repeated_augment)")
        if not 0 < self.optim.layer_decay <= 1:
            raise ValueError(f"config key 'optim.layer_decay' must be in (0, 1], got {self.optim.layer_decay}")
        for key in ("epochs", "batch_size", "num_workers", "cpus_per_worker", "max_bad_steps", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("global_batch_size", "min_workers", "checkpoint_every_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key '{key}' must be >= 0, got {getattr(self, key)}")
        if self.min_workers > self.num_workers:
            raise ValueError(f"config key 'min_workers' ({self.min_workers}) exceeds num_workers ({self.num_workers})")
        for world in self.world_sizes():
            BatchPlan.of(self.global_batch(), self.batch_size, world)
        self.detection.validate()

    def global_batch(self) -> int:
        """Clips per optimizer step, whatever the number of workers."""
        return self.global_batch_size or self.batch_size * self.num_workers

    def world_sizes(self) -> range:
        """The numbers of workers the run may train with (one unless elastic)."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)

    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        # The run's identity: what it trains, not where it runs or logs (a rerun resumes the same run).
        keep = {k: v for k, v in asdict(self).items() if k not in (*self.NOT_AFFECTING_OUTPUT, "mlflow", "run_name")}
        digest = hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.model}-{digest}"
