"""Every variant of ``mvit.list_models()`` on tiny inputs: forward/backward, gradients, modes, determinism,
bf16 autocast, activation checkpointing, the fast CPU paths, torch.compile, bad input, and the model API.

The full-size variants are built with a small ``input_size`` (the smallest the strides allow) so that each
runs in well under a second; their widths, depths and weights are the real ones.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import mvit
from mvit.heads import RoIHead
from mvit.ops import fast_paths

ALL = mvit.list_models()
DEBUG = [n for n in ALL if n.endswith("_debug")]


def small_size(name: str) -> tuple[int, ...]:
    """Two frames' worth of temporal stride and 32x32 pixels: 4x32x32 for every video variant, 32x32 for images."""
    cfg = mvit.get_config(name)
    mult = cfg.input_multiple
    if cfg.is_video:
        return (2 * mult[0], max(mult[1], 32), max(mult[2], 32))
    return (max(mult[0], 32), max(mult[1], 32))


@functools.lru_cache(maxsize=None)
def _built(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return mvit.create_model(name, input_size=small_size(name))


def model_for(name: str) -> torch.nn.Module:
    """A fresh copy (tests change modes and gradients) of the variant built for its small input size."""
    return copy.deepcopy(_built(name))


def clip(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, model.cfg.in_chans, *model.cfg.input_size), generator=gen)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    target = torch.arange(out.shape[0]) % out.shape[1]
    return F.cross_entropy(out, target)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_math(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Two float64 computations of one function that differ only in the order of their sums.

    Reordering a sum of n terms changes it by at most ~n * 2**-53 times the sum of the terms' magnitudes;
    over the model's depth that stays far below 1e-9 of the tensor's norm, while any real difference in
    the math (a missing term, a wrong tap, a stale cache) is of the order of the values themselves. The
    tolerance is relative to the whole tensor's norm, so it does not depend on which elements a CPU's
    vector width (AVX2, AVX-512) happens to sum in another order; analytically-zero gradients (norm_k
    biases: softmax ignores a shift shared by all keys) compare against the same scale.
    """
    assert got.dtype == want.dtype == torch.float64, (got.dtype, want.dtype)
    scale = max(want.norm().item(), got.norm().item(), 1e-30)
    error = (got - want).norm().item()
    assert error <= 1e-9 * scale or error <= 1e-12, f"{what}: |got - want| = {error:.3g}, |want| = {scale:.3g}"


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    model = model_for(name)
    for blk in model.blocks:
        blk.drop_path.p = 0.0  # every block contributes
    model.train()
    x = clip(model)
    out = model(x)
    assert out.shape == (2, model.num_classes)
    assert torch.isfinite(out).all()
    loss_of(out).backward()
    # Only the class token of the last block reaches the head; Q pooling and MViTv2's rel-pos terms act on
    # the other query rows only, so in the last block they get no gradient (as in the official model).
    last = len(model.blocks) - 1
    dead = {f"blocks.{last}.attn.{p}" for p in ("rel_pos_h", "rel_pos_w", "rel_pos_t", "pool_q.weight")}
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{n} has a non-finite gradient"
        if n in dead:
            assert not p.grad.any(), n
        else:
            assert p.grad.abs().sum() > 0, f"{n} has an all-zero gradient"
        # DDP copies grads into buckets laid out like the parameters; other strides make it warn
        # ("Grad strides do not match bucket view strides") and copy.
        assert p.grad.stride() == p.stride(), f"{n}: grad strides {p.grad.stride()} != {p.stride()}"


@pytest.mark.parametrize("name", ALL)
def test_train_and_eval_output_shapes_and_determinism(name):
    a = model_for(name)  # built after torch.manual_seed(0)
    torch.manual_seed(0)
    b = mvit.create_model(name, input_size=small_size(name))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), f"{k} differs between two builds with the same seed"
    x = clip(a, batch=3)
    with torch.no_grad():
        ea, eb = a.eval()(x), b.eval()(x)
        assert ea.shape == (3, a.num_classes)
        assert torch.equal(ea, eb) and torch.equal(ea, a(x))
        a.train(), b.train()
        torch.manual_seed(5)
        ta = a(x)
        torch.manual_seed(5)
        tb = b(x)
    assert ta.shape == (3, a.num_classes)
    assert torch.equal(ta, tb)  # stochastic depth / dropout follow the seed


@pytest.mark.parametrize("name", ALL)
def test_bf16_autocast_forward(name):
    model = model_for(name).eval()
    x = clip(model)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    # bf16 keeps 8 bits of mantissa; over 16-24 blocks the logits drift by up to ~10% of their spread (measured) but
    # stay the same function of the input (correlation with the fp32 logits)
    a, b = out.float().flatten(), ref.flatten()
    corr = F.cosine_similarity(a - a.mean(), b - b.mean(), dim=0).item()
    err = (a - b).abs().max().item()
    print(f"{name}: bf16 max |diff| {err:.3g} (logit std {b.std().item():.3g}), correlation {corr:.5f}")
    assert corr > 0.999 and err <= 0.15 * b.std().item(), (corr, err)


# bf16's unit roundoff: 8 significant bits, so rounding a value to bf16 changes it by a relative <= 2**-8.
BF16_UNIT_ROUNDOFF = 2.0**-8


def bf16_gradient_error_bound(model: torch.nn.Module) -> float:
    """The relative error that bf16 rounding allows in a parameter's gradient, for this model.

    Under autocast every linear layer, the patch convolution and both products of each attention (QK^T, AV)
    run in bf16 with float32 accumulation (oneDNN's native bf16 kernels and its AVX2 emulation both
    accumulate in float32); everything else (norms, softmax, GELU, the pooling convs) stays float32. Each of
    those P products rounds its two operands in forward, and its two backward products round two operands
    each: S = 6 P roundings of relative size <= u on the way to a gradient. Independent rounding errors add
    in quadrature, so a gradient's relative error is about sqrt(S) * u; LayerNorm and softmax backward can
    amplify an error by a small factor, for which we allow 4x. For mvit_debug (P = 28) that is
    4 * sqrt(168) * 2**-8 = 0.20; measured: at most 0.08 for one parameter, 0.04 over all of them, with
    native bf16 (AVX-512 BF16) and with its AVX2 emulation alike. The bug this guards against gave 0.3 to
    1e30 (see mvit.ops.depthwise_conv_cl).
    """
    linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    attention_products = 2 * sum(type(m).__name__ == "MultiScaleAttention" for m in model.modules())
    products = linear + attention_products + 1  # + the patch embedding's convolution
    return 4.0 * math.sqrt(6 * products) * BF16_UNIT_ROUNDOFF


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (float32 norms of garbage gradients overflow to inf)."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("name", DEBUG)
def test_bf16_autocast_training_step_on_cpu(name):
    """Training with ``precision: bf16`` on CPU: the backward runs (the custom CPU paths step aside under
    autocast), every parameter gets a finite float32 gradient, and each gradient is within what bf16
    rounding allows of the float32 one (bf16_gradient_error_bound), on CPUs with and without native bf16."""
    model = model_for(name).train()
    for blk in model.blocks:
        blk.drop_path.p = 0.0
    model.head.dropout = torch.nn.Identity()
    x = clip(model)
    loss_of(model(x)).backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model(x))
    loss.backward()
    got = grads(model)
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
    bound = bf16_gradient_error_bound(model)
    flat = lambda g: torch.cat([t.flatten() for t in g.values()])  # noqa: E731
    overall = relative_error(flat(got), flat(ref))
    # Parameters whose float32 gradient is analytically zero (norm_k biases: softmax ignores a shift shared
    # by all keys; the last block's Q pooling) have no scale to be relative to: they count in `overall`.
    scale = flat(ref).norm().item() / math.sqrt(len(ref))
    per_param = {n: relative_error(got[n], ref[n]) for n in ref if ref[n].norm().item() > 1e-3 * scale}
    worst = max(per_param, key=per_param.get)
    print(f"{name} ({torch.backends.cpu.get_cpu_capability()}): bf16 gradient relative error {overall:.4f} overall, "
          f"{per_param[worst]:.4f} at most ({worst}); bound {bound:.3f}")
    assert overall <= bound, (overall, bound)
    assert per_param[worst] <= bound, (worst, per_param[worst], bound)


@pytest.mark.parametrize("name", ALL)
def test_activation_checkpointing_gives_the_same_gradients(name):
    model = model_for(name).train()
    x = clip(model)
    torch.manual_seed(3)  # the same stochastic-depth draws in both runs (checkpoint restores the RNG state)
    loss_of(model(x)).backward()
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    torch.manual_seed(3)
    loss_of(model(x)).backward()
    for n, g in grads(model).items():
        torch.testing.assert_close(g, plain[n], msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ALL)
def test_logits_equal_the_full_computation(name):
    """forward() computes only the class token in the last block: same logits and gradients as computing
    every token (forward_features + head), in training mode with stochastic depth."""
    model = model_for(name).train().double()
    x = clip(model).double()
    torch.manual_seed(7)
    out = model(x)
    loss_of(out).backward()
    short = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    full = model.forward_head(model.forward_features(x))
    loss_of(full).backward()
    assert_same_math(out, full, "logits")
    for n, p in model.named_parameters():
        assert_same_math(short[n], p.grad, n)


@pytest.mark.parametrize("name", DEBUG + ["mvit_b16_in1k"])
def test_fast_cpu_paths_equal_plain_ops(name):
    """mvit.ops's custom backward paths give the gradients of the plain PyTorch ops they replace."""
    model = model_for(name).train().double()
    for blk in model.blocks:
        blk.drop_path.p = 0.0
    model.head.dropout = torch.nn.Identity()
    x = clip(model).double()
    results = []
    for fast in (True, False):
        model.zero_grad(set_to_none=True)
        with fast_paths(fast):
            out = model(x)
            loss_of(out).backward()
        results.append((out.detach(), grads(model)))
    (out_fast, g_fast), (out_plain, g_plain) = results
    assert_same_math(out_fast, out_plain, "logits")
    for n in g_plain:
        assert_same_math(g_fast[n], g_plain[n], n)


@pytest.mark.parametrize("name", DEBUG + ["mvit_b16_in1k"])
def test_torch_compile_fullgraph_equals_eager(name):
    """The whole model traces as one graph (fullgraph=True: no graph breaks) and matches eager, forward and
    backward. The aot_eager backend runs the traced forward/backward graphs with eager kernels: inductor's C++
    code generation takes ~95 s per model on 2 cores, so it is checked on one block below.

    The debug variants run the video blocks of both versions (v1: separable position embeddings, Q pooling at
    stage boundaries, width change in the MLP; v2: rel-pos terms, residual pooling, width change in attention);
    the image variant adds the 2-D path and the joint position embedding. The full-size video variants differ
    from the debug ones in sizes and kernels, not in code; tracing each costs 17-47 s on 2 cores."""
    model = model_for(name).train().double()
    for blk in model.blocks:
        blk.drop_path.p = 0.0
    x = clip(model).double()
    out = model(x)
    loss_of(out).backward()
    eager = grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c = compiled(x)
    loss_of(out_c).backward()
    assert_same_math(out_c, out, "logits")
    for n, g in grads(model).items():
        assert_same_math(g, eager[n], n)


def test_inductor_compiled_block_equals_eager(tmp_path, monkeypatch):
    """Inductor (the default backend) on the most involved block: MViTv2 with Q pooling, rel-pos terms,
    residual pooling and the width change inside attention.

    Compiled into a cache of its own: inductor's on-disk cache (/tmp/torchinductor_$USER) does not key its
    kernels on ATEN_CPU_CAPABILITY, and a kernel cached by a run without it returned NaN in a run with
    ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine (a fresh cache gives 2e-7 there)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = model_for("mvitv2_debug").eval()
    blk = next(b for b in model.blocks if b.dim_in != b.dim_out)
    tokens = torch.randn(2, 1 + 4 * 8 * 8, blk.dim_in)
    grid = (4, 8, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        ref, ref_grid = blk(tokens, grid)
        out, out_grid = torch.compile(blk, fullgraph=True)(tokens, grid)
    assert out_grid == ref_grid == (4, 4, 4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --- inputs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mvit_debug", "mvitv2_debug"])
def test_other_input_sizes_work(name):
    model = model_for(name).eval()  # built for 4x32x32
    with torch.no_grad():
        for size in [(8, 32, 32), (4, 64, 48), (2, 16, 16)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 10)


def test_image_variant_other_sizes():
    model = model_for("mvit_b16_in1k").eval()  # built for 32x32
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 96)).shape == (2, 1000)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 4, 32, 32), r"expected a 5-D input \(B, 3, T, H, W\), got shape \(3, 4, 32, 32\)"),
        ((1, 1, 4, 32, 32), r"expected 3 input channels"),
        ((1, 3, 4, 40, 32), r"4x40x32 is not supported.*T a multiple of 2, H a multiple of 16, W a multiple of 16"),
        ((1, 3, 3, 32, 32), r"T a multiple of 2"),
        ((1, 3, 4, 0, 32), r"not supported"),
    ],
)
def test_bad_input_says_which_sizes_work(shape, message):
    model = model_for("mvit_debug")
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))


def test_bad_image_input():
    model = model_for("mvit_b16_in1k")
    with pytest.raises(ValueError, match=r"expected a 4-D input \(B, 3, H, W\)"):
        model(torch.zeros(1, 3, 2, 32, 32))
    with pytest.raises(ValueError, match="H a multiple of 32, W a multiple of 32"):
        model(torch.zeros(1, 3, 48, 32))


def test_bad_names_and_fields():
    with pytest.raises(ValueError, match="unknown model 'mvit_x'; available: mvit_b_16x4"):
        mvit.create_model("mvit_x")
    with pytest.raises(TypeError, match="unknown MViTConfig field"):
        mvit.create_model("mvit_debug", embed_dims=3)
    with pytest.raises(ValueError, match="input_size must be"):
        mvit.create_model("mvit_debug", input_size=(32,))


# --- API used by the pipelines ------------------------------------------------------------------------------
def test_model_api():
    model = model_for("mvit_debug")
    # config round trip through asdict (what training checkpoints store) and to_dict
    assert mvit.MViTConfig.from_dict(asdict(model.cfg)) == model.cfg
    assert mvit.MViTConfig.from_dict(model.cfg.to_dict()) == model.cfg
    # weight decay: the official recipes decay embeddings too; opt-in exemption
    assert model.no_weight_decay() == set()
    exempt = mvit.create_model("mvit_debug", zero_decay_pos_cls=True).no_weight_decay()
    assert {"cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"} <= exempt
    assert all(p.ndim > 1 for n, p in model.named_parameters() if n in exempt)
    v2 = mvit.create_model("mvitv2_debug", zero_decay_pos_cls=True)
    assert "blocks.0.attn.rel_pos_h" in v2.no_weight_decay()
    # features, head reset, classifier-free model
    x = clip(model)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1 + 2 * 2 * 2, model.num_features)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        assert mvit.create_model("mvit_debug", num_classes=0).eval()(torch.randn(1, 3, 8, 32, 32)).shape == (1, 128)
    # stochastic depth is active in training mode only
    heavy = mvit.create_model("mvit_debug", drop_path_rate=0.9).train()
    with torch.no_grad():
        torch.manual_seed(0)
        assert not torch.equal(heavy(x), heavy.eval()(x))
    assert mvit.get_config("mvit_b_16x4", drop_path_rate=0.0).blocks[-1].drop_path == 0.0
    assert mvit.get_config("mvit_b_16x4").blocks[-1].drop_path == pytest.approx(0.2)
    assert mvit.get_config("mvit_b24_32x3").blocks[-1].drop_path == pytest.approx(0.3)


def test_architecture_table_of_mvit_b():
    """The per-block table of MViT-B 16x4 (docs/reference.md, "What the architecture is")."""
    cfg = mvit.get_config("mvit_b_16x4")
    q_pooled = [i for i, b in enumerate(cfg.blocks) if b.q_stride != (1, 1, 1)]
    widened = [i for i, b in enumerate(cfg.blocks) if b.dim_out != b.dim_in]
    assert q_pooled == [1, 3, 14] and widened == [0, 2, 13]
    assert [cfg.blocks[i].num_heads for i in (0, 1, 3, 14)] == [1, 2, 4, 8]
    assert [cfg.blocks[i].kv_stride for i in (0, 1, 3, 14)] == [(1, 8, 8), (1, 4, 4), (1, 2, 2), (1, 1, 1)]
    assert all(b.kv_kernel == (3, 3, 3) for b in cfg.blocks)
    b24 = mvit.get_config("mvit_b24_32x3")
    assert [i for i, b in enumerate(b24.blocks) if b.q_stride != (1, 1, 1)] == [2, 5, 21]
    assert [i for i, b in enumerate(b24.blocks) if b.dim_out != b.dim_in] == [1, 4, 20]
    assert b24.blocks[0].kv_kernel == (1, 9, 9)  # kernel = stride + 1
    v2 = mvit.get_config("mvitv2_s_16x4")
    assert all(b.q_kernel == (3, 3, 3) for b in v2.blocks)  # Q pooled in every block
    assert [i for i, b in enumerate(v2.blocks) if b.dim_out != b.dim_in] == [1, 3, 14]  # inside attention


def test_roi_head_on_last_stage_tokens():
    model = model_for("mvit_debug").eval()
    head = RoIHead(model.num_features, num_classes=6, spatial_scale=1 / 16, resolution=2, dropout=0.0)
    x = clip(model)
    boxes = torch.tensor([[0, 0.0, 0.0, 16.0, 16.0], [1, 8.0, 4.0, 32.0, 30.0], [1, 0.0, 0.0, 32.0, 32.0]])
    with torch.no_grad():
        tokens, grid = model.forward_tokens(x)
        logits = head(model.norm(tokens), grid, boxes)
    assert grid == (2, 2, 2) and logits.shape == (3, 6) and torch.isfinite(logits).all()


# --- the depthwise pooling convolution's custom backward -----------------------------------------------------
@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize(
    "kernel, stride, padding, size",
    [(3, 1, 1, 7), (3, 2, 1, 8), (3, 2, 1, 7), (3, 4, 1, 14), (3, 8, 1, 16), (9, 8, 4, 16), (5, 4, 2, 12), (2, 2, 0, 6), (3, 3, 0, 5)],
)
def test_depthwise_conv_backward_equals_autograd(nd, kernel, stride, padding, size):
    """Both input-gradient paths (tap scatter where windows don't overlap, per-phase forward convs where they
    do) and the tap-by-tap weight gradient match autograd through F.conv3d/conv2d (float64)."""
    from mvit.ops import depthwise_conv_cl

    gen = torch.Generator().manual_seed(kernel * 100 + stride * 10 + size)
    c = 5
    k = (3,) * (nd - 2) + (kernel, kernel)
    s = (1,) * (nd - 2) + (stride, stride)
    p = (1,) * (nd - 2) + (padding, padding)
    shape = (2,) + (4,) * (nd - 2) + (size, size + 1, c)  # H != W on purpose
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn((c, 1) + k, generator=gen, dtype=torch.float64, requires_grad=True)
    y = depthwise_conv_cl(x, w, s, p)
    conv = F.conv3d if nd == 3 else F.conv2d
    ref = conv(x.movedim(-1, 1), w, None, s, p, 1, c).movedim(1, -1)
    torch.testing.assert_close(y, ref)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w), gy)
    want = torch.autograd.grad(ref, (x, w), gy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


# --- mvit.fast: K/V of only the tokens the pooling windows read ----------------------------------------------
@pytest.mark.parametrize(
    "grid, kernel, stride, padding",
    [
        ((8, 56, 56), (3, 3, 3), (1, 8, 8), (1, 1, 1)),  # MViT-B stage 1: 9 of every 64 positions per frame
        ((8, 56, 57), (3, 3, 3), (1, 4, 4), (1, 1, 1)),  # a width the stride doesn't divide
        ((4, 10, 12), (1, 3, 3), (1, 5, 3), (0, 1, 1)),  # kernel == stride along W (only the last column skipped)
        ((5, 9), (2, 3), (4, 6), (0, 2)),  # 2-D, padding beyond the last window
        ((6, 16), (3, 1), (2, 4), (1, 0)),  # a 1-wide kernel
        ((4, 9), (1, 3), (2, 3), (1, 1)),  # padding >= kernel along H: that axis is kept whole
    ],
)
def test_pooling_windows_pooling_equals_pooling_every_token(grid, kernel, stride, padding):
    """Pooling the tokens pooling_windows keeps, with its stride and padding, gives the pooling of all tokens,
    and the same gradients (through the custom channels-last conv backward) for the tokens and the kernel."""
    from mvit.fast import pool_windows, pooling_windows
    from mvit.model import pool_tokens

    gen = torch.Generator().manual_seed(sum(grid))
    c = 4
    conv = (torch.nn.Conv3d if len(grid) == 3 else torch.nn.Conv2d)(c, c, kernel, stride, padding, groups=c, bias=False)
    conv.weight.data = torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64)
    tokens = torch.randn(2, 3, 1 + math.prod(grid), c, generator=gen, dtype=torch.float64, requires_grad=True)
    window = pooling_windows(grid, kernel, stride, padding)
    assert window is not None and window.index[0] == 0  # the class token first
    assert len(window.index) < 1 + math.prod(grid)
    want, want_grid = pool_tokens(tokens, grid, conv)
    got, got_grid = pool_windows(tokens.index_select(2, window.index), window, conv)
    assert got_grid == want_grid
    torch.testing.assert_close(got, want)
    gy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, (tokens, conv.weight), gy), torch.autograd.grad(want, (tokens, conv.weight), gy)):
        torch.testing.assert_close(g, w)


def test_pooling_windows_cached_under_inference_mode_serves_training():
    """The index is cached: made first under inference_mode (evaluation), it must still serve a training step."""
    from mvit.fast import pooling_windows

    args = ((2, 8, 12), (3, 3, 3), (1, 4, 4), (1, 1, 1))
    pooling_windows.cache_clear()
    with torch.inference_mode():
        pooling_windows(*args)
    index = pooling_windows(*args).index
    assert not index.is_inference()
    x = torch.randn(1, 1 + 2 * 8 * 12, 4, requires_grad=True)
    x.index_select(1, index).sum().backward()
    assert x.grad.sum() == len(index) * 4


def test_class_token_only_attention_with_kv_windows():
    """The last block's class-token-only path with K/V windows (MViT-B's first block as if it were last)
    equals the class token's row of the full attention."""
    from mvit.fast import class_token_attention, kv_pooling_windows

    torch.manual_seed(0)
    model = mvit.create_model("mvit_b_16x4", input_size=(4, 64, 64)).train()
    attn = model.blocks[0].attn
    grid = (2, 16, 16)
    assert kv_pooling_windows(attn, grid) is not None
    x = torch.randn(2, 1 + math.prod(grid), 96, requires_grad=True)
    cls_out = class_token_attention(attn, x, grid)
    full_out, _ = attn(x, grid)
    torch.testing.assert_close(cls_out, full_out[:, :1])
    (g_cls,) = torch.autograd.grad(cls_out.sum(), x)
    (g_full,) = torch.autograd.grad(full_out[:, :1].sum(), x)
    torch.testing.assert_close(g_cls, g_full)


