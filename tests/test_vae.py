"""The Wan2.1 VAE reference (skyrt.export.vae) against diffusers' AutoencoderKLWan as the oracle.

A tiny diffusers VAE gets random weights (every parameter, norm gains included), its state dict is
converted to the official layout and loaded strictly into WanVAE; encode/decode must match, and the
streaming (explicit-cache) paths must equal the whole-clip ones exactly.

Run: `python -m pytest tests/test_vae.py -q`.
"""
from __future__ import annotations

import pytest
import torch

from skyrt.export.vae import (
    LATENT_MEAN,
    LATENT_STD,
    TINY,
    DecoderStep,
    StreamingDecoder,
    VAEConfig,
    WanVAE,
    convert_diffusers_vae_state_dict,
    denormalize_latents,
    diffusers_to_official_vae_key,
    infer_vae_config,
    normalize_latents,
    official_to_diffusers_vae_key,
)

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-4  # fp32 parity with diffusers
H = W = 32  # pixels; latent grid 4 x 4


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights: gains 1 + 0.3 N, biases 0.1 N, weights N(0, 1 / fan_in) (outputs stay O(1))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return module


def diffusers_vae(config: VAEConfig, seed: int = 0):
    return randomize(diffusers.AutoencoderKLWan(**config.to_diffusers()), seed).eval()


@pytest.fixture(scope="module")
def pair():
    """(diffusers oracle, WanVAE with the same weights via the key map)."""
    theirs = diffusers_vae(TINY)
    ours = WanVAE(VAEConfig.from_diffusers(theirs.config)).eval()
    ours.load_state_dict(convert_diffusers_vae_state_dict(theirs.state_dict()), strict=True)
    return theirs, ours


