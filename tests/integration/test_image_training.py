"""The image MViT through the same pipeline as video: an ImageNet-style folder -> `jpg` shards ->
`mvit train` (2 DDP workers, the image recipe's augmentations) -> `mvit evaluate`."""

from __future__ import annotations

import pytest

from pipelines.config import load_config
from pipelines.data.synthetic import TEXTURE_NAMES, generate_images
from pipelines.evaluate.job import EvaluateConfig
from pipelines.evaluate.job import run as evaluate
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.job import run as preprocess
from pipelines.train.config import TrainConfig
from pipelines.train.job import run as train

pytestmark = pytest.mark.integration

# 4 texture classes: chance is 0.25.
GOAL = 0.85


@pytest.mark.timeout(1800)  # preprocess + 12 epochs + evaluate: 7.5 min on this shared machine under load
def test_image_variant_trains_on_jpg_shards_to_the_goal(services, ray_session, tmp_path):
    source = generate_images(tmp_path / "images", images_per_class=160, size=40)
    manifest = preprocess(load_config(PreprocessConfig, None, [
        f"source={source}", f"output={tmp_path / 'shards'}", "source_format=imagefolder", "short_side=40",
        "max_samples_per_shard=80",
    ]))
    assert manifest.splits == {"train": 4 * 120, "val": 4 * 40}
    assert set(manifest.label_map) == set(TEXTURE_NAMES)
    trained = train(load_config(TrainConfig, None, [
        f"dataset={tmp_path / 'shards'}", f"storage_path={tmp_path / 'runs'}", "model=mvit_image_debug", "epochs=12",
        "batch_size=8", "num_workers=2", "log_every_steps=10", "mlflow.experiment=image-it",
        "clip.crop_size=32", "clip.test_short_side=36", "clip.train_crop=random_resized", "clip.min_crop_scale=0.35",
        "clip.horizontal_flip=true", "clip.erase_prob=0.25", "clip.mean=[0.485,0.456,0.406]",
        "clip.std=[0.229,0.224,0.225]", "optim.lr=1e-3", "optim.lr_batch=16", "optim.warmup_epochs=1",
        "optim.label_smoothing=0.1",
    ]))
    report = evaluate(load_config(EvaluateConfig, None, [
        f"dataset={tmp_path / 'shards'}", f"checkpoint={trained.checkpoint}", "spatial_views=3",
    ]))
    print(f"image variant: val top-1 {report.top1:.3f} (3 crops), training {trained.metrics}")
    assert report.videos == 160 and report.spatial_views == 3
    assert report.top1 >= GOAL, report
