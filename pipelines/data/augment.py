"""The training augmentations of the MViT / MViTv2 recipes (docs/recipes.md) as pure functions.

Layouts: a clip is (T, C, H, W) (torchvision's video layout; `clips.to_model_input` turns it into the
model's (C, T, H, W) at the end), an image is (C, H, W); every per-clip function takes both and applies the
same spatial/photometric change to every frame of a clip. MixUp/CutMix take a batch (B, C, T, H, W) or
(B, C, H, W).

Seeding: every random function takes `generator`, a CPU `torch.Generator`, and its output is a function
of that generator's state alone (the caller seeds it, e.g. per (seed, rank, DataLoader worker), and passes
the same one to every call so the stream advances). torchvision's v2 transforms draw from torch's global
CPU generator instead; they run here inside `torch.random.fork_rng` on a state seeded by one draw from
`generator`, so the caller's global RNG state is left exactly as it was. That fork is process-wide: don't
run these functions from several threads of one process at once (DataLoader workers and Ray tasks are
processes, which is fine).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.functional import one_hot
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode


@contextlib.contextmanager
def _global_rng_from(generator: torch.Generator):
    """Run torchvision's random transforms (global-RNG draws) on a state taken from `generator`."""
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    with torch.random.fork_rng(devices=[]):  # CPU only: torchvision draws its parameters on the CPU
        torch.default_generator.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------- MixUp/CutMix

