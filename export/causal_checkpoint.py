"""Read the causal Wan2.1 family's released checkpoints (Self-Forcing, CausVid, LongLive) strictly and safely.

Their files are `torch.save` pickles of training state, not bare state dicts:
- Self-Forcing `checkpoints/self_forcing_dmd.pt`: {"generator": ..., "generator_ema": ...} (their README
  runs it with --use_ema), keys of their WanDiffusionWrapper: `model.` + the official WanModel keys;
- CausVid `autoregressive_checkpoint/model.pt`: {"generator": ...}, the same `model.` keys;
- Causal-Forcing `framewise/causal_forcing.pt` (their README: --use_ema): {"generator_ema": ...} alone
  (their trainer saves only the EMA once it runs), keyed `model._fsdp_wrapped_module.` + the WanModel key
  (their EMA_FSDP shadow is named after the FSDP-wrapped generator's parameters); `chunkwise/
  causal_forcing.pt` (no --use_ema): {"generator": ...} under `model.` keys;
- Rolling-Forcing `rolling_forcing_dmd.pt` (--use_ema): {"generator", "critic", "generator_ema"}, the
  EMA keyed like Causal-Forcing's;
- LongLive `longlive_base.pt` ({"generator": ...} / {"generator_ema": ...} / {"model": ...}) plus
  `lora.pt` ({"generator_lora": peft state dict}: `base_model.model.<module>.lora_A.weight` /
  `lora_B.weight` for every Linear of every transformer block), merged here as W + alpha / rank * B @ A.

Safety: `torch.load(weights_only=True)` always. torch's weights-only allow-list already holds every
tensor-rebuild global (tensors, parameters, storages, dtypes, OrderedDict, torch.Size); skyrt allows
nothing beyond it, so a file naming any other pickle global (code such as os.system, but also numpy
scalars) is refused, the message naming the file and the globals (read without running them).
Checks: missing/unexpected keys, shapes (naming the key), a LoRA whose modules or shapes do not fit
the base (naming the LoRA file).

Config: from the folder's config.json when there is one, else from the weights' shapes; the head
count is the one thing shapes cannot tell, so without config.json it is dim / 128 (every Wan2.1 DiT
has 128-wide heads) and a dim that is not a multiple of 128 is refused as ambiguous.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from skyrt.runtime.model_config import DiTConfig

from .checkpoint import CheckpointError, StateDict, cast_floats, check_keys_and_shapes, load_strict

# Top-level entries of their training checkpoints that hold the generator, in order of preference.
GENERATOR_KEYS = ("generator", "model")
EMA_KEY = "generator_ema"
LORA_KEY = "generator_lora"
# Wrapper prefixes in their keys: WanDiffusionWrapper's `model.`; FSDP / activation-checkpointing wrappers.
# Causal-Forcing's and Rolling-Forcing's EMA entries are keyed `model._fsdp_wrapped_module.blocks.0...`.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
FSDP_FLAT_PARAM = "_flat_param"  # FSDP's flattened parameter: weights not recoverable by name
WAN_HEAD_DIM = 128


# ------------------------------------------------------------------------------------------ reading
def read_pickled_checkpoint(path: str | Path) -> object:
    """torch.load(weights_only=True) of a training checkpoint, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return _load(path)
    except CheckpointError:
        raise
    except Exception as err:
        if type(err).__name__ == "UnpicklingError":
            raise _refusal(path, err) from err
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint ({type(err).__name__}: "
                              f"{_first_line(err)}); download it again") from err


def _load(path: Path, mmap: bool = True):
    try:
        # mmap: a multi-GB release is paged in as read, not copied (needs torch's zip format)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as err:
        if mmap and "mmap" in str(err):
            return _load(path, mmap=False)
        raise


def _refusal(path: Path, err: Exception) -> CheckpointError:
    """The error for a pickle naming globals outside torch's weights-only set (listed, never imported)."""
    try:
        names = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) or _first_line(err)
    except Exception as inner:
        return CheckpointError(f"{path} is not a readable torch checkpoint ({_first_line(inner)})")
    return CheckpointError(
        f"{path} needs pickle globals that are not tensor data: {names}. skyrt reads checkpoints with "
        "weights_only=True and never runs pickled code; re-save the generator's state dict "
        "(torch.save({'generator': model.state_dict()}, path))")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


