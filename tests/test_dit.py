"""Tests for skyrt.export.dit: config round trips, key maps, real-valued RoPE, and output parity of
WanDiT with diffusers' SkyReelsV2Transformer3DModel (the oracle) on tiny random weights, with
per-frame (diffusion-forcing) timesteps. CPU only, a few seconds.

Run: python -m pytest tests/test_dit.py -q
Official-code checks (parameter names/shapes and a bf16-tolerance forward) import the official
modules/transformer.py from $SKYRT_OFFICIAL_DIR (an unpacked skyreels_v2_infer folder) and are
skipped when it is absent.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from checkpoints import OFFICIAL_DIR, import_official_module
from checkpoints import randomize_scaled_ as randomize_

from skyrt.export import dit as D

diffusers = pytest.importorskip("diffusers")
from diffusers import SkyReelsV2Transformer3DModel  # noqa: E402

needs_official = pytest.mark.skipif(not (OFFICIAL_DIR / "modules" / "transformer.py").is_file(),
                                    reason=f"official SkyReels-V2 code not found at {OFFICIAL_DIR}")

TOL = 1e-4  # fp32 parity
B, F_LAT, H, W = 2, 4, 6, 8  # token grid 4 x 3 x 4 = 48 tokens
BASE = replace(D.TINY, text_len=512)  # diffusers' i2v split assumes 512 text tokens
I2V = replace(BASE, model_type="i2v", in_dim=36)




def make_pair(cfg: D.DiTConfig, seed: int = 0):
    """(diffusers oracle, WanDiT) holding the same random weights, loaded strictly through the key map."""
    ref = randomize_(SkyReelsV2Transformer3DModel(**cfg.to_diffusers()), seed).eval()
    ours = D.WanDiT(D.DiTConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(D.convert_diffusers_state_dict(ref.state_dict()), strict=True)
    return ref, ours


def inputs(cfg: D.DiTConfig, batch: int = B, text_tokens: int = 512, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, F_LAT, H, W, generator=g)
    t = torch.rand(batch, F_LAT, generator=g) * 1000  # a different noise level per frame
    ctx = torch.randn(batch, text_tokens, cfg.text_dim, generator=g)
    return x, t, ctx


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def report(name: str, diff: float, scale: torch.Tensor) -> None:
    print(f"{name}: max abs diff {diff:.2e} (output max |v| {scale.abs().max().item():.2f})")


# ---------------------------------------------------------------------------------------------
# configs


def test_named_configs():
    assert (D.DF_1_3B_540P.dim, D.DF_1_3B_540P.num_heads, D.DF_1_3B_540P.ffn_dim, D.DF_1_3B_540P.num_layers) == (
        1536, 12, 8960, 30)
    assert D.DF_1_3B_540P.inject_sample_info and not D.DF_14B_540P.inject_sample_info
    assert (D.DF_14B_540P.dim, D.DF_14B_540P.num_heads, D.DF_14B_540P.ffn_dim, D.DF_14B_540P.num_layers) == (
        5120, 40, 13824, 40)
    for cfg in (D.DF_1_3B_540P, D.DF_14B_540P):
        assert cfg.head_dim == 128 and cfg.freq_dim == 256 and cfg.text_dim == 4096 and cfg.text_len == 512
        assert D.rope_axis_pairs(cfg.head_dim) == (22, 21, 21)
    assert D.TINY.head_dim == 16 and D.TINY.num_heads == 2


def test_official_config_round_trip_ignores_extras():
    raw = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "__name__": "Config", "dim": 1536,
           "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
           "num_layers": 30, "out_dim": 16, "text_len": 512, "inject_sample_info": True, "window_size": [-1, -1]}
    cfg = D.DiTConfig.from_official(raw)
    assert cfg == D.DF_1_3B_540P
    assert D.DiTConfig.from_official(cfg.to_official()) == cfg
    custom = replace(D.TINY, num_frame_per_block=3, rope_max_positions=2048)
    assert D.DiTConfig.from_official(custom.to_official()) == custom
    with pytest.raises(ValueError, match="window_size"):
        D.DiTConfig.from_official({**raw, "window_size": [8, 8]})


def test_diffusers_config_round_trip():
    for cfg in (BASE, I2V, replace(BASE, inject_sample_info=True, num_frame_per_block=2)):
        ref = SkyReelsV2Transformer3DModel(**cfg.to_diffusers())
        assert D.DiTConfig.from_diffusers(dict(ref.config)) == cfg
    real = {"_class_name": "SkyReelsV2Transformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
            "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "image_dim": None,
            "in_channels": 16, "inject_sample_info": True, "num_attention_heads": 12, "num_layers": 30,
            "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
            "text_dim": 4096, "num_frame_per_block": 1}
    assert D.DiTConfig.from_diffusers(real) == D.DF_1_3B_540P


# ---------------------------------------------------------------------------------------------
# key maps


def test_key_maps_round_trip_and_cover_every_parameter():
    cfg = replace(I2V, inject_sample_info=True)
    diff_keys = list(SkyReelsV2Transformer3DModel(**cfg.to_diffusers()).state_dict())
    official_keys = set(D.WanDiT(cfg).state_dict())
    converted = {D.diffusers_to_official_key(k) for k in diff_keys}
    assert converted == official_keys and len(converted) == len(diff_keys)
    for k in diff_keys:
        assert D.official_to_diffusers_key(D.diffusers_to_official_key(k)) == k
    for k in official_keys:
        assert D.diffusers_to_official_key(D.official_to_diffusers_key(k)) == k
    # spot checks of the map's irregular names (norm2/norm3 swap, image K/V), written out by hand
    assert D.official_to_diffusers_key("blocks.3.norm3.weight") == "blocks.3.norm2.weight"
    assert D.official_to_diffusers_key("blocks.3.cross_attn.k_img.bias") == "blocks.3.attn2.add_k_proj.bias"
    assert D.official_to_diffusers_key("blocks.3.cross_attn.k.bias") == "blocks.3.attn2.to_k.bias"
    assert D.official_to_diffusers_key("blocks.12.self_attn.o.weight") == "blocks.12.attn1.to_out.0.weight"
    assert D.official_to_diffusers_key("fps_projection.2.weight") == "fps_projection.net.2.weight"
    assert D.official_to_diffusers_key("head.modulation") == "scale_shift_table"
    assert D.official_to_diffusers_key("img_emb.proj.3.weight") == "condition_embedder.image_embedder.ff.net.2.weight"
    assert D.diffusers_to_official_key("something.unknown") == "something.unknown"  # strict load reports it


def test_strict_load_of_official_keys_and_errors():
    cfg = replace(I2V, inject_sample_info=True)
    official = {k: torch.randn(v.shape) for k, v in D.WanDiT(cfg).state_dict().items()}
    model = D.WanDiT(cfg)
    model.load_state_dict(official, strict=True)
    with pytest.raises(RuntimeError):
        D.WanDiT(BASE).load_state_dict(official, strict=True)  # i2v/fps keys are unexpected for t2v


# ---------------------------------------------------------------------------------------------
# RoPE


def _complex_oracle(head_dim: int, positions, h: int, w: int) -> torch.Tensor:
    """The official construction: per-axis complex tables (torch.polar), split in complex pairs."""
    def table(n, dim):
        freqs = torch.outer(torch.arange(n, dtype=torch.float64),
                            1.0 / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        return torch.polar(torch.ones_like(freqs), freqs)

    d = head_dim
    ft, fh, fw = table(1024, d - 4 * (d // 6)), table(1024, 2 * (d // 6)), table(1024, 2 * (d // 6))
    pos = torch.as_tensor(positions)
    f = len(pos)
    return torch.cat([ft[pos].view(f, 1, 1, -1).expand(f, h, w, -1),
                      fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                      fw[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, -1)


@pytest.mark.parametrize("head_dim", [16, 128, 22])
def test_rope_tables_match_complex_formula(head_dim):
    positions, h, w = [0, 1, 5, 300, 1023], 3, 5
    cos, sin = D.rope_cos_sin(head_dim, positions, h, w)
    ref = _complex_oracle(head_dim, positions, h, w)
    assert cos.shape == (len(positions) * h * w, head_dim // 2) and cos.dtype == torch.float32
    assert max_diff(cos, ref.real) < 1e-6 and max_diff(sin, ref.imag) < 1e-6

    x = torch.randn(2, len(positions) * h * w, 3, head_dim)
    rotated = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * ref[:, None]).flatten(-2)
    assert max_diff(D.apply_rope(x, cos, sin), rotated) < 1e-5


def test_rope_frame_offset_is_a_position_shift():
    full_cos, full_sin = D.rope_cos_sin(16, range(7), 3, 4)
    cos, sin = D.rope_cos_sin(16, torch.arange(4) + 3, 3, 4)
    assert torch.equal(cos, full_cos[3 * 12:]) and torch.equal(sin, full_sin[3 * 12:])
    with pytest.raises(ValueError, match="RoPE"):
        D.rope_cos_sin(16, [1020, 1024], 3, 4)


def test_model_frame_offset_uses_shifted_positions(monkeypatch):
    ref, ours = make_pair(BASE)
    x, t, ctx = inputs(BASE, batch=1, text_tokens=16)
    seen = []
    real = D.rope_cos_sin

    def spy(head_dim, positions, h, w, max_positions=1024):
        seen.append(torch.as_tensor(positions).tolist())
        return real(head_dim, positions, h, w, max_positions)

    def explicit(head_dim, positions, h, w, max_positions=1024):
        return real(head_dim, [7, 8, 9, 10], h, w, max_positions)

    with torch.no_grad():
        monkeypatch.setattr(D, "rope_cos_sin", spy)
        shifted = ours(x, t, ctx, frame_offset=7)
        monkeypatch.setattr(D, "rope_cos_sin", explicit)
        by_hand = ours(x, t, ctx)
        monkeypatch.setattr(D, "rope_cos_sin", real)
        plain = ours(x, t, ctx)
    assert seen == [[7, 8, 9, 10]]
    assert torch.equal(shifted, by_hand)
    # RoPE attention depends on position differences only: a common shift changes nothing but rounding
    assert max_diff(shifted, plain) < TOL
    with pytest.raises(ValueError, match="RoPE"):
        ours(x, t, ctx, frame_offset=1021)


# ---------------------------------------------------------------------------------------------
# parity with diffusers


def test_t2v_per_frame_timesteps_match_diffusers():
    ref, ours = make_pair(BASE)
    x, t, ctx = inputs(BASE)
    with torch.no_grad():
        want = ref(x, t, ctx, enable_diffusion_forcing=True, return_dict=False)[0]
        got = ours(x, t, ctx)
    diff = max_diff(got, want)
    report("t2v per-frame t", diff, want)
    assert diff <= TOL


def test_t2v_per_sample_timestep_matches_diffusers():
    ref, ours = make_pair(BASE)
    x, t, ctx = inputs(BASE)
    t = t[:, 0]
    with torch.no_grad():
        want = ref(x, t, ctx, enable_diffusion_forcing=False, return_dict=False)[0]
        got = ours(x, t, ctx)
    diff = max_diff(got, want)
    report("t2v scalar t", diff, want)
    assert diff <= TOL


def test_block_causal_mask_matches_diffusers():
    cfg = replace(BASE, num_frame_per_block=2)  # diffusers masks whenever its config says > 1
    ref, ours = make_pair(cfg)
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, ctx, enable_diffusion_forcing=True, return_dict=False)[0]
        got = ours(x, t, ctx, causal_block_size=2)
        full = ours(x, t, ctx)  # the config field alone does not switch the mask on
        x2 = x.clone()
        x2[:, :, 2:] = torch.randn_like(x2[:, :, 2:])  # change the second block only
        t2 = t.clone()
        t2[:, 2:] = 999.0
        changed = ours(x2, t2, ctx, causal_block_size=2)
    diff = max_diff(got, want)
    report("block-causal (2 frames/block)", diff, want)
    assert diff <= TOL
    assert max_diff(full, got) > 1e-2
    assert torch.equal(changed[:, :, :2], got[:, :, :2])  # the first block cannot see the second
    assert max_diff(changed[:, :, 2:], got[:, :, 2:]) > 1e-2


def test_block_causal_mask_shape_and_refusal():
    mask = D.block_causal_mask(4, 2, 2)
    frame_block = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert torch.equal(mask, frame_block[None, :] <= frame_block[:, None])
    assert torch.equal(D.block_causal_mask(3, 1, 1), torch.ones(3, 3).tril().bool())
    with pytest.raises(ValueError, match="causal blocks"):
        D.block_causal_mask(5, 2, 2)


@pytest.mark.parametrize("fps_class", [0, 1])
def test_fps_embedding_matches_diffusers(fps_class):
    cfg = replace(BASE, inject_sample_info=True)
    ref, ours = make_pair(cfg, seed=3)
    x, t, ctx = inputs(cfg, batch=1)  # both public versions tile fps wrongly for B > 1
    with torch.no_grad():
        want = ref(x, t, ctx, enable_diffusion_forcing=True, fps=[fps_class], return_dict=False)[0]
        got = ours(x, t, ctx, fps=torch.tensor([fps_class]))
        other = ours(x, t, ctx, fps=torch.tensor([1 - fps_class]))
    diff = max_diff(got, want)
    report(f"fps class {fps_class}", diff, want)
    assert diff <= TOL
    assert max_diff(got, other) > 1e-3
    with pytest.raises(ValueError, match="fps"):
        ours(x, t, ctx)


def test_fps_is_per_sample_in_a_batch():
    cfg = replace(BASE, inject_sample_info=True)
    _, ours = make_pair(cfg, seed=3)
    x, t, ctx = inputs(cfg, batch=2)
    with torch.no_grad():
        both = ours(x, t, ctx, fps=torch.tensor([0, 1]))
        one = [ours(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], fps=torch.tensor([i])) for i in range(2)]
    assert max_diff(both, torch.cat(one)) < 1e-5


def test_i2v_matches_diffusers():
    ref, ours = make_pair(I2V, seed=5)
    x, t, ctx = inputs(I2V)
    g = torch.Generator().manual_seed(9)
    y = torch.randn(B, 20, F_LAT, H, W, generator=g)
    clip = torch.randn(B, 257, D.CLIP_DIM, generator=g)
    with torch.no_grad():
        want = ref(torch.cat([x, y], 1), t, ctx, encoder_hidden_states_image=clip, enable_diffusion_forcing=True,
                   return_dict=False)[0]
        got = ours(x, t, ctx, clip_fea=clip, y=y)
        no_image = ours(x, t, ctx, clip_fea=torch.zeros_like(clip), y=y)
    diff = max_diff(got, want)
    report("i2v (CLIP tokens + y)", diff, want)
    assert diff <= TOL
    assert max_diff(got, no_image) > 1e-3
    with pytest.raises(ValueError, match="clip_fea"):
        ours(x, t, ctx, y=y)
    with pytest.raises(ValueError, match="in_dim"):
        ours(x, t, ctx, clip_fea=clip)


def test_precomputed_cross_kv_equals_forward():
    _, ours = make_pair(I2V, seed=5)
    x, t, ctx = inputs(I2V, batch=1, text_tokens=16)
    y = torch.randn(1, 20, F_LAT, H, W)
    clip = torch.randn(1, 257, D.CLIP_DIM)
    with torch.no_grad():
        kv = ours.cross_attention_kv(ctx, clip)
        assert len(kv) == I2V.num_layers and kv[0].k.shape == (1, 16, 2, 16) and kv[0].k_img.shape == (1, 257, 2, 16)
        assert torch.equal(ours(x, t, None, y=y, cross_kv=kv), ours(x, t, ctx, clip_fea=clip, y=y))


def test_bf16_weights_keep_fp32_islands():
    _, ours = make_pair(BASE)
    x, t, ctx = inputs(BASE, batch=1, text_tokens=16)
    with torch.no_grad():
        want = ours(x, t, ctx)
        got = ours.to(torch.bfloat16)(x, t, ctx)
    assert got.dtype == torch.float32
    rel = max_diff(got, want) / want.abs().max().item()
    print(f"bf16 weights vs fp32: max abs diff / max |v| = {rel:.2e}")
    assert rel < 0.1


# ---------------------------------------------------------------------------------------------
# the official WanModel (names, shapes, and forward at its bf16 block-output precision)


def load_official_transformer():
    """The official modules/transformer.py."""
    torch._dynamo.config.disable = True  # it torch.compiles helpers at import; eager on the CPU
    return import_official_module("transformer")


def _sdpa_flash_attention(q, k, v, **_):
    """Stand-in for the official flash_attention ([B, L, N, Dh] in and out), fp32 on the CPU."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).type_as(q)


