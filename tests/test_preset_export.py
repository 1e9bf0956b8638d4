"""A causal-family preset exported (export/preset_export.py) and run on onnxruntime against its torch stream.

Each preset's tiny random checkpoint in its family's layout (tests/causal_checkpoints.py, the recipes of
tests/test_causal_family.py; LongLive's with its LoRA) is exported with `skyrt export onnx --preset`, loaded
with `skyrt.load(export, backend="onnxruntime")` (the preset comes from the manifest) and streamed beside
the torch backend's `skyrt.load(folder, preset=...)`: same seed, same prompts (each backend's own umT5),
10 blocks through a small ring (evictions from the fourth block on), a prompt switch with recache at
block 5 (LongLive's chunk recache on dit_step_full; Rolling-Forcing's recommit), a RoPE table shrunk so
the ring is rebased. fp32 latents must agree to 1e-4.

Run: python -m pytest tests/test_preset_export.py -q -s   (-s prints the max differences)
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import skyrt
from causal_checkpoints import load_recipes, write_model_folder
from skyrt.runtime import kvcache
from skyrt.runtime.causal_family import PRESETS

RECIPES = load_recipes()
TOLERANCE = 1e-4
HEIGHT, WIDTH = 32, 48  # the fixtures' latent 4 x 6
BLOCKS, SWITCH = 10, 5
# preset -> (recipe whose folder holds its checkpoint, extra load options)
PRESET_FOLDERS = {
    "self-forcing": ("self_forcing", {}),
    "causvid": ("causvid", {}),
    "causvid-warp4": ("causvid", {"checkpoint": "autoregressive_checkpoint/model.pt"}),
    "longlive": ("longlive", {"lora_alpha": RECIPES["longlive"]["lora"]["alpha"]}),
    "causal-forcing-framewise": ("causal_forcing_framewise", {}),
    "causal-forcing-chunkwise": ("causal_forcing_chunkwise", {}),
    "rolling-forcing": ("rolling_forcing", {}),
}
assert set(PRESET_FOLDERS) == set(PRESETS), "a preset without an export parity test"


def ring_for(name: str) -> dict:
    """A small ring that evicts within BLOCKS; Rolling-Forcing keeps its own (its cache policy needs it)."""
    if name == "rolling-forcing":
        ring = PRESETS[name].ring
        return dict(sink_blocks=ring.sink_blocks, window_blocks=ring.window_blocks)
    return dict(sink_blocks=1, window_blocks=2)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for recipe_name in {r for r, _ in PRESET_FOLDERS.values()}:
        out[recipe_name] = write_model_folder(RECIPES[recipe_name], tmp_path_factory.mktemp(recipe_name) / "model")
    return out


def family_options(name: str, folder: Path) -> dict:
    options = dict(PRESET_FOLDERS[name][1])
    if "checkpoint" in options:
        options["checkpoint"] = folder / options["checkpoint"]
    return options


_EXPORTS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def exports(model_folders, tmp_path_factory):
    """preset name -> its export folder (made once, on first use)."""
    from skyrt.export.preset_export import export_preset_onnx

    def get(name: str) -> Path:
        if name not in _EXPORTS:
            folder = model_folders[PRESET_FOLDERS[name][0]]
            out = tmp_path_factory.mktemp(f"export-{name}")
            export_preset_onnx(folder, out, name, height=HEIGHT, width=WIDTH, progress=False, **ring_for(name),
                               **family_options(name, folder))
            _EXPORTS[name] = out
        return _EXPORTS[name]

    return get


def table_for(name: str) -> int:
    """A RoPE table just big enough for the stream's ring and blocks in flight: BLOCKS rebase it."""
    from skyrt.export.preset_export import blocks_in_flight

    preset, ring = PRESETS[name], ring_for(name)
    block = preset.sampling.causal_block_size
    return (ring["sink_blocks"] + ring["window_blocks"] + blocks_in_flight(preset) + 1) * block