# ------------------------------------------------------------------------------------------ generator
def generator_state(obj: object, path: Path, use_ema: bool) -> tuple[StateDict, str]:
    """(the generator's state dict under official WanModel keys, the entry it came from)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a training checkpoint dict")
    entries = [k for k in obj if isinstance(k, str)]
    if use_ema:
        if EMA_KEY not in obj:
            raise CheckpointError(f"{path} has no '{EMA_KEY}' entry (entries: {', '.join(entries)}); "
                                  "load it with use_ema=False for the 'generator' weights")
        key = EMA_KEY
    else:
        key = next((k for k in GENERATOR_KEYS if k in obj), None)
        if key is None and EMA_KEY in obj:
            raise CheckpointError(f"{path} holds only '{EMA_KEY}' (entries: {', '.join(entries[:8])}): an EMA-only "
                                  "release such as Causal-Forcing's frame-wise causal_forcing.pt; load it with "
                                  "use_ema=True, or with the preset it was released for (causal-forcing-framewise)")
        if key is None:
            hint = ("; it looks like a bare state dict: a bidirectional Wan2.1 / SkyReels-V2 DiT, not a causal "
                    "release" if obj and all(isinstance(v, torch.Tensor) for v in obj.values()) else "")
            raise CheckpointError(f"{path} has no 'generator' / 'generator_ema' / 'model' entry (entries: "
                                  f"{', '.join(entries[:8])}){hint}")
    state = obj[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}['{key}'] is not a state dict of tensors")
    flat = [k for k in state if k.rsplit(".", 1)[-1] == FSDP_FLAT_PARAM]
    if flat:
        raise CheckpointError(f"{path}['{key}'] holds FSDP flat parameters ({', '.join(flat[:3])}): a sharded or "
                              "use_orig_params=False training state, not the generator's weights; save a full state "
                              "dict (FSDP FULL_STATE_DICT, or their EMA_FSDP shadow with use_orig_params=True)")
    return {_official_key(k): v for k, v in state.items()}, key


def _official_key(key: str) -> str:
    """`model.blocks.0.self_attn.q.weight` (their wrapper's name) -> `blocks.0.self_attn.q.weight`."""
    for part in WRAPPER_PARTS:
        key = key.replace(part, "")
    return key[len("model."):] if key.startswith("model.") else key


# ------------------------------------------------------------------------------------------ config
def infer_dit_config(state: StateDict, source: str, config_json: dict | None = None) -> DiTConfig:
    """The DiT config of a generator state dict: config.json's when given, else read off the shapes."""
    if config_json is not None:
        return DiTConfig.from_official(config_json)
    try:
        dim, in_dim, *patch = state["patch_embedding.weight"].shape
        ffn_dim = state["blocks.0.ffn.0.weight"].shape[0]
        freq_dim = state["time_embedding.0.weight"].shape[1]
        text_dim = state["text_embedding.0.weight"].shape[1]
        out_dim = state["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2])
    except KeyError as err:
        raise CheckpointError(f"{source} lacks {err.args[0]!r}: not a Wan2.1 DiT") from err
    if dim % WAN_HEAD_DIM:
        raise CheckpointError(f"{source}: dim={dim} is not a multiple of {WAN_HEAD_DIM}, so the head count is "
                              "ambiguous; put the model's config.json (with num_heads) in the folder")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return DiTConfig(
        model_type="i2v" if any(k.startswith("img_emb.") for k in state) else "t2v",
        in_dim=in_dim, dim=dim, ffn_dim=ffn_dim, freq_dim=freq_dim, out_dim=out_dim, num_heads=dim // WAN_HEAD_DIM,
        num_layers=len(layers), inject_sample_info="fps_embedding.weight" in state, patch_size=tuple(patch),
        text_dim=text_dim, cross_attn_norm="blocks.0.norm3.weight" in state,
        qk_norm="blocks.0.self_attn.norm_q.weight" in state,
    )


# ------------------------------------------------------------------------------------------ LoRA
def read_lora(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A peft LoRA file -> {official module name: (A [r, in], B [out, r])}."""
    obj = read_pickled_checkpoint(path)
    state = obj.get(LORA_KEY, obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a LoRA state dict ({LORA_KEY!r} entry or lora_A / lora_B tensors)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(?:model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise CheckpointError(f"{path}: {key!r} is not a LoRA weight (expected <module>.lora_A.weight / lora_B.weight)")
        pairs.setdefault(_official_key(m.group(1)), {})[m.group(2)] = tensor
    unpaired = sorted(name for name, ab in pairs.items() if len(ab) != 2)
    if unpaired:
        raise CheckpointError(f"{path}: modules with only one of lora_A / lora_B: {', '.join(unpaired[:8])}")
    return {name: (ab["A"], ab["B"]) for name, ab in pairs.items()}


def lora_rank(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> int:
    ranks = {a.shape[0] for a, _ in lora.values()}
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: LoRA ranks differ between modules ({sorted(ranks)})")
    return ranks.pop()


def merge_lora(state: StateDict, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
               path: Path, base: Path) -> StateDict:
    """W + scale * B @ A for every adapted module (fp32 product, stored in the base weight's dtype)."""
    merged = dict(state)
    for name, (a, b) in sorted(lora.items()):
        key = f"{name}.weight"
        if key not in state:
            raise CheckpointError(f"LoRA {path} adapts {name!r}, which the base {base} does not have: "
                                  "a LoRA for another base model")
        weight = state[key]
        if a.ndim != 2 or b.ndim != 2 or (b.shape[0], a.shape[1]) != tuple(weight.shape) or b.shape[1] != a.shape[0]:
            raise CheckpointError(f"LoRA {path} does not fit the base {base} at {name!r}: B {tuple(b.shape)} @ "
                                  f"A {tuple(a.shape)} vs weight {tuple(weight.shape)} (a LoRA for another base model)")
        merged[key] = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)
    return merged


# ------------------------------------------------------------------------------------------ model
def load_causal_generator(files, dtype: torch.dtype = torch.float32, precision: Optional[str] = None):
    """The WanDiT of a causal-family folder (files: runtime.causal_family.CausalFiles), LoRA merged.

    precision ("fp16"/"bf16"): load straight into what an export of that precision traces (the
    weights cast_dit would give, fp32 islands included) without the fp32 model in between, tensor by
    tensor: the real 1.3B's fp32 model (5.7 GB) plus its cast copy never exist. `dtype` is then unused."""
    from .dit import WanDiT

    obj = read_pickled_checkpoint(files.checkpoint)
    state, entry = generator_state(obj, files.checkpoint, files.use_ema)
    del obj
    config = infer_dit_config(state, str(files.checkpoint), files.config_json)
    if files.lora is not None:
        lora = read_lora(files.lora)
        state = merge_lora(state, lora, files.lora_scale(lora_rank(lora, files.lora)), files.lora, files.checkpoint)
    with torch.device("meta"):
        model = WanDiT(config)
    source = f"{files.preset} generator weights in {files.checkpoint} ['{entry}']"
    if precision is not None:
        return load_cast_assign(model, state, precision, source)
    model = model.to_empty(device="cpu").to(dtype)
    return load_strict(model, cast_floats(state, dtype), source)


def load_cast_assign(meta_model, state: StateDict, precision: str, source: str):
    """Load `state` into `meta_model` (built on the meta device) in the dtypes an export of
    `precision` traces (export/onnx_export.py cast_dit on the meta model decides them, and the values
are the ones cast_dit gives: every float rounded to the half dtype), one tensor
    at a time: each checkpoint tensor is cast (a real copy: nothing shares the checkpoint's storage,
    so the checkpoint can be dropped) and assigned; `state` is emptied as it goes.

    Peak: the model in its export dtypes + the checkpoint (mmap-backed for a .pt read with mmap),
    instead of the checkpoint + an fp32 copy + the fp32 model + its cast."""
    from .dit import HALF_DTYPES as _TORCH_DTYPES, cast_dit

    half = _TORCH_DTYPES[precision]
    cast_dit(meta_model, precision, in_place=True)  # on meta: only the per-tensor dtypes change
    expected = meta_model.state_dict()
    check_keys_and_shapes(expected, state, source)
    loaded: StateDict = {}
    for key in list(state):
        tensor = state.pop(key)  # [shape of `key`]; released here as soon as its copy is made
        if tensor.is_floating_point():
            # through `half` first, the fp32 islands too: cast_dit casts the whole model and then
            # widens the islands back, so their values are half-rounded; the same weights here
            loaded[key] = tensor.to(half).to(expected[key].dtype, copy=True).contiguous()
        else:
            loaded[key] = tensor.clone()
        del tensor
    meta_model.load_state_dict(loaded, strict=True, assign=True)
    del loaded
    left = [name for name, t in [*meta_model.named_parameters(), *meta_model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: {len(left)} tensor(s) not in the checkpoint stayed unmaterialised "
                              f"(first: {left[0]}); load without precision= (the fp32 path)")
    return meta_model


def checkpoint_config(files) -> DiTConfig:
    """The DiT config of a causal-family checkpoint (config.json's, else from its shapes)."""
    if files.config_json is not None:
        return DiTConfig.from_official(files.config_json)
    state, _ = generator_state(read_pickled_checkpoint(files.checkpoint), files.checkpoint, files.use_ema)
    return infer_dit_config(state, str(files.checkpoint))
