"""ONNX export (skyrt.export.onnx_export): every graph run with onnxruntime CPU against the torch
reference it was traced from, on a tiny random model with O(1) activations.

fp32: max abs diff <= 1e-4 for every output (WanDiT.forward, CachedStep, cross_attention_kv,
TextEncoder.encode, WanVAE.decode / encode are the references, not the graph wrappers).
fp16: every graph with an fp16 variant (cross_kv and the three DiT graphs; umT5 and the VAE stay
fp32) against the same fp32 torch reference, within FP16_TOL below. Plus the manifest, external
data, the CLI, and that the fp16 graphs keep their norms in fp32.

Run: python -m pytest tests/test_onnx_export.py -q
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from checkpoints import randomize_scaled_  # noqa: E402

from skyrt.export import dit as D  # noqa: E402
from skyrt.export.cached_step import CachedStep, active_rope  # noqa: E402
from skyrt.export.loaders import load_components  # noqa: E402
from skyrt.export.onnx_export import OnnxProfile, export_onnx, sha256_file  # noqa: E402
from skyrt.export.tiny import write_official_checkpoint  # noqa: E402
from skyrt.runtime.model_folder import inspect_model_folder  # noqa: E402

TOL = 1e-4
# fp16 tolerances, the one place they are set. fp16 keeps an 11-bit significand: each rounding
# is off by at most u = 2^-11 ~ 4.9e-4 relative. A graph's bound is (fp16 roundings in series on
# the deepest path to its output) x u, relative to max |fp32 output| (measured in the test; the
# activations on the path are of that same O(1-5) size here): the first-order worst case when no
# errors cancel. Each fp16 matmul rounds its input, weights and result (accumulation is fp32); norms,
# RoPE, modulation and the residual stream are fp32 and add nothing. Measured: ~1u (errors cancel).
U16 = 2.0**-11
FP16_TOL = {
    # context cast, K/V weight, K/V result, fp16 output after the fp32 norm of K: 4 roundings
    "cross_kv": 4 * U16,
    # patch embed (input, weight, result: 3) + 2 blocks x 9 on the deepest branch (input, weight,
    # result of q/k/v; q/k re-cast after fp32 norm + RoPE; scores, softmax, P.V; o weight and
    # result) + head (3) = 24 roundings
    "dit_window": 24 * U16,
    # the same path; masked scores are exact (-inf -> 0), so the mask adds none
    "dit_window_causal": 24 * U16,
    # dit_window's path (cache K/V enter rounded to fp16 like k/v results); new K/V are shallower
    "dit_step": 24 * U16,
}
# An fp32 graph differs from torch by ~1e-7 relative (~0.001u); any fp16 rounding on the path
# gives more than u/8 at the worst element. Below that the "fp16" graph ran in fp32.
FP16_FLOOR = U16 / 8
H, W = 32, 32  # pixels; latent 4 x 4, token grid 2 x 2
BLOCK = 2  # causal block frames baked into dit_step / dit_window_causal
CACHE_BLOCKS = 3
CFG = replace(D.TINY, inject_sample_info=True)  # covers the fps inputs too (DF-1.3B has them)


def _ort(path: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(folder: Path, name: str, feeds: dict) -> list[np.ndarray]:
    feeds = {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items()}
    return _ort(folder / f"{name}.onnx").run(None, feeds)


def _zero_caches(entry: dict) -> dict:
    """Zero caches by input name. A first-step graph may lack some cache inputs: the first chunk never
    reads the temporal downsampler's cache, and the exporter drops inputs nothing reads."""
    return {i["name"]: np.zeros(i["shape"], np.float32) for i in entry["inputs"][1:]}