def stream_latents(pipe, name: str) -> np.ndarray:
    stream = pipe.stream("a red fox in the snow", output="latent", seed=3, height=HEIGHT, width=WIDTH,
                         **ring_for(name))
    chunks = []
    for blk in range(BLOCKS):
        if blk == SWITCH:
            stream.set_prompt("a blue bird over the sea", recache=True)
        chunks.append(next(stream))
    stream.close()
    return np.concatenate(chunks, axis=1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_exported_preset_stream_equals_torch(model_folders, exports, monkeypatch, name):
    folder = model_folders[PRESET_FOLDERS[name][0]]
    export = exports(name)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["preset"]["name"] == name
    assert {"dit_step", "dit_step_full", "text_encoder", "vae_decode_step"} <= set(manifest["graphs"])
    rebases: list[int] = []
    real = kvcache.KVCache.rebase
    monkeypatch.setattr(kvcache.KVCache, "rebase", lambda self, shift: (rebases.append(shift), real(self, shift))[1])
    monkeypatch.setattr(kvcache, "ROPE_TABLE", table_for(name))
    ref = stream_latents(skyrt.load(folder, preset=name, **family_options(name, folder)), name)
    torch_rebases, rebases[:] = list(rebases), []
    ort_pipe = skyrt.load(export, backend="onnxruntime")
    assert ort_pipe.preset is not None and ort_pipe.preset.name == name
    graphs_run: set[str] = set()
    real_run = ort_pipe.backend._run_bound
    monkeypatch.setattr(ort_pipe.backend, "_run_bound",
                        lambda graph, *a: (graphs_run.add(graph.name), real_run(graph, *a))[1])
    got = stream_latents(ort_pipe, name)
    # every step graph ran: the recache chunk (or Rolling-Forcing's window) on dit_step_full
    assert {"dit_step", "dit_step_full", "cross_kv"} <= graphs_run
    err = float(np.abs(got - ref).max())
    print(f"{name}: {BLOCKS} blocks, {len(rebases)} rebases, max |ort - torch| = {err:.2e} "
          f"(|latents| max {np.abs(ref).max():.2f})")
    assert rebases == torch_rebases and rebases, "the stream should rebase its ring"
    assert got.shape == ref.shape == (16, BLOCKS * PRESETS[name].sampling.causal_block_size, HEIGHT // 8, WIDTH // 8)
    assert err <= TOLERANCE


def test_longlive_export_merges_the_lora(model_folders, exports):
    """The LoRA changes the weights (so its merge is what the parity above exercises) and is recorded."""
    import onnx
    from onnx import numpy_helper

    manifest = json.loads((exports("longlive") / "manifest.json").read_text())
    assert manifest["preset"]["lora_merged"] and manifest["preset"]["lora"] == "lora.pt"
    from skyrt.export.causal_checkpoint import load_causal_generator
    from skyrt.runtime.causal_family import causal_model_spec

    folder = model_folders["longlive"]
    spec = causal_model_spec(folder, PRESETS["longlive"], lora_alpha=RECIPES["longlive"]["lora"]["alpha"])
    merged = load_causal_generator(spec.family).state_dict()["blocks.0.ffn.2.weight"].numpy()
    graph = onnx.load(str(exports("longlive") / "dit_step.onnx"))
    # the exporter may transpose a Gemm weight: match either layout
    found = [numpy_helper.to_array(i) for i in graph.graph.initializer]
    assert any(a.shape in (merged.shape, merged.T.shape) and
               np.allclose(a if a.shape == merged.shape else a.T, merged, atol=1e-6) for a in found)


def test_a_preset_on_a_model_folder_with_onnxruntime_names_the_export_command(model_folders):
    with pytest.raises(ValueError, match="skyrt export onnx --preset self-forcing"):
        skyrt.load(model_folders["self_forcing"], backend="onnxruntime", preset="self-forcing")


def test_an_export_of_another_preset_is_refused(exports):
    with pytest.raises(ValueError, match="export of the causvid preset"):
        skyrt.load(exports("causvid"), backend="onnxruntime", preset="self-forcing")


def test_the_cli_exports_a_preset(model_folders, tmp_path):
    """`skyrt export onnx --preset` writes the preset's manifest; DF-only shape flags are refused."""
    from skyrt.export.export_cli import main

    folder = model_folders["causvid"]
    assert main(["onnx", "--preset", "causvid", "--model", str(folder), "--out", str(tmp_path / "bad"),
                 "--cache-blocks", "4"]) == 2
    out = tmp_path / "export"
    assert main(["onnx", "--preset", "causvid", "--model", str(folder), "--out", str(out), "--height", "32",
                 "--width", "48", "--sink-blocks", "1", "--window-blocks", "2", "--graphs", "text_encoder,cross_kv",
                 "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preset"]["name"] == "causvid" and manifest["preset"]["window_blocks"] == 2
    assert sorted(manifest["graphs"]) == ["cross_kv", "text_encoder"]


# ---------------------------------------------------------------------------------------------
# Torch-free: the preset's export served with torch not importable

BLOCK_TORCH = """
raise ImportError("torch is blocked in this test: the exported-graph serving path must not import it")
"""


def torch_blocked_env(tmp_path: Path) -> dict:
    """The environment of a subprocess where `import torch` (and transformers, diffusers) fails."""
    import os

    shadow = tmp_path / "no_torch"
    for name in ("torch", "transformers", "diffusers"):
        (shadow / name).mkdir(parents=True, exist_ok=True)
        (shadow / name / "__init__.py").write_text(BLOCK_TORCH)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_preset_export_streams_with_torch_not_importable(exports, tmp_path):
    export = exports("longlive")
    script = textwrap.dedent(f"""
        import json, sys
        try:
            import torch
            sys.exit("torch imported")
        except ImportError:
            pass
        import skyrt
        pipe = skyrt.load({str(export)!r}, backend="onnxruntime")
        stream = pipe.stream("a fox", height={HEIGHT}, width={WIDTH}, sink_blocks=1, window_blocks=2, seed=0)
        frames = [next(stream) for _ in range(3)]
        stream.set_prompt("a bird", recache=True)
        frames.append(next(stream))
        stream.close()
        print(json.dumps({{"preset": pipe.preset.name, "frames": sum(len(f) for f in frames)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=torch_blocked_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"preset": "longlive", "frames": 4 * 3 * 4 - 3}  # 4 blocks of 3 latent frames


def test_skyrt_serve_runs_a_preset_export_with_torch_not_importable(exports, tmp_path, monkeypatch):
    from serving import get_json, running_server

    for key, value in torch_blocked_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    sampling = ["--height", str(HEIGHT), "--width", str(WIDTH), "--sink-blocks", "1", "--window-blocks", "2"]
    with running_server(exports("self-forcing"), "--backend", "onnxruntime", sampling=sampling,
                        ready_timeout=180) as (base, proc):
        status = get_json(base + "/status")
        assert status["frames_output"] > 0
        assert "ImportError" not in proc.output()


# ---------------------------------------------------------------------------------------------
# TensorRT-RTX: the preset's step graphs build ahead of time (no GPU) in fp16 and bf16

@pytest.mark.parametrize("precision,dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_preset_step_graphs_build_with_tensorrt_rtx(model_folders, tmp_path, precision, dtype):
    """`skyrt export engine --preset`: the preset's ONNX in `precision`, then TensorRT-RTX engines of its
    DiT graphs (strongly typed: the precision comes from the graph; build_engines raises on a failure)."""
    pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")
    from skyrt.export.export_cli import main

    graphs = ["cross_kv", "dit_step", "dit_step_full"]
    onnx_dir, engine_dir = tmp_path / "onnx", tmp_path / "engines"
    assert main(["engine", "--preset", "longlive", "--model", str(model_folders["longlive"]), "--onnx", str(onnx_dir),
                 "--out", str(engine_dir), "--precision", precision, "--height", str(HEIGHT), "--width", str(WIDTH),
                 "--sink-blocks", "1", "--window-blocks", "2", "--lora-alpha", str(RECIPES["longlive"]["lora"]["alpha"]),
                 "--builder", "tensorrt-rtx", "--graphs", ",".join(graphs), "--no-progress"]) == 0
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["preset"]["name"] == "longlive"
    for name in ("dit_step", "dit_step_full"):
        inputs = {i["name"]: i["dtype"] for i in manifest["graphs"][name]["inputs"]}
        assert inputs["cache_k"] == inputs["cross_k"] == dtype and inputs["latents"] == "float32"
    for name in graphs:
        engine = json.loads((engine_dir / f"{name}.engine.json").read_text())
        assert engine["precision"] == precision and engine["engine_bytes"] > 0, name
    # the engine folder's copy of the ONNX manifest carries the preset: skyrt.load picks it up there too
    assert json.loads((engine_dir / "onnx_manifest.json").read_text())["preset"]["name"] == "longlive"


def test_a_request_for_another_ring_names_the_preset_export_command(exports):
    pipe = skyrt.load(exports("causvid"), backend="onnxruntime")
    with pytest.raises(ValueError, match="skyrt export onnx --preset causvid .*--sink-blocks"):
        next(pipe.stream("a fox", height=HEIGHT, width=WIDTH, sink_blocks=1, window_blocks=4))


def test_explain_resolves_against_the_exported_preset(exports):
    """`skyrt serve --explain` on a preset export (no --preset): the preset's layer is in the resolution."""
    result = subprocess.run([sys.executable, "-m", "skyrt.runtime.cli", "serve", "--model", str(exports("causvid")),
                             "--backend", "onnxruntime", "--explain"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "preset (causvid)" in result.stdout
