"""Checkpoint loading: official SlowFast layouts and torchvision weights give torchvision's logits; bad files fail clearly.

The reference is torchvision's ``mvit_v1_b`` / ``mvit_v2_s`` (ports of the official weights) with random
weights. The official SlowFast key layout is produced here by an independent re-keying (written from the
layout list in docs/reference.md), not by mvit.checkpoint, so a wrong mapping in either shows up
as different logits.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import warnings

import pytest
import torch
import torchvision.models.video as tvv

import mvit
from mvit.checkpoint import load_model, read_checkpoint, save_checkpoint
from pipelines.commands import convert as convert_cmd

TOL = 1e-4

# torchvision key -> official SlowFast key (docs/reference.md, "Official checkpoints")
_TV_TO_SLOWFAST = [
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^pos_encoding\.class_token$", "cls_token"),
    (r"^pos_encoding\.spatial_pos$", "pos_embed_spatial"),
    (r"^pos_encoding\.temporal_pos$", "pos_embed_temporal"),
    (r"^pos_encoding\.class_pos$", "pos_embed_class"),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.project\.0\.", r"blocks.\1.attn.proj."),
    (r"^blocks\.(\d+)\.attn\.pool_(q|k|v)\.pool\.", r"blocks.\1.attn.pool_\2."),
    (r"^blocks\.(\d+)\.attn\.pool_(q|k|v)\.norm_act\.0\.", r"blocks.\1.attn.norm_\2."),
    (r"^blocks\.(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.3\.", r"blocks.\1.mlp.fc2."),
    (r"^blocks\.(\d+)\.project\.", r"blocks.\1.proj."),
    (r"^head\.1\.", "head.projection."),
]


def slowfast_state(tv_state: dict, separate_qkv: bool = False) -> dict:
    out = {}
    for key, value in tv_state.items():
        new = key
        for pat, rep in _TV_TO_SLOWFAST:
            new = re.sub(pat, rep, new)
        if new in ("cls_token", "pos_embed_class"):
            value = value.reshape(1, 1, -1)  # SlowFast: [1, 1, C]; torchvision: [C]
        elif new in ("pos_embed_spatial", "pos_embed_temporal"):
            value = value.unsqueeze(0)
        m = re.match(r"^(blocks\.\d+\.attn)\.qkv\.(weight|bias)$", new)
        if separate_qkv and m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{m.group(1)}.{name}.{m.group(2)}"] = part.clone()
            continue
        out[new] = value.clone()
    return out


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere (norm scales around 1, biases and embeddings non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model.eval()


class Reference:
    def __init__(self, builder, seed: int) -> None:
        self.tv = randomize(builder(), seed)
        self.x = torch.randn(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            self.logits = self.tv(self.x)
        self.state = self.tv.state_dict()


@pytest.fixture(scope="module")
def v1() -> Reference:
    return Reference(tvv.mvit_v1_b, seed=0)


@pytest.fixture(scope="module")
def v2() -> Reference:
    return Reference(tvv.mvit_v2_s, seed=10)


def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"max |logit difference| {diff:.2e} > {TOL}"


def pyth(tmp_path, state: dict, name: str = "model.pyth") -> str:
    """A SlowFast-style checkpoint file: the weights under "model_state" plus the other entries it has."""
    path = tmp_path / name
    torch.save({"epoch": 200, "model_state": state, "optimizer_state": {}, "cfg": "MVIT: {...}"}, path)
    return str(path)


# --- equivalence with torchvision ----------------------------------------------------------------------
# One forward pass of a 16x224x224 clip costs seconds here, so each weight layout is compared by logits once
# per model version (the official fused .pyth file); the other layouts must then load to bit-identical
# weights, which gives the same logits.
@pytest.fixture(scope="module")
def v1_loaded(v1, tmp_path_factory) -> torch.nn.Module:
    path = pyth(tmp_path_factory.mktemp("v1"), slowfast_state(v1.state))
    return mvit.create_model("mvit_b_16x4", checkpoint=path)


@pytest.fixture(scope="module")
def v2_loaded(v2, tmp_path_factory) -> torch.nn.Module:
    path = pyth(tmp_path_factory.mktemp("v2"), slowfast_state(v2.state))
    return mvit.create_model("mvitv2_s_16x4", checkpoint=path)


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ref = reference.state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(got[k], v), f"{k} differs"


def test_v1_official_fused_pyth_matches_torchvision(v1, v1_loaded):
    assert v1_loaded.num_classes == 400 and v1_loaded.cfg.kv_pool_stride1
    assert_close(logits_of(v1_loaded, v1.x), v1.logits)


def test_v2_official_fused_pyth_matches_torchvision(v2, v2_loaded):
    assert_close(logits_of(v2_loaded, v2.x), v2.logits)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("layout", ["separate_qkv", "torchvision"])
def test_other_layouts_load_the_same_weights(request, tmp_path, version, layout):
    ref: Reference = request.getfixturevalue(version)
    loaded = request.getfixturevalue(f"{version}_loaded")
    src = ref.state if layout == "torchvision" else pyth(tmp_path, slowfast_state(ref.state, separate_qkv=True))
    model = mvit.create_model("mvit_b_16x4" if version == "v1" else "mvitv2_s_16x4", checkpoint=src)
    assert_same_weights(model, loaded)


def test_v1_old_zoo_layout_without_stride1_kv_pooling(v1, tmp_path):
    # The older 16x4 zoo file: separate q/k/v and no pool_k/pool_v (nor their norms) in blocks 14 and 15,
    # where the adaptive K/V stride is 1. Reference: torchvision's model with those poolings removed.
    ref = copy.deepcopy(v1.tv)
    for i in (14, 15):
        ref.blocks[i].attn.pool_k = None
        ref.blocks[i].attn.pool_v = None
    state = {k: v for k, v in slowfast_state(v1.state, separate_qkv=True).items()
             if not re.match(r"^blocks\.1[45]\.attn\.(pool|norm)_[kv]\.", k)}
    model = mvit.create_model("mvit_b_16x4", checkpoint=pyth(tmp_path, state))
    assert not model.cfg.kv_pool_stride1
    assert model.blocks[14].attn.pool_k is None and model.blocks[13].attn.pool_k is not None
    assert_close(logits_of(model, v1.x), logits_of(ref, v1.x))


def test_convert_command_writes_our_format(v1, v1_loaded, tmp_path, capsys):
    src = pyth(tmp_path, slowfast_state(v1.state, separate_qkv=True))
    out = tmp_path / "converted" / "mvit_b_16x4.pt"
    assert convert_cmd.main([src, str(out), "--model", "mvit_b_16x4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["params"] == 36_610_672 and summary["num_classes"] == 400

    state, cfg, _ = read_checkpoint(out)
    assert cfg == mvit.get_config("mvit_b_16x4")
    assert "blocks.0.attn.qkv.weight" in state and "blocks.0.attn.q.weight" not in state
    assert_same_weights(load_model(out), v1_loaded)
    assert_same_weights(mvit.create_model("mvit_b_16x4", checkpoint=out), v1_loaded)


# --- conversion details on the small debug model ------------------------------------------------------
def test_convert_torchvision_layout_and_new_head(tmp_path, capsys):
    src_model = mvit.create_model("mvit_debug")
    tv_file = tmp_path / "tv.pt"
    from mvit.checkpoint import to_torchvision

    torch.save(to_torchvision(src_model.state_dict()), tv_file)
    out = tmp_path / "ours.pt"
    assert convert_cmd.main([str(tv_file), str(out), "--model", "mvit_debug", "--num-classes", "3"]) == 0
    captured = capsys.readouterr()
    assert "re-initialised" in captured.err
    model = load_model(out)
    assert model.num_classes == 3 and model.head.projection.weight.shape == (3, 128)
    for k, v in src_model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, model.state_dict()[k]), k


def test_convert_reports_mismatching_keys(tmp_path, capsys):
    state = mvit.create_model("mvit_debug").state_dict()
    del state["blocks.1.mlp.fc1.weight"]
    state["blocks.1.extra.weight"] = torch.zeros(1)
    src = pyth(tmp_path, state)
    assert convert_cmd.main([src, str(tmp_path / "o.pt"), "--model", "mvit_debug"]) == 1
    err = capsys.readouterr().err
    assert "missing keys: blocks.1.mlp.fc1.weight" in err and "unexpected keys: blocks.1.extra.weight" in err
    assert not (tmp_path / "o.pt").exists()


def test_head_of_other_size_is_reinitialised_with_warning():
    state = mvit.create_model("mvit_debug").state_dict()
    with pytest.warns(UserWarning, match="re-initialised"):
        model = mvit.create_model("mvit_debug", checkpoint=state, num_classes=7)
    assert model.head.projection.weight.shape == (7, 128)
    kept = mvit.create_model("mvit_debug", checkpoint=state)  # no num_classes: the checkpoint's head
    assert torch.equal(kept.head.projection.weight, state["head.projection.weight"])


def test_wrapper_prefixes_and_training_checkpoint(tmp_path):
    """DDP's "module." prefix is stripped; a training checkpoint with asdict(cfg) (derived fields included) loads."""
    from dataclasses import asdict

    src = mvit.create_model("mvitv2_debug", input_size=(4, 32, 32))
    path = tmp_path / "train.pt"
    torch.save({"format": "mvit-train-v1", "model": {f"module.{k}": v for k, v in src.state_dict().items()},
                "config": asdict(src.cfg), "optimizer": {}, "epoch": 3}, path)
    model = mvit.create_model("mvitv2_debug", checkpoint=path)
    assert model.cfg == src.cfg
    x = torch.randn(1, 3, 4, 32, 32)
    assert torch.equal(logits_of(model, x), logits_of(src, x))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "debug.pt"
    save_checkpoint(mvit.create_model("mvit_debug"), path)
    with pytest.raises(ValueError, match="another architecture.*embed_dim=32"):
        mvit.create_model("mvit_b_16x4", checkpoint=path)