def _official_model(tr, cfg: D.DiTConfig):
    return tr.WanModel(model_type=cfg.model_type, in_dim=cfg.in_dim, dim=cfg.dim, ffn_dim=cfg.ffn_dim,
                       freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim, num_heads=cfg.num_heads,
                       num_layers=cfg.num_layers, inject_sample_info=cfg.inject_sample_info, eps=cfg.eps)


@needs_official
def test_parameter_names_and_shapes_match_official():
    tr = load_official_transformer()
    for cfg in (BASE, replace(I2V, inject_sample_info=True)):
        theirs = {k: tuple(v.shape) for k, v in _official_model(tr, cfg).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in D.WanDiT(cfg).state_dict().items()}
        assert ours == theirs


@needs_official
@pytest.mark.parametrize("variant", ["t2v_fps", "i2v"])
def test_forward_matches_official_code(monkeypatch, variant):
    tr = load_official_transformer()
    monkeypatch.setattr(tr, "flash_attention", _sdpa_flash_attention)
    cfg = replace(BASE, inject_sample_info=True) if variant == "t2v_fps" else I2V
    _, ours = make_pair(cfg, seed=7)
    official = _official_model(tr, cfg).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    x, t, ctx = inputs(cfg, batch=1, text_tokens=16)
    kwargs, extra = {}, {}
    if variant == "t2v_fps":
        kwargs, extra = dict(fps=[1]), dict(fps=torch.tensor([1]))
    else:
        y, clip = torch.randn(1, 20, F_LAT, H, W), torch.randn(1, 257, D.CLIP_DIM)
        kwargs, extra = dict(y=y, clip_fea=clip), dict(y=y, clip_fea=clip)
    with torch.no_grad():
        want = official(x, t, ctx, **kwargs)
        got = ours(x, t, ctx, **extra)
    # every official block returns bf16, so agreement is at bf16 precision, not fp32
    rel = max_diff(got, want) / want.abs().max().item()
    print(f"official WanModel ({variant}): max abs diff / max |v| = {rel:.2e}")
    assert rel < 2e-2