def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) class ids -> (B, K) targets (1 - eps) * one_hot + eps / K (each row sums to 1)."""
    return one_hot(labels.long(), num_classes).float().mul_(1.0 - smoothing).add_(smoothing / num_classes)


class MixUpCutMix:
    """MixUp (alpha 0.8) or CutMix (alpha 1.0), one of them per batch (CutMix with `switch_prob`), with
    label smoothing folded into the soft targets: (clips, labels (B,)) -> (mixed clips, targets (B, K)).

    Every batch is mixed (the recipe's mix prob 1.0). Clip i is mixed with clip i-1 (cyclically), with
    weight lam on its own clip; its target is (1 - eps) * (lam * e_i + (1 - lam) * e_{i-1}) + eps / K, which
    equals mixing the two smoothed one-hots, as the official code does. CutMix pastes one box, the same on
    every frame and channel of a clip, and its lam is the box-corrected share of the clip's own pixels.

    torchvision's v2.MixUp / v2.CutMix do this on a 5-D batch as long as it is wrapped as a
    `tv_tensors.Video` (a plain tensor must be 4-D): they only use the batch dim (roll) and the last two
    dims (CutMix's box, `[..., y1:y2, x1:x2]`), so (B, C, T, H, W) works although Video means (B, T, C, H, W).
    Smoothed 2-D targets go in as the labels (v2 mixes 2-D labels as given). Seeding: see the module doc.
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self._mix = v2.RandomChoice([v2.MixUp(alpha=mixup_alpha), v2.CutMix(alpha=cutmix_alpha)],
                                    p=[1.0 - switch_prob, switch_prob])

    def __call__(self, clips: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if clips.ndim not in (4, 5) or not clips.is_floating_point():
            raise ValueError(f"expected a float batch (B, C, T, H, W) or (B, C, H, W), got {tuple(clips.shape)} {clips.dtype}")
        if len(clips) < 2 or labels.shape != (len(clips),):
            raise ValueError(f"need a batch of >= 2 clips and labels of shape (B,), got {len(clips)} clips, labels {tuple(labels.shape)}")
        wrapped = tv_tensors.Video(clips) if clips.ndim == 5 else tv_tensors.Image(clips)
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        with _global_rng_from(generator):
            mixed, targets = self._mix(wrapped, targets)
        return mixed.as_subclass(torch.Tensor), targets


# ------------------------------------------------------------------------------------------------ RandAugment

# timm's RandAugment levels run 0..10 (_MAX_LEVEL); v2.RandAugment's `magnitude` is an index into
# `num_magnitude_bins` values spanning each op's range [0, max]. With 10 * _BINS_PER_LEVEL + 1 bins, index
# round(level * _BINS_PER_LEVEL) is level / 10 of the range, timm's scaling (e.g. level 7 -> rotate 21
# degrees, shear 0.21, enhance factor 1 +- 0.63, solarize threshold 0.3 * 255), to a resolution of 0.1
# level, which the magnitude noise needs (level 7 + N(0, 0.5)).
RAND_AUGMENT_MAX_LEVEL = 10
_BINS_PER_LEVEL = 10


RAND_AUGMENT_OPS = tuple(v2.RandAugment._AUGMENTATION_SPACE)  # torchvision's op names (Identity, ShearX, ...)


@functools.lru_cache(maxsize=None)
def _one_rand_augment_op(index: int, fill: int, ops: tuple[str, ...] = ()) -> v2.RandAugment:
    # Tensor affine/rotate support nearest and bilinear only (the official PIL code samples bicubic).
    op = v2.RandAugment(num_ops=1, magnitude=index, num_magnitude_bins=RAND_AUGMENT_MAX_LEVEL * _BINS_PER_LEVEL + 1,
                        interpolation=InterpolationMode.BILINEAR, fill=fill)
    if ops:  # a subset: v2.RandAugment draws uniformly from the (instance's) table of ops
        unknown = sorted(set(ops) - set(RAND_AUGMENT_OPS))
        if unknown:
            raise ValueError(f"unknown RandAugment op(s) {unknown}; torchvision's are {list(RAND_AUGMENT_OPS)}")
        op._AUGMENTATION_SPACE = {name: v2.RandAugment._AUGMENTATION_SPACE[name] for name in ops}
    return op


def rand_augment(clip: torch.Tensor, generator: torch.Generator, *, magnitude: float = 7.0, num_ops: int = 4,
                 magnitude_std: float = 0.5, op_prob: float = 0.5, fill: int = 128,
                 ops: Sequence[str] = ()) -> torch.Tensor:
    """RandAugment rand-m7-n4-mstd0.5 on a uint8 clip (T, C, H, W) or image (C, H, W), the same ops and
    magnitudes on every frame.

    As timm / SlowFast: `num_ops` ops drawn with replacement, each applied with probability `op_prob`
    (0.5) at level clip(magnitude + N(0, magnitude_std), 0, 10), the noise drawn per op per clip; empty
    pixels (rotate, shear, translate) filled with `fill` (128). Each op is a one-op v2.RandAugment at
    the level mapped onto its bins (see _BINS_PER_LEVEL). v2's op set differs from timm's: it has
    Identity where timm has Invert and SolarizeAdd, and its Posterize keeps 8..4 bits (5 at level 7)
    where the official "inc1" one keeps 4..0 (2 at level 7). `ops` restricts the draw to a subset of
    RAND_AUGMENT_OPS (empty: all), for data whose label a geometric op would change.
    """
    if clip.dtype != torch.uint8:
        raise TypeError(f"rand_augment takes uint8 frames (before normalisation), got {clip.dtype}")
    for _ in range(num_ops):
        # draw both every time so one op's skip does not shift the next op's draws
        coin, noise = torch.rand((), generator=generator), torch.randn((), generator=generator)
        if coin >= op_prob:
            continue
        level = min(max(magnitude + magnitude_std * float(noise), 0.0), float(RAND_AUGMENT_MAX_LEVEL))
        with _global_rng_from(generator):
            clip = _one_rand_augment_op(round(level * _BINS_PER_LEVEL), fill, tuple(ops))(clip)
    return clip


# -------------------------------------------------------------------------------------------- Random erasing

def random_erase(clip: torch.Tensor, generator: torch.Generator, *, p: float = 0.25,
                 scale: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """With probability `p`, replace one box of a normalised float clip (T, C, H, W) or image (C, H, W)
    by standard-normal noise (timm's mode "pixel"). Box and noise are the same on every frame
    (v2.RandomErasing draws noise (C, h, w) and broadcasts it over T); SlowFast's "cube" variant keeps the
    box but draws fresh noise per frame. Area and aspect ranges are timm's defaults."""
    if not clip.is_floating_point():
        raise TypeError(f"random_erase takes the normalised float clip, got {clip.dtype}")
    with _global_rng_from(generator):
        return v2.RandomErasing(p=p, scale=scale, ratio=ratio, value="random")(clip)


# --------------------------------------------------------------------------------------------- Spatial crops

def random_resized_crop(clip: torch.Tensor, size: int, generator: torch.Generator, *,
                        scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        interpolation: InterpolationMode = InterpolationMode.BICUBIC) -> torch.Tensor:
    """Inception-style crop (area share in `scale`, aspect in `ratio`) resized to size x size; the same
    box on every frame (the Kinetics and ImageNet recipe)."""
    with _global_rng_from(generator):
        return v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=interpolation, antialias=True)(clip)


def short_side_jitter_crop(clip: torch.Tensor, size: int, generator: torch.Generator, *,
                           short_side: tuple[int, int] = (256, 320),
                           interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> torch.Tensor:
    """Resize so the short side is uniform in `short_side` (integers, both ends included), then a random
    size x size crop; the same on every frame (the SSv2 recipe)."""
    if short_side[0] < size:
        raise ValueError(f"short side range {short_side} must not go below the crop size {size}")
    with _global_rng_from(generator):
        # RandomResize(min, max) draws randint(min, max): max is exclusive; a one-element size is the short side
        return v2.Compose([v2.RandomResize(short_side[0], short_side[1] + 1, interpolation=interpolation, antialias=True),
                           v2.RandomCrop(size)])(clip)


def random_crop(clip: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A size x size crop at a uniformly random position (padded with zeros where the frame is smaller),
    the same on every frame: the small recipes' crop (no rescaling, the scale of the stored video)."""
    with _global_rng_from(generator):
        return v2.RandomCrop(size, pad_if_needed=True)(clip)


def random_horizontal_flip(clip: torch.Tensor, generator: torch.Generator, *, p: float = 0.5) -> torch.Tensor:
    """Mirror every frame of the clip with probability `p` (off for direction-sensitive data: SSv2)."""
    with _global_rng_from(generator):
        return v2.RandomHorizontalFlip(p)(clip)


def normalize(clip: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float (x / 255 - mean) / std, per channel when given sequences."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return clip.float().div_(255).sub_(mean_t).div_(std_t)


CROPS = ("random_resized", "short_side_jitter", "random")


@dataclass(frozen=True)
class TrainAugment:
    """One training clip's (or image's) augmentations, defaults = the Kinetics recipe:
    uint8 (T, C, H, W) or (C, H, W) -> normalised float of the same layout, crop_size x crop_size.

    Order (SlowFast's video path): RandAugment on the decoded frames -> crop -> flip -> normalise ->
    random erasing. timm's image path (the image MViT) crops and flips before RandAugment:
    `rand_augment_first=False`. SSv2: crop="short_side_jitter", horizontal_flip=False.
    """

    crop_size: int = 224
    crop: str = "random_resized"  # random_resized (Kinetics, ImageNet) | short_side_jitter (SSv2) | random
    min_scale: float = 0.08  # random_resized: area share range [min_scale, 1]
    aspect: tuple[float, float] = (3 / 4, 4 / 3)  # random_resized
    short_side: tuple[int, int] = (256, 320)  # short_side_jitter
    horizontal_flip: bool = True
    rand_augment: bool = True
    magnitude: float = 7.0
    num_ops: int = 4
    magnitude_std: float = 0.5
    rand_augment_ops: tuple[str, ...] = ()  # a subset of RAND_AUGMENT_OPS; () = all
    rand_augment_first: bool = True
    erase_prob: float = 0.25
    mean: float | tuple[float, ...] = 0.45
    std: float | tuple[float, ...] = 0.225

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")

    def _rand_augment(self, clip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.rand_augment:
            return clip
        return rand_augment(clip, generator, magnitude=self.magnitude, num_ops=self.num_ops,
                            magnitude_std=self.magnitude_std, ops=self.rand_augment_ops)

    def __call__(self, frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        clip = self._rand_augment(frames, generator) if self.rand_augment_first else frames
        if self.crop == "random_resized":
            clip = random_resized_crop(clip, self.crop_size, generator, scale=(self.min_scale, 1.0), ratio=self.aspect)
        elif self.crop == "short_side_jitter":
            clip = short_side_jitter_crop(clip, self.crop_size, generator, short_side=self.short_side)
        else:
            clip = random_crop(clip, self.crop_size, generator)
        if self.horizontal_flip:
            clip = random_horizontal_flip(clip, generator)
        if not self.rand_augment_first:
            clip = self._rand_augment(clip, generator)
        clip = normalize(clip, self.mean, self.std)
        if self.erase_prob > 0:
            clip = random_erase(clip, generator, p=self.erase_prob)
        return clip


def repeated_augment(decode: Callable[[], torch.Tensor], augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                     k: int, generator: torch.Generator) -> torch.Tensor:
    """Repeated augmentation: call `decode` once and return `k` independently augmented copies of its
    frames, stacked (k, ...) (the Kinetics recipe: k = 2, the same temporal window, each copy its own
    RandAugment / crop / flip / erasing draws, the generator advancing between them). The caller repeats
    the label k times."""
    frames = decode()
    return torch.stack([augment(frames, generator) for _ in range(k)])
