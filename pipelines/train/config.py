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
    lr: float = 1.6e-3  # at the global batch `lr_batch`; scaled linearly to the real global batch
    lr_batch: int = 512
    weight_decay: float = 0.05  # not applied to 1-D params (norms, biases) or embeddings
    warmup_epochs: float = 30.0
    warmup_start_factor: float = 1e-3
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    label_smoothing: float = 0.1


@dataclass
class TrainConfig:
    dataset: str = MISSING  # preprocessed dataset prefix (holds manifest.json)
    storage_path: str = "runs"  # checkpoints and run state, local or s3://
    run_name: str = ""  # "" = derived from the config, so rerunning the same command resumes
    model: str = "mvit_b_16x4"
    init_checkpoint: str = ""  # optional weights to start from (SlowFast .pyth, torchvision, ours)
    drop_path_rate: float = -1.0  # < 0: the variant's default
    epochs: int = 200
    batch_size: int = 8  # per worker
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
    detection: DetectionConfig = field(default_factory=DetectionConfig)  # AVA datasets only
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    # Where the job runs, not what it trains: left out of the workflow's config hash.
    NOT_AFFECTING_OUTPUT: ClassVar[tuple[str, ...]] = ("ray",)

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"config key 'precision' must be fp32 or bf16, got {self.precision!r}")
        if self.clip.train_crop not in ("random", "random_resized"):
            raise ValueError(f"config key 'clip.train_crop' must be random or random_resized, got {self.clip.train_crop!r}")
        for key in ("epochs", "batch_size", "num_workers", "cpus_per_worker"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        self.detection.validate()

    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        # The run's identity: what it trains, not where it runs or logs (a rerun resumes the same run).
        keep = {k: v for k, v in asdict(self).items() if k not in (*self.NOT_AFFECTING_OUTPUT, "mlflow", "run_name")}
        digest = hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.model}-{digest}"
