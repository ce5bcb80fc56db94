"""Checkpoint adapters: official SlowFast ``.pyth``, torchvision state dicts and our own format -> our keys.

Layouts read (detected from the keys, never from the file name):

* **ours** ``{"model": state_dict, "config": MViTConfig-as-dict, "format": "mvit-v1"}``; the keys are the
  official fused layout, so a bare state dict of ours reads as "official fused".
* **official fused** (SlowFast, ``{"model_state": ...}``): ``blocks.i.attn.qkv.*`` - identical to ours.
* **official separate q/k/v** (SlowFast code from mid-2021 to mid-2022): ``blocks.i.attn.q|k|v.*``, fused
  here by concatenation (q, k, v order, as the fused layer's output is split).
* **older 16x4 zoo file**: separate q/k/v and no ``pool_k``/``pool_v`` in the blocks where the adaptive
  K/V stride is 1 (14 and 15); :func:`is_old_zoo_layout` detects it and the model is built without them.
* **torchvision** ``mvit_v1_b`` / ``mvit_v2_s``: ``conv_proj``, ``pos_encoding.*``, ``attn.project.0``,
  ``attn.pool_q.pool`` / ``pool_q.norm_act.0``, ``mlp.0`` / ``mlp.3``, ``project``, ``head.1``.

Files are read with ``torch.load(weights_only=True)``: only tensors and plain containers are unpickled, so
a file that would execute code is refused; an unreadable file raises ``ValueError`` naming it.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import MViTConfig

FORMAT = "mvit-v1"

_HEAD_KEYS = ("head.projection.weight", "head.projection.bias")


# --- reading ---------------------------------------------------------------------------------------
def read_checkpoint(src: str | os.PathLike | Mapping) -> tuple[dict[str, torch.Tensor], MViTConfig | None, str]:
    """Return ``(state_dict, config or None, description)`` from a path or an already loaded object."""
    if isinstance(src, Mapping):
        obj: Any = src
        where = "<state dict>"
    else:
        where = os.fspath(src)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"checkpoint not found: {where}")
        try:
            obj = torch.load(where, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - every failure mode becomes one clear error naming the file
            raise _load_error(where, e) from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a dict checkpoint (a state dict, {{'model_state': ...}} or ours), "
                         f"got {type(obj).__name__}")

    cfg = None
    if "model" in obj and isinstance(obj.get("config"), Mapping) and obj["config"]:  # ours (also training checkpoints)
        state = obj["model"]
        try:
            cfg = MViTConfig.from_dict(dict(obj["config"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: its model config is not a valid MViTConfig: {e}") from e
        where = f"{where} (mvit format)"
    elif "model_state" in obj:  # SlowFast .pyth
        state = obj["model_state"]
        where = f"{where} (SlowFast)"
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        state = obj["model"]
    else:
        state = obj
    if not isinstance(state, Mapping):
        raise ValueError(f"{where}: the weights entry is a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: state dict entries are not tensors: {bad[:10]}")
    return dict(state), cfg, where


def _load_error(where: str, e: Exception) -> ValueError:
    """A one-line reason for a failed ``torch.load(weights_only=True)``."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    blocked = [line for line in lines if "GLOBAL" in line or "Unsupported global" in line]
    if blocked:  # the pickle names a Python callable/class: loading it would execute code
        return ValueError(
            f"refusing to load {where}: it would call or build Python objects when unpickled ({blocked[0]}); "
            "only tensors and plain containers are read (torch.load(weights_only=True)). Re-save the weights "
            "as a plain state dict if you trust the file."
        )
    detail = next((line for line in lines if "WeightsUnpickler error" not in line and "Weights only load failed" not in line
                   and not line.startswith(("Please file", "Check the documentation"))), "")
    return ValueError(
        f"cannot read checkpoint {where}: corrupted, truncated or not a PyTorch file ({type(e).__name__}: {detail[:200]})"
    )