def _vae_step(session, name: str, x: np.ndarray, caches: dict):
    """One VAE graph call with caches by name; returns (output, caches for the next call)."""
    wanted = {i.name for i in session.get_inputs()}
    outs = session.run(None, {name: x, **{k: v for k, v in caches.items() if k in wanted}})
    names = [o.name for o in session.get_outputs()]
    return outs[0], {n[len("new_"):]: v for n, v in zip(names[1:], outs[1:])}


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b.detach() if isinstance(b, torch.Tensor) else b,
                                                               np.float32)).max())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(model folder, (dit, vae, text_encoder)) with scaled random weights (the export's reference)."""
    folder = write_official_checkpoint(tmp_path_factory.mktemp("onnx-model") / "model", dit_config=CFG)
    dit, vae, text_encoder = load_components(inspect_model_folder(folder))
    randomize_scaled_(dit, 3)
    randomize_scaled_(vae, 4)
    return folder, (dit.eval(), vae.eval(), text_encoder)


PROFILE = OnnxProfile(height=H, width=W, block_frames=BLOCK, cache_blocks=CACHE_BLOCKS, max_active_blocks=2,
                      window_frames=6, window_attention="both")


@pytest.fixture(scope="module")
def fp32_export(model, tmp_path_factory):
    folder, components = model
    out = tmp_path_factory.mktemp("onnx-fp32")
    manifest = export_onnx(folder, out, PROFILE, progress=False, components=components, model_hash="test")
    return out, manifest


@pytest.fixture(scope="module")
def fp16_export(model, tmp_path_factory):
    folder, components = model
    out = tmp_path_factory.mktemp("onnx-fp16")
    manifest = export_onnx(folder, out, replace(PROFILE, precision="fp16"), progress=False, components=components,
                           graphs=sorted(FP16_TOL))
    return out, manifest


def _dit_case(dit, batch: int, frames: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, H // 8, W // 8, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000
    context = torch.randn(batch, dit.config.text_len, dit.config.text_dim, generator=g)
    fps = torch.tensor([1, 0][:batch])
    return x, t, context, fps


def _host_inputs(dit, t, first_position, frames):
    cos, sin = active_rope(dit, first_position, frames, H // 16, W // 16)
    return D.timestep_sinusoid(t, dit.config.freq_dim), cos, sin


# ---------------------------------------------------------------------------------------------
# fp32 parity, graph by graph


def test_text_encoder_graph(model, fp32_export):
    _, (_, _, text_encoder) = model
    out, _ = fp32_export
    prompts = ["a red fox runs across a green field, golden hour", "x", ""]
    for prompt in prompts:
        ids, mask = text_encoder.tokenize([prompt])
        (context,) = _run(out, "text_encoder", {"input_ids": ids, "attention_mask": mask})
        ref = text_encoder.encode([prompt])
        assert context.shape == tuple(ref.shape)
        assert _maxdiff(context, ref) <= TOL, prompt
        assert not context[0, int(mask.sum()):].any()  # zero past the prompt, like TextEncoder.encode


def test_cross_kv_graph(model, fp32_export):
    _, (dit, _, _) = model
    out, _ = fp32_export
    context = torch.randn(1, dit.config.text_len, dit.config.text_dim, generator=torch.Generator().manual_seed(1))
    k, v = _run(out, "cross_kv", {"context": context})
    with torch.no_grad():
        ref = dit.cross_attention_kv(context)
    assert k.shape == (CFG.num_layers, 1, CFG.text_len, CFG.num_heads, CFG.head_dim)
    assert _maxdiff(k, torch.stack([r.k for r in ref])) <= TOL
    assert _maxdiff(v, torch.stack([r.v for r in ref])) <= TOL


@pytest.mark.parametrize("variant", ["", ".ort_cpu"])
@pytest.mark.parametrize("graph,batch,frames", [
    ("dit_window", 1, 3), ("dit_window", 2, 5),  # any frame count, batch 1 or 2 (CFG)
    ("dit_window_causal", 1, 2), ("dit_window_causal", 2, 6),  # whole blocks of BLOCK frames
])
def test_dit_window_graph(model, fp32_export, graph, batch, frames, variant):
    """The window graphs (the step with no cache, and their ORT-CPU variants) == WanDiT.forward, the
    reference forward tests/test_dit.py checks against diffusers and the official code."""
    _, (dit, _, _) = model
    out, _ = fp32_export
    x, t, context, fps = _dit_case(dit, batch, frames, seed=frames)
    causal = BLOCK if graph == "dit_window_causal" else None
    graph += variant
    with torch.no_grad():
        ref = dit(x, t, context, fps=fps, causal_block_size=causal)
        kv = dit.cross_attention_kv(context)
    t_emb, cos, sin = _host_inputs(dit, t, 0, frames)
    (velocity,) = _run(out, graph, {"latents": x, "t_emb": t_emb, "cross_k": torch.stack([r.k for r in kv]),
                                    "cross_v": torch.stack([r.v for r in kv]), "rope_cos": cos, "rope_sin": sin,
                                    "fps": fps})
    diff = _maxdiff(velocity, ref)
    print(f"{graph} batch {batch} frames {frames}: max |ort - torch| = {diff:.2e} (|ref| max {ref.abs().max():.2f})")
    assert diff <= TOL


@pytest.mark.parametrize("graph", ["dit_step", "dit_step.ort_cpu"])
@pytest.mark.parametrize("batch,frames,first_position", [(1, BLOCK, 7), (1, 2 * BLOCK, 4), (2, 2 * BLOCK, 9)])
def test_dit_step_graph(model, fp32_export, batch, frames, first_position, graph):
    """dit_step (and its ORT-CPU variant) == CachedStep (real float64 timesteps inside) with the same
    cache and validity."""
    _, (dit, _, _) = model
    out, manifest = fp32_export
    tokens_per_block = manifest["graphs"]["dit_step"]["tokens_per_block"]
    x, t, context, fps = _dit_case(dit, batch, frames, seed=10 + frames)
    g = torch.Generator().manual_seed(5)
    shape = (CFG.num_layers, batch, CACHE_BLOCKS * tokens_per_block, CFG.num_heads, CFG.head_dim)
    cache_k, cache_v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    slot_valid = torch.tensor([[True, False, True], [False, True, True]][:batch])
    with torch.no_grad():
        kv = dit.cross_attention_kv(context)
        cos, sin = active_rope(dit, first_position, frames, H // 16, W // 16)
        ref = CachedStep(dit)(x, t, kv, cache_k, cache_v, slot_valid.repeat_interleave(tokens_per_block, dim=1),
                              cos, sin, fps=fps, causal_block_size=BLOCK)
    t_emb, cos, sin = _host_inputs(dit, t, first_position, frames)
    got = _run(out, graph, {"latents": x, "t_emb": t_emb, "cross_k": torch.stack([r.k for r in kv]),
                                 "cross_v": torch.stack([r.v for r in kv]), "cache_k": cache_k, "cache_v": cache_v,
                                 "slot_valid": slot_valid, "rope_cos": cos, "rope_sin": sin, "fps": fps})
    for name, a, b in zip(("velocity", "new_k", "new_v"), got, ref):
        assert a.shape == tuple(b.shape), name
        assert _maxdiff(a, b) <= TOL, name


def test_vae_decode_graphs_stream_to_the_whole_decode(model, fp32_export):
    _, (_, vae, _) = model
    out, manifest = fp32_export
    z = torch.randn(1, 16, 3, H // 8, W // 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = vae.decode(z)  # [1, 3, 9, H, W]
    first, step = _ort(out / "vae_decode_first.onnx"), _ort(out / "vae_decode_step.onnx")
    caches = _zero_caches(manifest["graphs"]["vae_decode_first"])
    frames = []
    for i in range(z.shape[2]):
        pixels, caches = _vae_step(first if i == 0 else step, "z", z[:, :, i:i + 1].numpy(), caches)
        frames.append(pixels)
    got = np.concatenate(frames, axis=2)
    assert got.shape == tuple(ref.shape)
    assert _maxdiff(got, ref) <= TOL


def test_vae_encode_graphs_equal_the_whole_encode(model, fp32_export):
    _, (_, vae, _) = model
    out, manifest = fp32_export
    video = torch.rand(1, 3, 9, H, W, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(video)  # [1, 16, 3, h, w]
    first, step = _ort(out / "vae_encode_first.onnx"), _ort(out / "vae_encode_step.onnx")
    caches = _zero_caches(manifest["graphs"]["vae_encode_first"])
    mu, caches = _vae_step(first, "pixels", video[:, :, :1].numpy(), caches)
    mus = [mu]
    for start in (1, 5):
        mu, caches = _vae_step(step, "pixels", video[:, :, start:start + 4].numpy(), caches)
        mus.append(mu)
    assert _maxdiff(np.concatenate(mus, axis=2), ref) <= TOL


def test_dit_step_ort_cpu_variant_is_recorded_and_only_it_uses_contrib_ops(fp32_export):
    """The engines' dit_step.onnx holds standard ONNX ops only (TensorRT builds it); the ORT-CPU
    variant beside it is listed under dit_step's "ort_cpu" entry with its hash, and holds the contrib ops."""
    out, manifest = fp32_export
    entry = manifest["graphs"]["dit_step"]
    variant = entry["ort_cpu"]
    assert variant["file"] == "dit_step.ort_cpu.onnx" and variant["providers"] == ["CPUExecutionProvider"]
    assert sha256_file(out / variant["file"]) == variant["sha256"][variant["file"]]
    plain = onnx.load(str(out / entry["file"]))
    assert {node.domain for node in plain.graph.node} <= {"", "ai.onnx"}
    fused = onnx.load(str(out / variant["file"]))
    contrib = {f"{n.domain}.{n.op_type}" for n in fused.graph.node if n.domain not in ("", "ai.onnx")}
    assert contrib == set(variant["contrib_ops"]) == {"com.microsoft.MultiHeadAttention", "com.microsoft.FastGelu"}
    assert [i.name for i in fused.graph.input] == [i.name for i in plain.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in plain.graph.output]


def test_window_graphs_are_the_step_without_cache_inputs(fp32_export):
    """Window mode's graphs take dit_step's inputs less the ring (cache_k, cache_v, slot_valid) and give
    its velocity only (nothing to commit), each with an ORT-CPU variant of the same I/O."""
    out, manifest = fp32_export
    step = manifest["graphs"]["dit_step"]
    ring = {"cache_k", "cache_v", "slot_valid"}
    for name in ("dit_window", "dit_window_causal"):
        entry = manifest["graphs"][name]
        assert [i["name"] for i in entry["inputs"]] == [i["name"] for i in step["inputs"] if i["name"] not in ring]
        assert [o["name"] for o in entry["outputs"]] == ["velocity"]
        variant = onnx.load(str(out / entry["ort_cpu"]["file"]))
        assert [i.name for i in variant.graph.input] == [i["name"] for i in entry["inputs"]]
        assert {f"{n.domain}.{n.op_type}" for n in variant.graph.node if n.domain not in ("", "ai.onnx")} == \
            set(entry["ort_cpu"]["contrib_ops"])


# ---------------------------------------------------------------------------------------------
# Manifest, files, external data, CLI


def test_manifest_lists_every_graph_with_hashes_and_io(model, fp32_export):
    out, manifest = fp32_export
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert set(manifest["graphs"]) == set(PROFILE.default_graphs())
    assert manifest["precision"] == "fp32" and manifest["export_config"]["block_frames"] == BLOCK
    assert manifest["model"]["dit_config"]["inject_sample_info"] is True
    assert manifest["tokenizer"]["file"] == "tokenizer.json" and (out / "tokenizer.json").is_file()
    for name, entry in manifest["graphs"].items():
        assert sha256_file(out / entry["file"]) == entry["sha256"][entry["file"]]
        onnx.checker.check_model(str(out / entry["file"]))
        session = _ort(out / entry["file"])
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in entry["inputs"]]
        assert [o.name for o in session.get_outputs()] == [o["name"] for o in entry["outputs"]]
    step = manifest["graphs"]["dit_step"]
    assert step["shape_config"] == {"height": H, "width": W, "block_frames": BLOCK, "cache_blocks": CACHE_BLOCKS}
    assert {i["name"]: i["dtype"] for i in step["inputs"]}["slot_valid"] == "bool"
    # TensorRT optimization profile of the dynamic inputs: frames from one block to max_active_blocks
    assert step["profile"]["latents"] == [[1, 16, BLOCK, 4, 4], [1, 16, 2 * BLOCK, 4, 4], [2, 16, 2 * BLOCK, 4, 4]]
    assert "profile" in manifest["graphs"]["vae_decode_step"] and not manifest["graphs"]["vae_decode_step"]["profile"]


def test_external_data_path(model, tmp_path):
    folder, components = model
    profile = replace(PROFILE, external_data_threshold=0)  # every graph "too big": weights in .onnx.data
    manifest = export_onnx(folder, tmp_path, profile, graphs=["cross_kv"], progress=False, components=components)
    entry = manifest["graphs"]["cross_kv"]
    assert entry["external_data"] == "cross_kv.onnx.data" and (tmp_path / "cross_kv.onnx.data").is_file()
    assert set(entry["sha256"]) == {"cross_kv.onnx", "cross_kv.onnx.data"}
    assert (tmp_path / "cross_kv.onnx").stat().st_size < (tmp_path / "cross_kv.onnx.data").stat().st_size
    onnx.checker.check_model(str(tmp_path / "cross_kv.onnx"))
    dit = components[0]
    context = torch.randn(1, CFG.text_len, CFG.text_dim)
    k, _ = _run(tmp_path, "cross_kv", {"context": context})
    with torch.no_grad():
        ref = torch.stack([r.k for r in dit.cross_attention_kv(context)])
    assert _maxdiff(k, ref) <= TOL


def test_cli_exports_with_conventional_flags(model, tmp_path, capsys):
    from skyrt.runtime.cli import main

    folder, _ = model
    code = main(["export", "onnx", "--model", str(folder), "--out", str(tmp_path), "--height", "32", "--width", "48",
                 "--block-frames", "1", "--cache-blocks", "2", "--graphs", "cross_kv,dit_step", "--no-progress"])
    assert code == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"cross_kv", "dit_step"}
    assert manifest["graphs"]["dit_step"]["shape_config"] == {"height": 32, "width": 48, "block_frames": 1,
                                                              "cache_blocks": 2}
    assert "wrote 2 graphs" in capsys.readouterr().out
    assert main(["export", "onnx", "--model", str(folder), "--out", str(tmp_path), "--height", "30"]) == 2


# ---------------------------------------------------------------------------------------------
# fp16


def test_fp16_graphs_keep_norms_rope_and_time_embedding_in_fp32(fp16_export):
    out, manifest = fp16_export
    step = manifest["graphs"]["dit_step"]
    dtypes = {i["name"]: i["dtype"] for i in step["inputs"]}
    assert dtypes["cache_k"] == dtypes["cross_k"] == "float16"
    assert dtypes["t_emb"] == dtypes["rope_cos"] == dtypes["latents"] == "float32"
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / "dit_step.onnx")))
    elem = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    ops = {}
    for node in model.graph.node:
        ops.setdefault(node.op_type, []).append(elem.get(node.output[0]))
    # LayerNorm / RMS norm (ReduceMean), RoPE (Sin/Cos are host-side; the rotation is Mul/Sub on fp32),
    # softmax of attention stays in the compute dtype; the heavy MatMuls are fp16.
    assert ops["ReduceMean"] and all(t == f32 for t in ops["ReduceMean"])
    assert ops.get("LayerNormalization", []) == [] or all(t == f32 for t in ops["LayerNormalization"])
    matmuls = ops["MatMul"] + ops.get("Gemm", [])
    assert sum(t == f16 for t in matmuls) >= 0.5 * len(matmuls)


def _fp16_case(model, folder: Path, tokens_per_block: int, graph: str):
    """(outputs of the fp16 graph run by ORT CPU, fp32 torch reference outputs) on one input; the
    fp16 graph gets the fp32 reference's cross K/V and cache rounded to fp16 (its input dtype)."""
    _, (dit, _, _) = model
    x, t, context, fps = _dit_case(dit, 1, 2 * BLOCK, seed=21)
    with torch.no_grad():
        kv = dit.cross_attention_kv(context)
    cross = [torch.stack([r.k for r in kv]), torch.stack([r.v for r in kv])]
    half = {"cross_k": cross[0].half(), "cross_v": cross[1].half()}
    if graph == "cross_kv":
        return _run(folder, graph, {"context": context}), cross
    if graph.split(".")[0] in ("dit_window", "dit_window_causal"):  # the graph or its ORT-CPU variant
        causal = BLOCK if graph.startswith("dit_window_causal") else None
        with torch.no_grad():
            ref = [dit(x, t, context, fps=fps, causal_block_size=causal)]
        t_emb, cos, sin = _host_inputs(dit, t, 0, x.shape[2])
        return _run(folder, graph, {"latents": x, "t_emb": t_emb, **half, "rope_cos": cos, "rope_sin": sin,
                                    "fps": fps}), ref
    g = torch.Generator().manual_seed(6)
    shape = (CFG.num_layers, 1, CACHE_BLOCKS * tokens_per_block, CFG.num_heads, CFG.head_dim)
    cache_k, cache_v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    valid = torch.tensor([[True, True, False]])
    t_emb, cos, sin = _host_inputs(dit, t, 3, x.shape[2])
    with torch.no_grad():
        ref = CachedStep(dit)(x, t, kv, cache_k, cache_v, valid.repeat_interleave(tokens_per_block, dim=1), cos, sin,
                              fps=fps, causal_block_size=BLOCK)
    return _run(folder, graph, {"latents": x, "t_emb": t_emb, **half, "cache_k": cache_k.half(),
                                "cache_v": cache_v.half(), "slot_valid": valid, "rope_cos": cos, "rope_sin": sin,
                                "fps": fps}), list(ref)


@pytest.mark.parametrize("graph", sorted(FP16_TOL) + ["dit_step.ort_cpu", "dit_window.ort_cpu",
                                                     "dit_window_causal.ort_cpu"])
def test_fp16_graphs_against_the_fp32_reference(model, fp16_export, graph):
    out, manifest = fp16_export
    base = graph.split(".")[0]  # <graph>.ort_cpu: the graph's ORT-CPU variant, the same bound
    assert manifest["graphs"][base]["precision"] == "fp16"
    got, ref = _fp16_case(model, out, manifest["graphs"]["dit_step"]["tokens_per_block"], graph)
    names = [o["name"] for o in manifest["graphs"][base]["outputs"]]
    for name, a, b in zip(names, got, ref):
        b = b.float().numpy()
        scale = float(np.abs(b).max())  # the output's magnitude: the bound is relative to it
        rel = float(np.abs(a.astype(np.float32) - b).max()) / scale
        print(f"fp16 {graph}.{name}: max |out| {scale:.3f}, max diff {rel * scale:.2e} = {rel / U16:.2f} u "
              f"(bound {FP16_TOL[base] / U16:.0f} u)")
        assert rel <= FP16_TOL[base], f"{graph}.{name}: {rel / U16:.2f} u of max |out|"
        assert rel >= FP16_FLOOR, f"{graph}.{name} is too close to fp32 ({rel / U16:.3f} u): did it run in fp16?"
