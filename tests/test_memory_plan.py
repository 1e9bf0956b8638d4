"""runtime/memory_plan.py against what we did not write it from: the torch reference modules' parameter
counts and cache specs (counted on the meta device at the real configs), and the rollout core's own
allocations (skyrt._core.RolloutCore buffers), plus admission by memory (runtime/fleet/admission.py)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from skyrt import _core
from skyrt.runtime import memory_plan as mp
from skyrt.runtime.causal_family import PRESETS
from skyrt.runtime.fleet.admission import Admission, AdmissionRefused, LogicalGpu, parse_memory
from skyrt.runtime.fleet.shared_models import ModelCache, ModelKey
from skyrt.runtime.fleet.config import ConfigError, parse_fleet_config
from skyrt.runtime.model_config import DF_1_3B_540P, TINY, DiTConfig


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, inject_sample_info=True),
                                 dataclasses.replace(TINY, model_type="i2v", in_dim=36),
                                 dataclasses.replace(TINY, qk_norm=False, cross_attn_norm=False),
                                 mp.WAN21_1_3B, DF_1_3B_540P], ids=["tiny", "fps", "i2v", "no-norms", "1.3b", "df-1.3b"])
def test_dit_parameters_equal_the_reference_module(cfg: DiTConfig):
    from skyrt.export.dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(cfg)
    assert mp.dit_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_vae_decoder_and_its_caches_are_the_reference_modules():
    from skyrt.export.vae import WAN21, WanVAE

    with torch.device("meta"):
        vae = WanVAE(WAN21)
    decoder = sum(p.numel() for m in (vae.decoder, vae.conv2) for p in m.parameters())
    assert mp.WAN21_VAE_DECODER_PARAMETERS == decoder
    expanded = [(c, s) for c, s, n in mp.WAN21_DECODER_CACHES for _ in range(n)]
    assert expanded == [(spec.channels, spec.stride) for spec in vae.decoder_cache_specs]
    assert {spec.frames for spec in vae.decoder_cache_specs} == {mp.DECODER_CACHE_FRAMES}
    # the bytes of the caches at a shape == the zero caches the reference allocates
    shape = mp.StreamShape(32, 48, block_frames=1, sink_blocks=1, window_blocks=2, blocks_in_flight=1)
    with torch.device("meta"):
        caches = vae.decoder_cache_init(1, 4, 6, dtype=torch.float32)
    plan = mp.plan_stream(mp.WAN21_1_3B, shape, "fp32")
    assert plan.cache["vae_decoder_cache"] == sum(c.numel() * 4 for c in caches)


def test_text_encoder_parameters_are_umt5_xxl():
    from transformers import UMT5EncoderModel

    from skyrt.export.text_encoder import umt5_config_for_official

    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config_for_official("xxl"))
    assert mp.UMT5_XXL_PARAMETERS == sum(p.numel() for p in model.parameters())


CORE_SHAPES = {  # (shape, sampler kwargs of the core): each kind of stream the plan covers
    "fewstep-recache": (mp.StreamShape(32, 48, block_frames=3, sink_blocks=1, window_blocks=2, blocks_in_flight=1,
                                       step_noise=True, recache=True),
                        dict(step_template=[1000, 500], sigmas=[0.9, 0.5, 0.0], sampler="fewstep",
                             renoise_sigmas=[0.0, 0.5], ar_step=2, longlive_recache=True)),
    "rolling": (mp.StreamShape(32, 48, block_frames=3, sink_blocks=1, window_blocks=6, blocks_in_flight=2,
                               step_noise=True),
                dict(step_template=[1000, 500], sigmas=[0.9, 0.5, 0.0], sampler="fewstep", renoise_sigmas=[0.0, 0.5],
                     ar_step=1)),
    "df-unipc-cfg": (mp.StreamShape(32, 48, block_frames=2, sink_blocks=1, window_blocks=4, blocks_in_flight=3,
                                    contexts=2, history_buffers=3),
                     dict(step_template=[999, 666, 333], sigmas=[0.99, 0.66, 0.33, 0.0], ar_step=1, guidance_scale=3.0)),
}


@pytest.mark.parametrize("kind", list(CORE_SHAPES))
@pytest.mark.parametrize("precision, kv_dtype", [("fp32", "float32"), ("fp16", "float16")])
def test_cache_equals_what_the_rollout_core_allocates(kind, precision, kv_dtype):
    shape, sampler = CORE_SHAPES[kind]
    cfg = dataclasses.replace(TINY, num_layers=3, dim=24, num_heads=2)
    h, w = shape.latent_size
    core = _core.RolloutCore(**sampler, causal_block_size=shape.block_frames, max_blocks_in_flight=shape.blocks_in_flight,
                             sink_blocks=shape.sink_blocks, window_blocks=shape.window_blocks, height=h, width=w,
                             tokens_per_frame=shape.tokens_per_frame, layers=cfg.num_layers, heads=cfg.num_heads,
                             head_dim=cfg.head_dim, contexts=shape.contexts, kv_dtype=kv_dtype)
    try:
        assert core.max_frames == shape.step_frames  # the DiT call the core sizes its I/O for
        allocated = {name: core.buffer(name, core.max_frames).nbytes for name in core.buffer_names}
    finally:
        core.close()
    plan = mp.plan_stream(cfg, shape, precision)
    assert plan.cache["ring_kv"] == allocated["cache_k"] + allocated["cache_v"]
    assert plan.cache["step_kv"] == allocated["new_k"] + allocated["new_v"]
    # the step's fp32 input and velocity are part of the plan's latents (with the blocks in flight and
    # the ring's clean latents, which the core does not expose)
    step_latents = allocated["latents_in"] + allocated["velocity"]
    in_flight = 4 * 16 * shape.block_frames * h * w * shape.blocks_in_flight * (1 + shape.history_buffers + shape.step_noise)
    ring = 4 * 16 * shape.block_frames * h * w * (shape.sink_blocks + shape.window_blocks + 1)
    assert plan.cache["latents"] == step_latents + in_flight + ring


def test_presets_take_their_ring_and_block():
    for name, preset in PRESETS.items():
        cfg, shape = mp.preset_shape(name, 480, 832)
        assert cfg == mp.WAN21_1_3B and cfg.num_layers == 30
        defaults = preset.sampling_defaults()
        assert (shape.block_frames, shape.sink_blocks, shape.window_blocks) == (
            defaults["causal_block_size"], defaults["sink_blocks"], defaults["window_blocks"])
        assert shape.tokens_per_frame == 1560  # 480x832: 60x104 latents, 30x52 patches (their 32760 = 21 frames)
    assert mp.preset_shape("rolling-forcing", 480, 832)[1].blocks_in_flight == 5


def test_ring_kv_by_hand_for_self_forcing_bf16():
    plan = mp.plan_preset("self-forcing", 480, 832, "bf16")
    # sink 1 + window 5 blocks of 3 frames, 1560 tokens each, K and V, 30 layers x 1536 wide, 2 bytes
    assert plan.cache["ring_kv"] == 18 * 1560 * 2 * 30 * 1536 * 2
    assert plan.weights["dit"] == mp.dit_parameters(mp.WAN21_1_3B) * 2
    fp8 = mp.plan_preset("self-forcing", 480, 832, "fp8")
    assert fp8.weights["dit"] * 2 == plan.weights["dit"] and fp8.cache == plan.cache
    assert mp.plan_preset("self-forcing", 480, 832, "fp32").cache["ring_kv"] == 2 * plan.cache["ring_kv"]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="precision 'int4'"):
        mp.plan_preset("self-forcing", precision="int4")
    with pytest.raises(ValueError, match="multiples of 16"):
        mp.plan_preset("self-forcing", 481, 832)


# --------------------------------------------------------------------------------------- admission
def test_parse_memory():
    assert parse_memory("24GiB", "m") == 24 * 2 ** 30 and parse_memory("24 GB", "m") == 24 * 10 ** 9
    assert parse_memory(1.5, "m") == int(1.5 * 2 ** 30) and parse_memory("512MiB", "m") == 2 ** 29
    for bad in ("lots", "-1GiB", True, "0"):
        with pytest.raises(ValueError, match="m must be"):
            parse_memory(bad, "m")


KEY = ModelKey("m", "torch", "cuda", "bf16")
OTHER = ModelKey("n", "torch", "cuda", "bf16")


def test_admission_pays_a_models_weights_once_per_gpu_then_refuses_with_figures():
    plan = mp.plan_preset("self-forcing", 480, 832, "bf16", text_encoder=False)
    w, own = plan.weights_bytes, plan.per_stream_bytes
    gpus = (LogicalGpu("a", w + int(1.5 * own), reserve_bytes=0), LogicalGpu("b", w + int(2.5 * own)))
    admission = Admission(gpus)
    # a: weights + one stream; then a has no room for a second stream, b loads its own copy for two.
    assert [admission.admit(s, plan, KEY) for s in ("s1", "s2", "s3")] == ["a", "b", "b"]
    assert admission.used_bytes("b") == w + 2 * own  # weights once, not per stream
    with pytest.raises(AdmissionRefused) as refused:
        admission.admit("s4", plan, KEY)
    err = refused.value
    assert err.needed_bytes == {"a": own, "b": own}
    assert err.free_bytes == {"a": gpus[0].memory_bytes - w - own, "b": gpus[1].memory_bytes - w - 2 * own}
    assert f"a: needs {own / 2 ** 30:.3f} GiB (its weights are loaded there)" in str(err) and "weights" in str(err)
    # Another model pays its own weights wherever it goes.
    with pytest.raises(AdmissionRefused) as other:
        admission.admit("t1", plan, OTHER)
    assert other.value.needed_bytes == {"a": w + own, "b": w + own}
    admission.release("s1")  # a's last stream of KEY: its weights are no longer counted there
    assert admission.free_bytes()["a"] == gpus[0].memory_bytes
    assert admission.admit("s4", plan, KEY) == "a"  # b (which holds the model) has half a stream free
    assert admission.booking_json("s2")["weights_shared_with"] == ["s3"]


def test_a_model_cache_loads_a_shared_model_once_and_frees_it_with_its_last_stream():
    loads = []

    def load():
        loads.append(object())
        return loads[-1]

    cache = ModelCache()
    first, second = cache.acquire(KEY, "s1", load), cache.acquire(KEY, "s2", load)
    assert first is second and len(loads) == 1
    assert cache.acquire(OTHER, "s3", load) is not first and len(loads) == 2
    assert cache.release("s1") == []  # s2 still runs on it
    assert [d["streams"] for d in cache.describe() if d["object_id"] == id(first)] == [["s2"]]
    assert cache.release("s2") == [KEY]
    assert cache.acquire(KEY, "s4", load) is not first and len(loads) == 3  # loaded afresh


def test_fleet_config_gpus():
    config = parse_fleet_config({"gpus": [{"name": "g0", "memory": "24GiB", "reserve": "1GiB"}],
                                 "streams": [{"id": "a", "precision": "fp8"}]})
    assert config.gpus == (LogicalGpu("g0", 24 * 2 ** 30, 2 ** 30),) and config.streams[0].precision == "fp8"
    for bad, match in (([{"name": "g"}], "missing memory"), ([{"memory": "x"}], "gpus\\[0\\].memory must be"),
                       ([{"memory": 2, "reserve": 3}], "reserve must be less"), ({"memory": 2}, "must be a list"),
                       ([{"memory": 2, "size": 1}], "unknown key")):
        with pytest.raises(ConfigError, match=match):
            parse_fleet_config({"gpus": bad})
    with pytest.raises(ConfigError, match="precision must be one of"):
        parse_fleet_config({"streams": [{"id": "a", "precision": "int4"}]})


def test_in_flight_of_the_df_stream_is_the_rollouts():
    assert mp.DF_1_3B_STREAM["blocks_in_flight"] == math.ceil(30 / 5)
