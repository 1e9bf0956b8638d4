"""Model folders in both layouts load through the real loaders, strictly, to the oracle's weights."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from skyrt.export.checkpoint import CheckpointError
from skyrt.export.loaders import load_components
from skyrt.runtime.model_folder import ModelFolderError, inspect_model_folder


@pytest.fixture(scope="module")
def both(official_dir, diffusers_dir):
    return {name: load_components(inspect_model_folder(path)) for name, path in
            (("official", official_dir), ("diffusers", diffusers_dir))}


def test_layouts_are_detected(official_dir, diffusers_dir):
    assert inspect_model_folder(official_dir).layout == "official"
    assert inspect_model_folder(diffusers_dir).layout == "diffusers"
    a, b = inspect_model_folder(official_dir).dit_config, inspect_model_folder(diffusers_dir).dit_config
    for key in ("dim", "num_heads", "num_layers", "ffn_dim", "text_len", "inject_sample_info"):
        assert a[key] == b[key], key


@torch.no_grad()
def test_both_layouts_equal_the_oracle(both, oracle_pipe):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 4, 4, generator=gen)
    t = torch.tensor([[999.0, 500.0, 0.0]])
    prompt = "a red circle bouncing"
    ref_context = oracle_pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)[0]
    ref_v = oracle_pipe.transformer(x, t, ref_context, enable_diffusion_forcing=True, return_dict=False)[0]
    pixels = torch.rand(1, 3, 5, 32, 32, generator=gen) * 2 - 1
    ref_mu = oracle_pipe.vae.encode(pixels).latent_dist.mean
    ref_pixels = oracle_pipe.vae.decode(ref_mu, return_dict=False)[0]
    for name, (dit, vae, text_encoder) in both.items():
        context = text_encoder.encode([prompt])
        assert torch.equal(context, ref_context), name
        assert (dit(x, t, context) - ref_v).abs().max().item() <= 1e-5, name
        assert (vae.encode(pixels) - ref_mu).abs().max().item() <= 1e-5, name
        assert (vae.decode(ref_mu) - ref_pixels).abs().max().item() <= 1e-5, name


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="model_index.json .* config.json"):
        inspect_model_folder(tmp_path)
    with pytest.raises(ModelFolderError, match="not found"):
        inspect_model_folder(tmp_path / "nope")


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_missing_vae_file_is_named(official_dir, tmp_path):
    folder = _copy(official_dir, tmp_path)
    (folder / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth .*official layout"):
        load_components(inspect_model_folder(folder))


def _edit_first_shard(folder, edit):
    shard = sorted(folder.glob("*.safetensors"))[0]
    state = load_file(str(shard))
    edit(state)
    save_file(state, str(shard))


def test_missing_and_unexpected_keys_are_listed(official_dir, tmp_path):
    folder = _copy(official_dir, tmp_path)
    removed = []

    def edit(state):
        key = sorted(state)[0]
        removed.append(key)
        state["blocks.99.extra.weight"] = state.pop(key)

    _edit_first_shard(folder, edit)
    with pytest.raises(CheckpointError) as err:
        load_components(inspect_model_folder(folder))
    assert "missing keys" in str(err.value) and removed[0] in str(err.value)
    assert "unexpected keys" in str(err.value) and "blocks.99.extra.weight" in str(err.value)


def test_shape_mismatch_names_key_and_shapes(official_dir, tmp_path):
    folder = _copy(official_dir, tmp_path)
    target = []

    def edit(state):
        key = next(k for k in sorted(state) if state[k].ndim == 2)
        target.append((key, tuple(state[key].shape)))
        state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])

    _edit_first_shard(folder, edit)
    key, shape = target[0]
    bigger = (shape[0] + 1, shape[1])
    pattern = re.escape(f"shape mismatch for {key!r}: checkpoint has {bigger}, model expects {shape}")
    with pytest.raises(CheckpointError, match=pattern):
        load_components(inspect_model_folder(folder))


def test_bf16_weights_load_as_fp32(official_dir, tmp_path):
    folder = _copy(official_dir, tmp_path)
    for shard in folder.glob("*.safetensors"):
        state = {k: v.to(torch.bfloat16) for k, v in load_file(str(shard)).items()}
        save_file(state, str(shard))
    dit, _, _ = load_components(inspect_model_folder(folder))
    assert all(p.dtype == torch.float32 for p in dit.parameters())
    ref, _, _ = load_components(inspect_model_folder(official_dir))
    for (name, p), q in zip(dit.named_parameters(), ref.parameters()):
        assert np.allclose(p.detach().numpy(), q.detach().to(torch.bfloat16).float().numpy()), name


def test_default_model_is_written_once_and_loads(tmp_path):
    import skyrt
    from skyrt.export.tiny import ensure_default_model

    folder = ensure_default_model(tmp_path)
    assert ensure_default_model(tmp_path) == folder  # cached, not rewritten
    assert inspect_model_folder(folder).layout == "official"
    frames = skyrt.load(folder).generate("a red circle", num_frames=5, height=32, width=32, num_inference_steps=2,
                                         guidance_scale=1.0, seed=0, progress=False)
    assert frames.shape == (5, 32, 32, 3) and frames.std() > 1  # random weights, but not a flat image