def video(frames: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, frames, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(frames: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(1, 16, frames, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


# ---- key maps and config ----------------------------------------------------------------------


@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_key_maps_round_trip_and_load_strict(num_res_blocks):
    config = VAEConfig(dim=8, num_res_blocks=num_res_blocks)
    theirs = diffusers.AutoencoderKLWan(**config.to_diffusers()).state_dict()
    official = convert_diffusers_vae_state_dict(theirs)
    WanVAE(config).load_state_dict(official, strict=True)  # same keys, same shapes
    for key in theirs:
        back = official_to_diffusers_vae_key(diffusers_to_official_vae_key(key, num_res_blocks), num_res_blocks)
        assert back == key
    assert infer_vae_config(official) == config


def test_unmapped_keys_raise_with_the_key_named():
    with pytest.raises(KeyError, match="decoder.bogus.weight"):
        diffusers_to_official_vae_key("decoder.bogus.weight")
    with pytest.raises(KeyError, match="encoder.downsamples.0.residual.1.weight"):
        official_to_diffusers_vae_key("encoder.downsamples.0.residual.1.weight")
    sd = diffusers_vae(TINY).state_dict()
    sd["decoder.mid_block.resnets.2.norm1.gamma"] = torch.ones(1)
    with pytest.raises(KeyError, match="mid_block.resnets.2"):
        convert_diffusers_vae_state_dict(sd)


def test_config_from_diffusers_and_constants(pair):
    theirs, _ = pair
    assert VAEConfig.from_diffusers(theirs.config) == TINY
    assert VAEConfig.from_diffusers({}) == VAEConfig()  # diffusers defaults are Wan2.1's
    assert list(LATENT_MEAN) == list(theirs.config.latents_mean)
    assert list(LATENT_STD) == list(theirs.config.latents_std)


# ---- parity with diffusers --------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("frames", [9, 1])
def test_encode_matches_diffusers(pair, frames):
    theirs, ours = pair
    x = video(frames)
    mu = ours.encode(x)
    assert mu.shape == (1, 16, (frames - 1) // 4 + 1, H // 8, W // 8)
    expected = theirs.encode(x).latent_dist.mean
    assert mu.std() > 0.1  # weights are non-trivial: the comparison means something
    assert (mu - expected).abs().max() <= ATOL


@torch.no_grad()
@pytest.mark.parametrize("frames", [3, 1])
def test_decode_matches_diffusers(pair, frames):
    theirs, ours = pair
    z = latents(frames)
    out = ours.decode(z)
    assert out.shape == (1, 3, 1 + 4 * (frames - 1), H, W)
    assert out.abs().max() <= 1.0
    assert (out.abs() < 1).float().mean() > 0.5  # mostly unclamped, so the clamp hides little
    assert (out - theirs.decode(z).sample).abs().max() <= ATOL


# ---- streaming == whole -----------------------------------------------------------------------


@torch.no_grad()
def test_streaming_decode_equals_whole_decode_exactly(pair):
    _, ours = pair
    z = latents(4)
    whole = ours.decode(z)
    decoder = StreamingDecoder(ours)
    pieces = [decoder.decode_next(z[:, :, i : i + 1]) for i in range(z.shape[2])]
    assert [p.shape[2] for p in pieces] == [1, 4, 4, 4]
    assert torch.equal(torch.cat(pieces, dim=2), whole)
    decoder.reset()  # a new stream starts over with a first frame
    assert torch.equal(decoder.decode_next(z[:, :, :1]), whole[:, :, :1])


@torch.no_grad()
def test_decode_step_cache_shapes_are_fixed_and_documented(pair):
    _, ours = pair
    z = latents(3)
    caches = ours.decoder_cache_init(1, H // 8, W // 8)
    expected = [spec.shape(1, H, W) for spec in ours.decoder_cache_specs]
    assert [tuple(c.shape) for c in caches] == expected
    assert all(spec.frames == 2 for spec in ours.decoder_cache_specs)
    assert len({spec.name for spec in ours.decoder_cache_specs}) == len(caches)
    for i in range(3):
        frames, caches = ours.decode_step(z[:, :, i : i + 1], caches, first=i == 0)
        assert frames.shape == (1, 3, 1 if i == 0 else 4, H, W)
        assert [tuple(c.shape) for c in caches] == expected


@torch.no_grad()
def test_decoder_step_module_flat_signature(pair):
    """The ONNX-facing wrapper: forward(z, *caches) -> (frames, *caches)."""
    _, ours = pair
    z = latents(2)
    caches = ours.decoder_cache_init(1, H // 8, W // 8)
    out0 = DecoderStep(ours, first=True)(z[:, :, :1], *caches)
    out1 = DecoderStep(ours, first=False)(z[:, :, 1:2], *out0[1:])
    assert len(out1) == 1 + len(caches)
    assert torch.equal(torch.cat([out0[0], out1[0]], dim=2), ours.decode(z))


@torch.no_grad()
def test_streaming_encode_equals_whole_encode(pair):
    _, ours = pair
    x = video(9)
    caches = ours.encoder_cache_init(1, H, W)
    mus = []
    for i, chunk in enumerate([x[:, :, :1], x[:, :, 1:5], x[:, :, 5:9]]):
        mu, caches = ours.encode_step(chunk, caches, first=i == 0)
        mus.append(mu)
    streamed, whole = torch.cat(mus, dim=2), ours.encode(x)
    # encode applies the 1x1x1 quant conv to the whole clip, encode_step per chunk: allow rounding.
    assert (streamed - whole).abs().max() <= 1e-6


def test_encode_refuses_frame_counts_the_vae_cannot_chunk(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ours.encode(video(6))


# ---- normalisation ----------------------------------------------------------------------------


def test_normalize_denormalize_round_trip():
    mu = torch.randn(2, 16, 3, 4, 4, dtype=torch.float64) * 3
    z = normalize_latents(mu)
    assert torch.allclose(denormalize_latents(z), mu, atol=1e-12)
    mean = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)
    assert torch.allclose(normalize_latents(mean.expand(1, 16, 1, 2, 2)), torch.zeros(1, 16, 1, 2, 2))
    assert torch.allclose(normalize_latents((mean + std).expand(1, 16, 1, 2, 2)), torch.ones(1, 16, 1, 2, 2))
