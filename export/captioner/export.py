"""ONNX export of SkyCaptioner-V1 (Qwen2.5-VL): vision tower, language decoder, host-side tables.

    python -m skyrt.export.captioner.export --model SkyCaptioner-V1/ --out captioner-onnx/ [--precision fp16]

What the folder holds (the runtime, skyrt.runtime.captioner, reads it without torch):

| file             | what                                                                                 |
|------------------|--------------------------------------------------------------------------------------|
| vision.onnx      | VisionGraph (export/captioner/graphs.py): patches + rotary + segment indices ->       |
|                  | merged features [N/4, hidden]                                                         |
| decoder.onnx     | DecoderGraph: embeds + mrope position ids + per-layer past K/V -> last logits +       |
|                  | present K/V                                                                           |
| embed_tokens.npy | the token embedding table [vocab, hidden] (the host looks tokens up, splices vision   |
|                  | features in, and feeds embeddings: one decoder graph serves prefill and decode)       |
| tokenizer.json   | the checkpoint's tokenizer (the `tokenizers` library reads it)                        |
| manifest.json    | graphs with TensorRT profiles, precision, export config, and the host settings         |
|                  | ("captioner": preprocessing, token ids, rotary, prompt templates)                     |

Engines: manifest["graphs"] lists `vision`, `decoder_prefill` and `decoder_decode`; the last two
name the same decoder.onnx with two optimization profiles (prefill: P = 0 past tokens, S up to
max_prompt_tokens; decode: S = 1, P up to max_total_tokens - 1), so export/engine.py builds one
engine per phase from one file without changes. The vision graph's shapes follow the video size
fixed at export (num_frames frames at frame_size, smart-resized within the checkpoint's
min/max_pixels): its profile pins every axis to that size. ONNX Runtime takes any size.

Real-model numbers (SkyCaptioner-V1, 16 frames read at 420x360 as the official script does, the
checkpoint's max_pixels 12845056): smart size 420x364, grid 8x30x26 = 6240 patches, 1560 vision
tokens; windows of 8x8 patches. vision.onnx holds ~0.68 B parameters, decoder.onnx ~7.1 B (6.5 B
in the 28 layers, 0.55 B lm_head; the 0.55 B embedding table goes to embed_tokens.npy), so both take external
data (onnx.checker runs on the path). An fp16 export loads the checkpoint in fp16 (~16 GB) and the
trace holds a second copy while the graph is written: plan ~32 GB of RAM (fp32: ~64 GB).
Not measured here (no real weights offline): whether Qwen2.5-VL's vision MLP stays within fp16's
range on real frames; transformers recommends bf16 for it. Check fp16 engines against the fp32
ONNX on the user's GPU before trusting them.
"""
from __future__ import annotations


import argparse
import copy
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from skyrt.runtime import captioner as rt
from skyrt.runtime.caption_schema import MAX_NEW_TOKENS, caption_instruction

from .graphs import DecoderGraph, VisionGraph
from .loader import CaptionerCheckpoint, load_captioner, preprocess_settings
from skyrt.runtime.engine_manifest import file_sha256 as sha256_file  # one owner of file hashing
from ..onnx_export import value_info as _value_info  # one reader of ONNX input/output specs

FORMAT_VERSION = 1
DEFAULT_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
PRECISIONS = ("fp32", "fp16")
VISION_INPUTS = ("pixel_values", "rope_cos", "rope_sin", "window_gather", "window_valid", "window_scatter",
                 "frame_gather", "frame_valid", "frame_scatter")
# Room for a different instruction than SkyCaptioner's beyond the exported prompt's length.
PROMPT_SLACK_TOKENS = 256
_SENTINEL = "\x00SKYRT_USER_TEXT\x00"


def _norm_modules_fp32(model: torch.nn.Module) -> None:
    """fp16 exports keep RMS-norm gains in fp32 (the graphs normalise in fp32 anyway)."""
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.float()


def prompt_templates(checkpoint: CaptionerCheckpoint) -> dict[str, list[str]]:
    """The chat template rendered around a sentinel user text, per media kind: (before, after).

    The runtime then needs neither jinja nor transformers to build the exact prompt the
    checkpoint's template makes (default system turn included)."""
    out = {}
    for kind in ("video", "image"):
        conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": _SENTINEL}]}]
        text = checkpoint.tokenizer.apply_chat_template(conversation, chat_template=checkpoint.folder.chat_template,
                                                        tokenize=False, add_generation_prompt=True)
        before, sep, after = text.partition(_SENTINEL)
        if not sep:
            raise ValueError("the chat template dropped the user text; cannot build prompt templates")
        out[kind] = [before, after]
    return out


