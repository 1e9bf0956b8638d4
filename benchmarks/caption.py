"""Captioner latency on the CPU: skyrt's ONNX Runtime pipeline vs transformers, same random Qwen2.5-VL.

A "small" random Qwen2.5-VL (decoder hidden 512 x 4 layers, vocab 8192; vision hidden 256 x 4
blocks) captions 16 frames read at the official 420x360 (smart-resized to 252x224 within the small
config's max_pixels: 576 vision tokens, ~1000 prompt tokens). Both sides run greedy decoding with a
K/V cache on the same token ids and pixels, after one warm-up run:
- skyrt: vision.onnx, decoder.onnx prefill, then decoder.onnx one token at a time (onnxruntime);
- transformers: Qwen2_5_VLForConditionalGeneration (sdpa attention), the vision tower, a prefill
  forward, then one forward per token with its DynamicCache.
Reported: vision seconds, prefill seconds (decoder over the prompt, vision excluded), mean decode
seconds per token, the transformers/skyrt ratios, and whether the greedy tokens are equal.

    python benchmarks/caption.py                       # small config, 32 new tokens, 2 threads
    python benchmarks/caption.py --size tiny --new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "caption.json")
    return p.parse_args()


def transformers_greedy(model, ids: np.ndarray, pixels: np.ndarray, grid, second_per_grid: float, video_token: int,
                        new_tokens: int) -> tuple[list[int], dict]:
    """Greedy decoding with transformers' own forward and cache; returns tokens and timings."""
    ids_t = torch.from_numpy(ids)[None]
    mm = (ids_t == video_token).to(torch.int32) * 2
    pix = torch.from_numpy(pixels)
    grid_t = torch.tensor([grid])
    model.model.rope_deltas = None
    with torch.inference_mode():
        start = time.perf_counter()
        feats = model.model.get_video_features(pix, grid_t).pooler_output
        vision_s = time.perf_counter() - start
        start = time.perf_counter()
        out = model(input_ids=ids_t, mm_token_type_ids=mm, mm_encoder_outputs=None, pixel_values_videos=pix,
                    video_grid_thw=grid_t, second_per_grid_ts=torch.tensor([second_per_grid]), use_cache=True,
                    logits_to_keep=1)
        prefill_total = time.perf_counter() - start
        tokens = [int(out.logits[0, -1].argmax())]
        cache = out.past_key_values
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
        decode_s = time.perf_counter() - start
    del feats
    # The prefill forward runs the vision tower again inside; take it out to compare decoders.
    return tokens, {"vision_s": vision_s, "prefill_s": prefill_total - vision_s,
                    "decode_s_per_token": decode_s / max(1, new_tokens - 1)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Qwen2_5_VLForConditionalGeneration

    from skyrt.export.captioner.export import export_captioner_onnx
    from skyrt.export.captioner.loader import load_captioner
    from skyrt.export.captioner.tiny import SIZES, write_tiny_captioner
    from skyrt.runtime import captioner as rc

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_captioner(Path(tmp) / "model", SIZES[args.size], max_shard_size=None)
        checkpoint = load_captioner(folder)
        export_captioner_onnx(None, Path(tmp) / "onnx", "fp32", progress=False, checkpoint=checkpoint)
        # transformers' rope convention, so that the token comparison is meaningful (see mrope_positions).
        cap = rc.Captioner(Path(tmp) / "onnx", threads=args.threads, rope_text_offset="transformers5")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32,
                                                                   attn_implementation="sdpa").eval()
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 256, (rc.NUM_FRAMES, *rc.OFFICIAL_FRAME_SIZE, 3), dtype=np.uint8)
        pixels, grid = rc.preprocess_video(frames, cap.config.preprocess)
        item = rc.VisionItem("video", grid, cap.config.preprocess.temporal_patch_size / rc.OFFICIAL_FPS)

        cap.generate(pixels, item, max_new_tokens=2)  # warm-up (session arenas, first-call costs)
        result = cap.generate(pixels, item, max_new_tokens=args.new_tokens)
        ids = cap.prepare(pixels, item, rc.caption_instruction())["input_ids"]
        transformers_greedy(model, ids, pixels, grid, item.second_per_grid, cap.config.video_token_id, 2)
        ref_tokens, ref = transformers_greedy(model, ids, pixels, grid, item.second_per_grid,
                                              cap.config.video_token_id, args.new_tokens)

    t = result.timings
    ours = {"vision_s": t["vision_s"], "prefill_s": t["prefill_s"],
            "decode_s_per_token": t["decode_s"] / max(1, t["decode_steps"])}
    report = {
        "benchmark": "caption",
        "machine": {"platform": platform.platform(), "threads": args.threads, "device": "cpu",
                    "note": "shared 2-core machine, one measured run after one warm-up: expect noise"},
        "config": {"size": args.size, "new_tokens": args.new_tokens, "grid_thw": list(grid),
                   "vision_tokens": int(np.prod(grid)) // 4, "prompt_tokens": int(len(ids)),
                   "decoder": {k: getattr(checkpoint.model.config.text_config, k) for k in
                               ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                "intermediate_size", "vocab_size")},
                   "vision": {k: getattr(checkpoint.model.config.vision_config, k) for k in
                              ("hidden_size", "depth", "num_heads", "intermediate_size")}},
        "skyrt_onnxruntime": ours,
        "transformers": ref,
        "ratio_transformers_over_skyrt": {k: ref[k] / ours[k] for k in ours},
        "tokens_equal": ref_tokens == result.tokens,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