@pytest.mark.parametrize("name", ["mvit_debug", "mvitv2_debug"])
def test_embeddings_trained_at_another_size_are_resampled(name):
    """Loading into a model built for another input size resizes the position embeddings / rel-pos tables
    exactly as the forward interpolates them at run time."""
    src = mvit.create_model(name)  # built for 8x32x32
    big = mvit.create_model(name, checkpoint=src.state_dict(), input_size=(16, 64, 64))
    assert big.cfg.input_size == (16, 64, 64)
    x = torch.randn(1, 3, 16, 64, 64)
    diff = (logits_of(big, x) - logits_of(src, x)).abs().max().item()
    assert diff < 1e-5


def test_official_image_layout_with_3d_pool_kernels():
    """The official image model keeps (1, 3, 3) Conv3d pooling kernels: they load into our 2-D ones."""
    src = mvit.create_model("mvit_b16_in1k", input_size=(64, 64))
    state = {k: (v.unsqueeze(2) if re.search(r"attn\.pool_[qkv]\.weight$", k) else v) for k, v in src.state_dict().items()}
    assert state["blocks.0.attn.pool_k.weight"].shape == (96, 1, 1, 3, 3)
    model = mvit.create_model("mvit_b16_in1k", checkpoint=state, input_size=(64, 64))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(logits_of(model, x), logits_of(src, x))