@pytest.mark.parametrize("name", ["mvit_debug", "mvitv2_debug"])
def test_class_token_only_block_equals_the_full_block_on_every_block(name):
    """class_token_only_block on every block (MViT.forward runs it on the last one only), so that its skip
    branches run too: the projection where v1 widens in the MLP or v2 in the attention, and Q strides (whose
    max-pooled skip passes the class token through): the class token's row of the full block, forward and
    backward (float64, fast paths on)."""
    from mvit.fast import class_token_only_block

    model = model_for(name).train().double()
    for blk in model.blocks:
        blk.drop_path.p = 0.0
    x = clip(model).double()
    with torch.no_grad():
        tokens, grid = model.embed(x)
    gen = torch.Generator().manual_seed(2)
    for i, blk in enumerate(model.blocks):
        tokens = tokens.detach().requires_grad_(True)
        got = class_token_only_block(blk, tokens, grid)
        full, next_grid = blk(tokens, grid)
        want = full[:, :1]
        assert_same_math(got, want, f"block {i} output")
        gy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        names, params = zip(*blk.named_parameters())
        wrt = (tokens, *params)
        g_got = torch.autograd.grad(got, wrt, gy, materialize_grads=True)
        g_want = torch.autograd.grad(want, wrt, gy, materialize_grads=True)
        for n, a, b in zip(("tokens", *names), g_got, g_want):
            assert_same_math(a, b, f"block {i} gradient of {n}")
        tokens, grid = full.detach(), next_grid


