"""The pieces of resumable, elastic, guarded training that run without Ray: batch plans and gradient
accumulation, the finite-step check, the progress meter, generator states and the checkpoint format."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import mvit
from pipelines import artifact
from pipelines.config import ConfigError, load_config
from pipelines.train.config import BatchPlan, FaultConfig, TrainConfig
from pipelines.train.progress import Progress
from pipelines.train.steps import accumulate_gradients, check_step, grouped


def test_the_global_batch_is_cut_into_micro_batches_spread_over_the_ranks():
    plan = BatchPlan.of(32, 8, 3)  # 4 micro-batches of 8 on 3 ranks
    assert [plan.accumulation(r) for r in range(3)] == [2, 1, 1] and plan.accumulations == "1-2"
    assert plan.describe() == "3 workers x 1-2 micro-batches of 8 = global batch 32"
    assert BatchPlan.of(16, 4, 2).accumulations == "2" and BatchPlan.of(16, 4, 4).accumulations == "1"
    assert all(BatchPlan.of(64, 8, w).global_batch == 64 for w in range(1, 9))
    with pytest.raises(ValueError, match="global_batch_size.*18 videos is not a multiple of batch_size \\(4\\)"):
        BatchPlan.of(18, 4, 2)
    with pytest.raises(ValueError, match="global_batch_size.*each of 3 workers"):
        BatchPlan.of(8, 4, 3)  # fewer micro-batches than ranks


def test_an_elastic_range_needs_a_global_batch_every_world_size_can_take():
    base = ["dataset=x", "batch_size=4", "num_workers=3"]
    cfg = load_config(TrainConfig, None, base)
    assert cfg.global_batch() == 12 and list(cfg.world_sizes()) == [3]
    elastic = load_config(TrainConfig, None, [*base, "min_workers=1"])
    assert list(elastic.world_sizes()) == [1, 2, 3] and elastic.global_batch() == 12
    with pytest.raises((ValueError, ConfigError), match="global_batch_size"):
        load_config(TrainConfig, None, [*base, "min_workers=1", "global_batch_size=10"])


def _gradients(model):
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("world", [1, 2, 3])
def test_accumulated_gradients_average_to_those_of_the_whole_batch_however_the_ranks_share_it(world):
    """What DDP computes, the mean over ranks of each rank's accumulated gradients, equals the gradient of
    one batch of all 16 clips, for micro-batches spread evenly (1, 2 ranks) or not (3 ranks: 2+1+1)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    clips, labels = torch.randn(16, 5), torch.randint(0, 3, (16,))

    def loss_of(batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    loss_of((clips, labels)).backward()
    whole = _gradients(model)
    whole_loss = float(loss_of((clips, labels)).detach())
    model.zero_grad()
    plan = BatchPlan.of(16, 4, world)
    micro = iter([(clips[i:i + 4], labels[i:i + 4]) for i in range(0, 16, 4)])
    per_rank, loss_sum = [], 0.0
    for rank in range(world):
        batches = [next(micro) for _ in range(plan.accumulation(rank))]
        loss_sum += float(accumulate_gradients(model, batches, loss_of, plan.loss_scale))
        per_rank.append(_gradients(model))
    ddp_mean = [sum(grads) / world for grads in zip(*per_rank)]
    # float32 sums of 16 terms in another order: agreement to a few ulps of values of order 1
    for got, want in zip(ddp_mean, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert loss_sum / plan.micro_batches == pytest.approx(whole_loss, rel=1e-5)


def test_groups_are_full_steps_only():
    assert list(grouped(range(7), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(grouped(range(4), 1)) == [[0], [1], [2], [3]]


def test_a_step_is_finite_only_if_loss_and_gradient_norm_are():
    assert check_step(torch.tensor(3.0), torch.tensor(0.5), micro_batches=2).finite
    assert check_step(torch.tensor(3.0), torch.tensor(0.5), micro_batches=2).mean_loss == 1.5
    for loss, norm in ((math.nan, 1.0), (1.0, math.inf), (-math.inf, 1.0)):
        checked = check_step(torch.tensor(loss), torch.tensor(norm), micro_batches=1)
        assert not checked.finite and math.isnan(checked.mean_loss)


def test_injected_nan_steps():
    assert [s for s in range(1, 10) if FaultConfig(4, 1).nan_at(s)] == [4]
    assert [s for s in range(1, 10) if FaultConfig(4, 2).nan_at(s)] == [4, 5]
    assert [s for s in range(1, 10) if FaultConfig(6, -1).nan_at(s)] == [6, 7, 8, 9]
    assert not any(FaultConfig().nan_at(s) for s in range(1, 10))


def test_progress_reports_throughput_data_wait_and_eta_of_its_window():
    now = [0.0]
    progress = Progress(epochs=2, steps_per_epoch=10, clock=lambda: now[0])

    def slow_loader():
        for item in range(3):
            now[0] += 0.5  # waiting for the batch
            yield item

    for _ in progress.timed(slow_loader()):
        now[0] += 1.5  # the step itself
        progress.stepped(clips=8)
    line, metrics = progress.report(step=3, epoch=0, loss=1.25, lr=1e-3)
    # 3 steps of 2 s: 24 clips in 6 s, 1.5 s of it waiting, 17 steps left at 2 s each
    assert metrics["train/clips_per_s"] == pytest.approx(4.0)
    assert metrics["train/data_wait_fraction"] == pytest.approx(0.25)
    assert metrics["train/eta_s"] == pytest.approx(34.0)
    assert line == ("[train] epoch 1/2 step 3/20 (15%) loss 1.2500 lr 1.00e-03 | 4.0 clips/s, data wait 25% "
                    "| ETA 0m34s")
    now[0] += 10.0  # the next window starts at the report
    progress.stepped(clips=8)
    assert progress.report(step=4, epoch=0, loss=1.0, lr=1e-3)[1]["train/clips_per_s"] == pytest.approx(0.8)


def test_generator_states_round_trip_through_a_checkpoint_file(tmp_path):
    from pipelines.train import rng

    device = torch.device("cpu")
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = rng.capture(device)
    path = tmp_path / "rng.pt"
    torch.save({"rng": [state]}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    rng.restore(torch.load(path, weights_only=True)["rng"][0], device)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def _training_state(tmp_path, **extra):
    model = mvit.create_model("mvit_debug", num_classes=3, input_size=(4, 32, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    path = artifact.save_training_state(tmp_path, model, optimizer, scheduler, epoch=2, step=30, model_name="mvit_debug",
                                        train_config={"clip": {"num_frames": 4, "crop_size": 32}},
                                        label_map={"a": 0, "b": 1, "c": 2}, **extra)
    return model, artifact.read_local(path)


def test_a_step_checkpoint_holds_its_position_and_every_ranks_generators(tmp_path):
    from pipelines.train import rng

    states = [rng.capture(torch.device("cpu"))] * 2
    _, state = _training_state(tmp_path, position={"epoch": 2, "step_in_epoch": 7, "epoch_loss_sum": 1.5},
                               rng=states, world_size=2)
    assert state["format"] == "mvit-train-v2"
    assert artifact.resume_position(state) == (2, 7)
    assert len(state["rng"]) == 2 and torch.equal(state["rng"][1]["torch"], states[1]["torch"])
    _, end_of_epoch = _training_state(tmp_path)
    assert artifact.resume_position(end_of_epoch) == (3, 0)


def test_checkpoints_of_the_previous_format_still_resume_and_load(tmp_path):
    model, state = _training_state(tmp_path)
    old = {k: v for k, v in state.items() if k not in ("position", "rng", "world_size", "skipped_steps")}
    old["format"] = "mvit-train-v1"
    assert artifact.resume_position(old) == (3, 0)  # v1 was written at epoch ends: go on with the next
    trained = artifact.TrainedModel.from_state(old)
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained.model(x), model.eval()(x))
    assert trained.step == 30 and trained.labels == ["a", "b", "c"]


def test_best_and_latest_resolve_through_the_run_directory(tmp_path):
    run_dir = str(tmp_path / "run")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"")
    assert artifact.resolve(str(tmp_path / "ckpt")).checkpoint == str(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="run_dir"):
        artifact.resolve("best")
    with pytest.raises(FileNotFoundError, match="best.json does not exist.*evaluated yet"):
        artifact.resolve("best", run_dir)
    with pytest.raises(FileNotFoundError, match="result.json does not exist.*not finished"):
        artifact.resolve("latest", run_dir)
    artifact.write_best(run_dir, f"{run_dir}/checkpoint_step00000012", {"val/top1": 0.75, "step": 12})
    assert artifact.resolve("best", run_dir) == artifact.CheckpointRef(f"{run_dir}/checkpoint_step00000012")
    (tmp_path / "run" / "result.json").write_text('{"checkpoint": "latest-one", "mlflow_run_id": "r1"}')
    assert artifact.resolve("best", run_dir) == artifact.CheckpointRef(f"{run_dir}/checkpoint_step00000012", "r1")
    assert artifact.resolve("latest", run_dir) == artifact.CheckpointRef("latest-one", "r1")
    assert artifact.resolve(run_dir) == artifact.CheckpointRef("latest-one", "r1")  # the run directory itself