def eos_token_ids(checkpoint: CaptionerCheckpoint) -> list[int]:
    """generation_config's eos ids plus <|im_end|> and <|endoftext|> (Qwen2.5-VL-Instruct stops on both)."""
    ids = checkpoint.folder.generation_config.get("eos_token_id", [])
    ids = [ids] if isinstance(ids, int) else list(ids)
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = checkpoint.tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid >= 0 and tid != checkpoint.tokenizer.unk_token_id:
            ids.append(tid)
    return sorted(set(int(i) for i in ids))


def captioner_config(checkpoint: CaptionerCheckpoint, rope_text_offset: str = "qwen") -> dict[str, Any]:
    """The manifest's "captioner" entry: rt.CaptionerConfig's fields."""
    model = checkpoint.model
    cfg, vc, tc = model.config, model.config.vision_config, model.config.text_config
    return {
        "preprocess": preprocess_settings(checkpoint.folder.preprocessor),
        "image_token_id": int(cfg.image_token_id),
        "video_token_id": int(cfg.video_token_id),
        "eos_token_ids": eos_token_ids(checkpoint),
        "vision_head_dim": vc.hidden_size // vc.num_heads,
        "vision_inv_freq": [float(v) for v in model.model.visual.rotary_pos_emb.inv_freq.float().tolist()],
        "window_size": int(vc.window_size),
        "tokens_per_second": float(vc.tokens_per_second),
        "hidden_size": int(tc.hidden_size),
        "num_layers": int(tc.num_hidden_layers),
        "num_kv_heads": int(tc.num_key_value_heads),
        "head_dim": tc.hidden_size // tc.num_attention_heads,
        "vocab_size": int(tc.vocab_size),
        "prompt_templates": prompt_templates(checkpoint),
        "rope_text_offset": rope_text_offset,
    }


