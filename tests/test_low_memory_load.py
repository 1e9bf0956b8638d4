"""The export's low-memory DiT load (export/causal_checkpoint.py load_cast_assign: meta model, each
checkpoint tensor cast straight into the traced dtype and assigned) gives exactly the module the
normal path gives (fp32 load, then export/onnx_export.py cast_dit), on tiny causal checkpoints with
and without a merged LoRA."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch


from causal_checkpoints import dit_config, load_recipes, write_family_files
from skyrt.export.causal_checkpoint import load_causal_generator
from skyrt.export.checkpoint import CheckpointError
from skyrt.export.onnx_export import cast_dit
from skyrt.runtime.causal_family import PRESETS, find_causal_files

RECIPES = load_recipes()


def _files(recipe: dict, folder):
    write_family_files(recipe, folder)
    alpha = recipe["lora"]["alpha"] if recipe.get("lora") else None
    files = find_causal_files(folder, PRESETS[recipe["family"]], lora_alpha=alpha)
    return replace(files, config_json=dit_config(recipe).to_official())  # a tiny dim: heads from the config


@pytest.mark.parametrize("name", ["self_forcing", "longlive"])  # longlive: a LoRA merged before the cast
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_memory_load_equals_fp32_load_then_cast(tmp_path, name, precision):
    recipe = RECIPES[name]
    files = _files(recipe, tmp_path)
    reference = cast_dit(load_causal_generator(files, torch.float32), precision, in_place=True)
    low = load_causal_generator(files, precision=precision)
    want, got = reference.state_dict(), low.state_dict()
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].device.type == "cpu", key
        assert torch.equal(got[key], tensor), key
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    dtypes = {t.dtype for t in got.values()}
    assert dtypes == {half, torch.float32}  # the big matmuls cast, the fp32 islands kept
    # the same forward: a random step of the tiny DiT, both modules in fp32 compute (CPU half
    # matmuls are not what is checked here; the weights are, and this runs them through the model)
    cfg = low.config
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=gen)
    t = torch.tensor([500.0])
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    with torch.no_grad():
        a = reference.float()(x, t, context)
        b = low.float()(x, t, context)
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_low_memory_load_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    recipe = RECIPES["self_forcing"]
    files = _files(recipe, tmp_path)
    obj = torch.load(files.checkpoint, weights_only=True)
    for entry in obj.values():
        entry.pop(next(iter(entry)))  # one weight missing
    torch.save(obj, files.checkpoint)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_causal_generator(files, precision="fp16")