def test_pooling_windows_none_where_every_token_is_read():
    from mvit.fast import pooling_windows

    assert pooling_windows((8, 28, 28), (3, 3, 3), (1, 2, 2), (1, 1, 1)) is None  # overlapping windows
    assert pooling_windows((8, 28, 28), (3, 3, 3), (1, 1, 1), (1, 1, 1)) is None
    assert pooling_windows((4, 9, 9), (1, 3, 3), (1, 3, 3), (0, 0, 0)) is None  # windows tile the grid


def test_mvit_b_first_stages_project_only_the_pooled_keys_and_values():
    """With the fast paths on, MViT-B's first three blocks compute K and V of fewer tokens; the plain forward
    (flop counts, fast paths off) computes them for every token. Counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = mvit.create_model("mvit_b_16x4", input_size=(4, 64, 64)).eval()
        x = torch.empty(1, 3, 4, 64, 64)

    def flops(fast: bool) -> int:
        counter = FlopCounterMode(display=False)
        with fast_paths(fast), counter, torch.no_grad():
            model(x)
        return counter.get_total_flops()

    # Token grids 2x16x16, 2x16x16, 2x8x8 (dims 96, 192, 192 -> K and V of twice that), K/V strides 8, 4, 4
    # with 3-wide windows: per frame 5x5 of 16x16, 11x11 of 16x16, 5x5 of 8x8 positions are read.
    skipped_tokens = [2 * (256 - 25), 2 * (256 - 121), 2 * (64 - 25)]
    kv_macs = [96 * 192, 192 * 384, 192 * 384]
    assert flops(False) - flops(True) == 2 * sum(n * m for n, m in zip(skipped_tokens, kv_macs))


@pytest.mark.parametrize("frozen", [(), ("w1", "b1"), ("x",), ("x", "w1", "b1")])
def test_mlp_in_chunks_equals_plain_ops(monkeypatch, frozen):
    """The fused MLP run in chunks of 7 tokens (the last one partial) gives the plain ops' output and
    gradients, also with some inputs not requiring a gradient (a frozen layer, a constant input)."""
    from mvit import ops

    gen = torch.Generator().manual_seed(3)
    c, hidden, c_out = 6, 10, 5
    monkeypatch.setattr(ops, "MLP_CHUNK_BYTES", 7 * hidden * 8)  # float64: 7 rows per chunk
    tensors = {
        "x": torch.randn(2, 25, c, generator=gen, dtype=torch.float64),
        "w1": torch.randn(hidden, c, generator=gen, dtype=torch.float64),
        "b1": torch.randn(hidden, generator=gen, dtype=torch.float64),
        "w2": torch.randn(c_out, hidden, generator=gen, dtype=torch.float64),
        "b2": torch.randn(c_out, generator=gen, dtype=torch.float64),
    }
    for name, t in tensors.items():
        t.requires_grad_(name not in frozen)
    args = [tensors[n] for n in ("x", "w1", "b1", "w2", "b2")]
    wanted = [t for t in args if t.requires_grad]
    gy = torch.randn(2, 25, c_out, generator=gen, dtype=torch.float64)
    with ops.fast_paths(True):
        got = ops.mlp(*args)
    with ops.fast_paths(False):
        want = ops.mlp(*args)
    assert got.grad_fn is not None and "Mlp" in type(got.grad_fn).__name__  # the chunked path ran
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, wanted, gy), torch.autograd.grad(want, wanted, gy)):
        torch.testing.assert_close(g, w)