# --- key mapping -----------------------------------------------------------------------------------
_TV_RULES = [
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^pos_encoding\.class_token$", "cls_token"),
    (r"^pos_encoding\.spatial_pos$", "pos_embed_spatial"),
    (r"^pos_encoding\.temporal_pos$", "pos_embed_temporal"),
    (r"^pos_encoding\.class_pos$", "pos_embed_class"),
    (r"\.attn\.project\.0\.", ".attn.proj."),
    (r"\.attn\.pool_([qkv])\.pool\.", r".attn.pool_\1."),
    (r"\.attn\.pool_([qkv])\.norm_act\.0\.", r".attn.norm_\1."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.3\.", ".mlp.fc2."),
    (r"^(blocks\.\d+)\.project\.", r"\1.proj."),
    (r"^head\.1\.", "head.projection."),
]


def is_torchvision_layout(state: Mapping[str, Any]) -> bool:
    return "conv_proj.weight" in state or "pos_encoding.class_token" in state


def from_torchvision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ``mvit_v1_b`` / ``mvit_v2_s`` keys -> ours (= official fused)."""
    out = {}
    for k, v in state.items():
        new = k
        for pat, rep in _TV_RULES:
            new = re.sub(pat, rep, new)
        if new in ("cls_token", "pos_embed_class"):
            v = v.reshape(1, 1, -1)
        elif new in ("pos_embed_spatial", "pos_embed_temporal"):
            v = v.unsqueeze(0)
        out[new] = v
    return out


def to_torchvision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> torchvision keys (the inverse of :func:`from_torchvision`; used by tests and the benchmark)."""
    inverse = [
        (r"^patch_embed\.proj\.", "conv_proj."),
        (r"^cls_token$", "pos_encoding.class_token"),
        (r"^pos_embed_spatial$", "pos_encoding.spatial_pos"),
        (r"^pos_embed_temporal$", "pos_encoding.temporal_pos"),
        (r"^pos_embed_class$", "pos_encoding.class_pos"),
        (r"\.attn\.proj\.", ".attn.project.0."),
        (r"\.attn\.pool_([qkv])\.", r".attn.pool_\1.pool."),
        (r"\.attn\.norm_([qkv])\.", r".attn.pool_\1.norm_act.0."),
        (r"\.mlp\.fc1\.", ".mlp.0."),
        (r"\.mlp\.fc2\.", ".mlp.3."),
        (r"^(blocks\.\d+)\.proj\.", r"\1.project."),
        (r"^head\.projection\.", "head.1."),
    ]
    out = {}
    for k, v in state.items():
        new = k
        for pat, rep in inverse:
            new = re.sub(pat, rep, new)
        if k in ("cls_token", "pos_embed_class"):
            v = v.reshape(-1)
        elif k in ("pos_embed_spatial", "pos_embed_temporal"):
            v = v.squeeze(0)
        out[new] = v
    return out


def fuse_qkv(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Separate ``attn.q|k|v.*`` (older SlowFast) -> fused ``attn.qkv.*``."""
    out = dict(state)
    for key in list(state):
        m = re.match(r"^(.*\.attn)\.q\.(weight|bias)$", key)
        if not m:
            continue
        prefix, kind = m.groups()
        parts = [f"{prefix}.{n}.{kind}" for n in "qkv"]
        missing = [p for p in parts if p not in state]
        if missing:
            raise ValueError(f"separate q/k/v layout is incomplete: missing {missing}")
        out[f"{prefix}.qkv.{kind}"] = torch.cat([state[p] for p in parts], dim=0)
        for p in parts:
            del out[p]
    return out


def split_qkv(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused -> separate ``attn.q|k|v.*`` (the inverse of :func:`fuse_qkv`)."""
    out = {}
    for k, v in state.items():
        m = re.match(r"^(.*\.attn)\.qkv\.(weight|bias)$", k)
        if m:
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{m.group(1)}.{name}.{m.group(2)}"] = part.clone()
        else:
            out[k] = v
    return out


def to_mvit_keys(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Any supported layout -> our keys."""
    state = dict(state)
    for prefix in ("module.", "_orig_mod.", "model."):  # DDP / torch.compile / wrapper prefixes
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if is_torchvision_layout(state):
        state = from_torchvision(state)
    if any(re.search(r"\.attn\.q\.weight$", k) for k in state):
        state = fuse_qkv(state)
    return state


def head_size(state: Mapping[str, torch.Tensor]) -> int | None:
    w = state.get("head.projection.weight")
    return None if w is None else int(w.shape[0])


def is_old_zoo_layout(state: Mapping[str, torch.Tensor], cfg: MViTConfig) -> bool:
    """True when ``state`` lacks exactly the stride-1 K/V pooling that ``cfg`` would create."""
    stride1 = [i for i, b in enumerate(cfg.blocks) if b.kv_kernel is not None and math.prod(b.kv_stride) == 1]
    strided = [i for i, b in enumerate(cfg.blocks) if b.kv_kernel is not None and math.prod(b.kv_stride) > 1]
    if not stride1 or not strided:
        return False
    has = lambda i: f"blocks.{i}.attn.pool_k.weight" in state  # noqa: E731
    return all(has(i) for i in strided) and not any(has(i) for i in stride1)


# --- loading into a model --------------------------------------------------------------------------
def _resample_pos(name: str, value: torch.Tensor, target: torch.Tensor, model: nn.Module) -> torch.Tensor | None:
    """Resize position embeddings / rel-pos tables trained at another input size (as the forward would)."""
    if name == "pos_embed_temporal":
        return F.interpolate(value.transpose(1, 2).float(), size=target.shape[1], mode="linear").transpose(1, 2)
    if name == "pos_embed_spatial":
        hw_src, hw_dst = value.shape[1], target.shape[1]
        s, d = math.isqrt(hw_src), math.isqrt(hw_dst)
        if s * s != hw_src or d * d != hw_dst:
            return None
        c = value.shape[-1]
        v = value.reshape(1, s, s, c).permute(0, 3, 1, 2).float()
        v = F.interpolate(v, size=(d, d), mode="bilinear", align_corners=False)
        return v.flatten(2).transpose(1, 2)
    if re.search(r"\.attn\.rel_pos_[htw]$", name):
        return F.interpolate(value.t().unsqueeze(0).float(), size=target.shape[0], mode="linear").squeeze(0).t()
    return None


def _fmt(keys: list[str], limit: int = 30) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Load ``state`` (our keys) strictly, except a head of another size, which is re-initialised with a warning."""
    own = model.state_dict()
    state = dict(state)
    head_dropped = False
    for key in _HEAD_KEYS:
        if key in state and (key not in own or state[key].shape != own[key].shape):
            del state[key]
            head_dropped = True
    if head_dropped:
        if model.num_classes > 0:
            warnings.warn(
                f"{source}: classification head has a different size than num_classes={model.num_classes}; "
                "it was re-initialised",
                stacklevel=3,
            )
        else:
            warnings.warn(f"{source}: classification head dropped (num_classes=0)", stacklevel=3)
        for key in _HEAD_KEYS:
            if key in own:
                state[key] = own[key]

    bad_shape = []
    for k, v in list(state.items()):
        if k in own and v.ndim == own[k].ndim + 1 and v.ndim == 5 and v.shape[2] == 1:
            # The official image model keeps 3-D pooling convs with a temporal kernel of 1 ((1, 3, 3) on
            # T = 1); here it is 2-D: the same weights without that axis.
            state[k] = v = v.squeeze(2)
        if k in own and v.shape != own[k].shape:
            resized = _resample_pos(k, v, own[k], model)
            if resized is None or resized.shape != own[k].shape:
                bad_shape.append(f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}")
            else:
                state[k] = resized.to(v.dtype)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatches: {_fmt(bad_shape)}")
    if problems:
        raise ValueError(f"checkpoint {source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    """Write our format: ``{"model": state_dict, "config": dict, "format": "mvit-v1", **extra}``."""
    cfg: MViTConfig = model.cfg.replace(num_classes=model.num_classes)
    obj = {"model": model.state_dict(), "config": cfg.to_dict(), "format": FORMAT, **extra}
    torch.save(obj, path)


def load_model(src: str | os.PathLike | Mapping, **overrides: Any) -> nn.Module:
    """Build and load a model from one of our own checkpoints (its config says what to build, including
    the head: classifier or AVA detector)."""
    from .registry import build_model

    state, cfg, where = read_checkpoint(src)
    if cfg is None:
        raise ValueError(f"{where} carries no config; use create_model(name, checkpoint=...) instead")
    model = build_model(cfg.replace(**overrides))
    load_state(model, to_mvit_keys(state, where), where)
    return model
