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
from skyrt.export.dit import cast_dit
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


def test_streamed_external_data_writes_what_onnx_save_model_writes(tmp_path):
    """export_graph's one-tensor-at-a-time writer (_save_external_streamed) against onnx's own
    save_model(save_as_external_data=True) of the fully loaded model: the same .onnx and .data bytes.
    The source is laid out as torch's exporter writes a >2 GB model (one external file per tensor),
    with small tensors (kept in the graph by the size threshold) and a Constant attribute tensor."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import load_external_data_for_model

    from skyrt.export.onnx_export import _initializer_bytes, _save_external_streamed

    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal(shape).astype(np.float16)
               for i, shape in enumerate([(64, 64), (3,), (128, 32), (8,), (33, 65)])}
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        rng.standard_normal((40, 40)).astype(np.float32), "c_value"))
    node = helper.make_node("Identity", ["w0"], ["y"])
    graph = helper.make_graph([const, node], "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16,
                                                                                       [64, 64])], inits)
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(helper.make_model(graph), str(src / "graph.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)

    full = onnx.load(str(src / "graph.onnx"), load_external_data=False)
    assert _initializer_bytes(full, src) == sum(v.nbytes for v in weights.values())
    load_external_data_for_model(full, str(src))
    (tmp_path / "want").mkdir()
    onnx.save_model(full, str(tmp_path / "want" / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=1024)

    lazy = onnx.load(str(src / "graph.onnx"), load_external_data=False)
    (tmp_path / "got").mkdir()
    _save_external_streamed(lazy, src, tmp_path / "got", "m.onnx.data", size_threshold=1024)
    onnx.save_model(lazy, str(tmp_path / "got" / "m.onnx"))
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "got" / name).read_bytes() == (tmp_path / "want" / name).read_bytes(), name
    kept = [t.name for t in onnx.load(str(tmp_path / "got" / "m.onnx"), load_external_data=False).graph.initializer
            if t.HasField("raw_data")]
    assert kept == ["w1", "w3"]  # under the threshold: in the graph, as onnx keeps them