# --- bad files -------------------------------------------------------------------------------------------
def test_corrupted_and_truncated_files_give_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pyth"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*garbage\.pyth: corrupted, truncated"):
        mvit.create_model("mvit_debug", checkpoint=garbage)

    buf = io.BytesIO()
    torch.save({"model_state": mvit.create_model("mvit_debug").state_dict()}, buf)
    truncated = tmp_path / "truncated.pyth"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*truncated\.pyth"):
        mvit.create_model("mvit_debug", checkpoint=truncated)

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        mvit.create_model("mvit_debug", checkpoint=tmp_path / "missing.pyth")

    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="expected a dict checkpoint"):
        mvit.create_model("mvit_debug", checkpoint=not_a_dict)


class _RunsCodeWhenUnpickled:
    """Pickles to "call os.mkdir(marker)": a checkpoint that would execute code if unpickled unsafely."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pyth"
    torch.save({"model_state": {"w": torch.zeros(1)}, "payload": _RunsCodeWhenUnpickled(str(marker))}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"refusing to load .*evil\.pyth.*posix\.mkdir"):
            mvit.create_model("mvit_debug", checkpoint=path)
    assert not marker.exists(), "the pickled call was executed"
    # The same file unpickled without weights_only really would run it (so the test above is meaningful).
    torch.load(path, weights_only=False)
    assert marker.exists()
