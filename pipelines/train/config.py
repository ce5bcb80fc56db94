"""Typed config of a training job (stored in every checkpoint: see pipelines/artifact.py)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from omegaconf import MISSING

from pipelines.data.clips import ClipConfig
from pipelines.raycluster import RayConfig
from pipelines.tracking import MlflowConfig


@dataclass
class OptimConfig:
    """The optimizer, LR schedule and loss of a run (pipelines/train/optim.py, objective.py)."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 1.6e-3  # at the global batch `lr_batch`; scaled linearly to the run's effective global batch
    lr_batch: int = 512  # videos per optimizer step at which `lr` holds
    global_batch: int = 0  # videos per optimizer step: > batch_size x workers accumulates gradients (0: no accumulation)
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
    batch_size: int = 8  # videos per worker per step (the model sees batch_size x clip.repeated_augment clips)
    num_workers: int = 2
    cpus_per_worker: int = 1
    use_gpu: bool = False
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    activation_checkpointing: bool = False
    shuffle_buffer: int = 256
    loader_workers: int = 0  # DataLoader processes per training worker
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before giving up
    checkpoints_to_keep: int = 2
    log_every_steps: int = 10
    audit_sample_keys: bool = False  # write the keys each rank trained on (data-lineage audits)
    seed: int = 0
    clip: ClipConfig = field(default_factory=ClipConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    # Where the job runs, not what it trains: left out of the workflow's config hash.
    NOT_AFFECTING_OUTPUT: ClassVar[tuple[str, ...]] = ("ray",)

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
        for key in ("epochs", "batch_size", "num_workers", "cpus_per_worker"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")

    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        # The run's identity: what it trains, not where it runs or logs (a rerun resumes the same run).
        keep = {k: v for k, v in asdict(self).items() if k not in (*self.NOT_AFFECTING_OUTPUT, "mlflow", "run_name")}
        digest = hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.model}-{digest}"