def export_graph(name: str, module: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str],
                 axes: dict[str, dict[int, str]], out_dir: Path, opset: int, external_data_threshold: int) -> dict:
    """Trace `module` (legacy TorchScript exporter: shapes stay symbolic along `axes`), write
    <out_dir>/<name>.onnx (weights in <name>.onnx.data past the threshold: protobuf stops at 2 GiB),
    name every output axis (static size or its axis name), run onnx.checker on the path (so external
    data is checked too) and return the manifest entry."""
    import onnx

    tmp = out_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings on shape checks that are static by design
            torch.onnx.export(module.eval(), args, str(tmp / "graph.onnx"), dynamo=False, opset_version=opset,
                              input_names=inputs, output_names=outputs, dynamic_axes=axes,
                              do_constant_folding=True)
            results = module(*args)
        model = onnx.load(str(tmp / "graph.onnx"), load_external_data=True)
        results = results if isinstance(results, (tuple, list)) else (results,)
        for value, tensor in zip(model.graph.output, results):
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for axis, size in enumerate(tensor.shape):
                dim = dims.add()
                if axis in axes.get(value.name, {}):
                    dim.dim_param = axes[value.name][axis]
                else:
                    dim.dim_value = int(size)
        target, data = out_dir / f"{name}.onnx", out_dir / f"{name}.onnx.data"
        for stale in (target, data):
            stale.unlink(missing_ok=True)
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        external = weight_bytes > external_data_threshold
        if external:
            onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            onnx.save_model(model, str(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    onnx.checker.check_model(str(target), full_check=False)
    files = [target.name] + ([data.name] if external else [])
    return {"file": target.name, "external_data": data.name if external else None,
            "sha256": {f: sha256_file(out_dir / f) for f in files}, "weight_bytes": weight_bytes,
            "inputs": _value_info(model.graph.input), "outputs": _value_info(model.graph.output),
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in axes.items()}}


def export_captioner_onnx(
    captioner_dir: str | Path | None,
    out_dir: str | Path,
    precision: str = "fp32",
    progress: bool | Callable[[str], None] = True,
    num_frames: int = rt.NUM_FRAMES,
    frame_size: tuple[int, int] = rt.OFFICIAL_FRAME_SIZE,
    max_prompt_tokens: Optional[int] = None,
    max_total_tokens: Optional[int] = None,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    rope_text_offset: str = "qwen",
    checkpoint: Optional[CaptionerCheckpoint] = None,
) -> dict:
    """Export a SkyCaptioner-V1 / Qwen2.5-VL folder to `out_dir`; returns manifest.json as a dict.

    frame_size (height, width): the size frames are read at (the official 420x360); the vision
    engine's profile is the smart-resized grid of num_frames such frames. max_prompt_tokens
    (default: the SkyCaptioner prompt's length + 256) and max_total_tokens (default: that + 2048
    new tokens) bound the decoder profiles. `checkpoint` skips loading (tests pass the model they
    hold; it must be fp32). progress: True for a bar on stderr, or a callable taking messages.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    say = progress if callable(progress) else ((lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None))
    started = time.perf_counter()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    if checkpoint is None:
        if captioner_dir is None:
            raise ValueError("give captioner_dir or checkpoint")
        say(f"loading {captioner_dir} ({precision})")
        checkpoint = load_captioner(captioner_dir, dtype=dtype)
    model = checkpoint.model
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    if precision == "fp16":
        _norm_modules_fp32(model)
    host = captioner_config(checkpoint, rope_text_offset)
    config = rt.CaptionerConfig.from_manifest({"captioner": host})
    pre = config.preprocess
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # -- the export video: its grid fixes the vision profile and the prompt length ------------------
    height, width = rt.smart_resize(frame_size[0], frame_size[1], pre.factor, pre.min_pixels, pre.max_pixels)
    frames = num_frames + (-num_frames % pre.temporal_patch_size)
    grid = (frames // pre.temporal_patch_size, height // pre.patch_size, width // pre.patch_size)
    patches = grid[0] * grid[1] * grid[2]
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(patches, 3 * pre.temporal_patch_size * pre.patch_size ** 2, generator=gen)
    feeds = rt.vision_inputs(pixels.numpy(), [grid], config)
    item = rt.VisionItem("video", grid, pre.temporal_patch_size / rt.OFFICIAL_FPS)
    before, after = host["prompt_templates"]["video"]
    ids = checkpoint.tokenizer(before + caption_instruction() + after, add_special_tokens=False)["input_ids"]
    prompt_len = len(rt.expand_vision_tokens(ids, [item], config))
    max_prompt = max_prompt_tokens or prompt_len + PROMPT_SLACK_TOKENS
    max_total = max_total_tokens or max_prompt + MAX_NEW_TOKENS
    if max_total <= max_prompt:
        raise ValueError(f"max_total_tokens={max_total} must exceed max_prompt_tokens={max_prompt}")

    # -- vision graph -------------------------------------------------------------------------------
    vision_args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in VISION_INPUTS)
    vision_args = (vision_args[0].to(dtype),) + vision_args[1:]
    vision_axes = {"pixel_values": {0: "patches"}, "rope_cos": {0: "patches"}, "rope_sin": {0: "patches"},
                   "window_gather": {0: "windows", 1: "window_len"}, "window_valid": {0: "windows", 1: "window_len"},
                   "window_scatter": {0: "patches"}, "frame_gather": {0: "frame_segments", 1: "frame_len"},
                   "frame_valid": {0: "frame_segments", 1: "frame_len"}, "frame_scatter": {0: "patches"},
                   "features": {0: "vision_tokens"}}
    vision_profile = {name: [list(t.shape)] * 3 for name, t in zip(VISION_INPUTS, vision_args)}
    say(f"export vision.onnx: {num_frames} frames {height}x{width}, grid {grid}, {patches // 4} vision tokens")
    t0 = time.perf_counter()
    vision_entry = export_graph("vision", VisionGraph(model.model.visual), vision_args, list(VISION_INPUTS),
                                ["features"], vision_axes, out, opset, external_data_threshold)
    vision_entry.update(profile=vision_profile, precision=precision, grid_thw=list(grid),
                        frame_size=list(frame_size), resized=[height, width], num_frames=num_frames,
                        export_seconds=round(time.perf_counter() - t0, 3))

    # -- decoder graph ------------------------------------------------------------------------------
    tc = model.config.text_config
    layers, kv, hd, hidden = tc.num_hidden_layers, tc.num_key_value_heads, host["head_dim"], tc.hidden_size
    past_len, new_len = 3, 5  # traced with both > 1 so no size is folded into a constant
    past = []
    for _ in range(2 * layers):
        past.append(torch.randn(1, kv, past_len, hd, generator=gen).to(dtype))
    embeds = torch.randn(1, new_len, hidden, generator=gen).to(dtype)
    positions = torch.arange(past_len, past_len + new_len).view(1, 1, -1).expand(3, 1, -1).contiguous()
    past_names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    axes = {"inputs_embeds": {1: "new_tokens"}, "position_ids": {2: "new_tokens"}}
    axes.update({n: {2: "past_tokens"} for n in past_names})
    axes.update({n: {2: "total_tokens"} for n in present_names})
    say(f"export decoder.onnx: {layers} layers, hidden {hidden}, kv heads {kv}, vocab {tc.vocab_size}")
    t0 = time.perf_counter()
    decoder_entry = export_graph("decoder", DecoderGraph(model.model.language_model, model.lm_head),
                                 (embeds, positions, *past), ["inputs_embeds", "position_ids", *past_names],
                                 ["logits", *present_names], axes, out, opset, external_data_threshold)
    decoder_seconds = round(time.perf_counter() - t0, 3)
    opt_prompt = min(prompt_len, max_prompt)
    prefill = {"inputs_embeds": [[1, 1, hidden], [1, opt_prompt, hidden], [1, max_prompt, hidden]],
               "position_ids": [[3, 1, 1], [3, 1, opt_prompt], [3, 1, max_prompt]]}
    prefill.update({n: [[1, kv, 0, hd]] * 3 for n in past_names})
    opt_past = min(prompt_len + 256, max_total - 1)
    decode = {"inputs_embeds": [[1, 1, hidden]] * 3, "position_ids": [[3, 1, 1]] * 3}
    decode.update({n: [[1, kv, 1, hd], [1, kv, opt_past, hd], [1, kv, max_total - 1, hd]] for n in past_names})
    graphs = {
        "vision": vision_entry,
        "decoder_prefill": {**decoder_entry, "profile": prefill, "precision": precision, "phase": "prefill",
                            "export_seconds": decoder_seconds},
        "decoder_decode": {**decoder_entry, "profile": decode, "precision": precision, "phase": "decode"},
    }

    # -- host-side files ----------------------------------------------------------------------------
    table = model.model.language_model.embed_tokens.weight.detach()
    np.save(out / "embed_tokens.npy", table.to(dtype).numpy())
    shutil.copyfile(checkpoint.folder.path / "tokenizer.json", out / "tokenizer.json")
    manifest = {
        "format": rt.MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "precision": precision,
        "export_config": {"num_frames": num_frames, "frame_size": list(frame_size), "resized": [height, width],
                          "grid_thw": list(grid), "vision_tokens": patches // pre.merge_size ** 2,
                          "prompt_tokens": prompt_len, "max_prompt_tokens": max_prompt,
                          "max_total_tokens": max_total, "opset": opset, "precision": precision,
                          "model_type": "qwen2_5_vl"},
        "graphs": graphs,
        "embeddings": {"file": "embed_tokens.npy", "shape": list(table.shape), "dtype": str(np.dtype(
            np.float16 if precision == "fp16" else np.float32)), "sha256": sha256_file(out / "embed_tokens.npy")},
        "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(out / "tokenizer.json")},
        "captioner": host,
        "export_seconds": round(time.perf_counter() - started, 3),
    }
    tmp = out / f".manifest.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")  # a manifest is only ever complete
    say(f"wrote {out / 'manifest.json'} in {manifest['export_seconds']:.1f} s")
    return manifest


def _versions() -> dict:
    import onnx
    import transformers

    import skyrt

    return {"skyrt": skyrt.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m skyrt.export.captioner.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="SkyCaptioner-V1 / Qwen2.5-VL checkpoint folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--num-frames", type=int, default=rt.NUM_FRAMES)
    p.add_argument("--frame-height", type=int, default=rt.OFFICIAL_FRAME_SIZE[0])
    p.add_argument("--frame-width", type=int, default=rt.OFFICIAL_FRAME_SIZE[1])
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = p.parse_args(argv)
    try:
        export_captioner_onnx(args.model, args.out, args.precision, True, args.num_frames,
                              (args.frame_height, args.frame_width), args.max_prompt_tokens, args.max_total_tokens,
                              args.opset)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
