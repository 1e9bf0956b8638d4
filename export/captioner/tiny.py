"""Tiny random Qwen2.5-VL checkpoints in SkyCaptioner-V1's folder layout, written offline.

No real weights can be downloaded here, so tests and benchmarks build the architecture at a small
size with random weights and save it the way the real checkpoint is laid out: config.json,
safetensors shards + model.safetensors.index.json, tokenizer.json + tokenizer_config.json (a
byte-level BPE trained here, with Qwen2.5-VL's special tokens), chat_template.json and
preprocessor_config.json. The captions such a model writes are noise, not JSON.

    python -m skyrt.export.captioner.tiny OUT_DIR [--size tiny|small]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

# Qwen2.5-VL's special tokens, in the order of their ids in the real vocabulary (151643...).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)

# A chat template written for skyrt that renders Qwen2.5-VL's chat format: a default system turn
# when none is given, <|vision_start|><|image_pad|/|video_pad|><|vision_end|> per media item, and the
# assistant header for generation. Newlines are Jinja string escapes: transformers renders with
# trim_blocks, which would eat literal newlines after tags.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinyCaptionerConfig:
    """Sizes of a random Qwen2.5-VL. `window_size` is in pixels, like the real config (112 there:
    4x4 merged tokens per window); 56 here gives 2x2 windows, so small inputs still split."""

    vocab_size: int = 0  # 0 = the tokenizer's size
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2
    vision_depth: int = 4
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 48
    vision_heads: int = 2
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    window_size: int = 56
    tokens_per_second: int = 2
    tokenizer_vocab: int = 400
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 168
    weight_std: float = 0.3


TINY = TinyCaptionerConfig()
# Big enough that the matmuls, not the per-call overhead, dominate (benchmarks/caption.py).
SMALL = TinyCaptionerConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12),
                            vision_depth=4, vision_hidden_size=256, vision_intermediate_size=512, vision_heads=4,
                            fullatt_block_indexes=(1, 3), window_size=112, max_pixels=224 * 280, weight_std=0.05)
SIZES = {"tiny": TINY, "small": SMALL}


def _corpus() -> list[str]:
    """Text the BPE is trained on: the caption instruction, caption-like JSON and plain English."""
    from skyrt.runtime.caption_schema import SHOT_ANGLES, SHOT_POSITIONS, SHOT_TYPES, caption_instruction

    words = ("the a man woman dog car street camera moves slowly left right forward bright light shadow "
             "wearing red blue green jacket standing walking running sitting background foreground trees sky "
             "building water snow mountain smiling neutral expression center frame daylight indoor outdoor").split()
    lines = [caption_instruction(), "You are a helpful assistant."]
    for i in range(200):
        sentence = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6 + i % 5))
        caption = {"subjects": [{"appearance": sentence, "action": sentence[::-1][:20], "expression": "",
                                 "position": "center", "TYPES": {"type": "Human", "sub_type": "Man"},
                                 "is_main_subject": i % 2 == 0}],
                   "shot_type": SHOT_TYPES[i % len(SHOT_TYPES)], "shot_angle": SHOT_ANGLES[i % len(SHOT_ANGLES)],
                   "shot_position": SHOT_POSITIONS[i % len(SHOT_POSITIONS)], "camera_motion": sentence,
                   "environment": sentence, "lighting": "bright daylight"}
        lines += [sentence, json.dumps(caption)]
    return lines


def make_qwen_tokenizer(out_dir: Path, vocab_size: int = 400) -> int:
    """Train a byte-level BPE and save it with Qwen2.5-VL's special tokens; returns len(tokenizer).

    Writes tokenizer.json and tokenizer_config.json (eos <|im_end|>, pad <|endoftext|>, no BOS, no
    post-processor: Qwen adds no tokens around a text). The specials come right after the learned
    vocabulary, as in the real tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=32768)
    fast.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 4.x and 5.x both resolve it
    cfg.pop("chat_template", None)  # the template lives in chat_template.json, as in the real folder
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    return tok.get_vocab_size()


def qwen25vl_config(sizes: TinyCaptionerConfig, token_ids: dict[str, int], vocab_size: int):
    """A transformers Qwen2_5_VLConfig of `sizes` whose special-token ids follow the tokenizer."""
    from transformers import Qwen2_5_VLConfig

    head_dim = sizes.hidden_size // sizes.num_attention_heads
    if 2 * sum(sizes.mrope_section) != head_dim:
        raise ValueError(f"mrope_section {sizes.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    text = dict(vocab_size=vocab_size, hidden_size=sizes.hidden_size, intermediate_size=sizes.intermediate_size,
                num_hidden_layers=sizes.num_hidden_layers, num_attention_heads=sizes.num_attention_heads,
                num_key_value_heads=sizes.num_key_value_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": list(sizes.mrope_section)},
                bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"],
                pad_token_id=token_ids["<|endoftext|>"])
    vision = dict(depth=sizes.vision_depth, hidden_size=sizes.vision_hidden_size,
                  intermediate_size=sizes.vision_intermediate_size, num_heads=sizes.vision_heads,
                  out_hidden_size=sizes.hidden_size, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                  window_size=sizes.window_size, fullatt_block_indexes=list(sizes.fullatt_block_indexes),
                  tokens_per_second=sizes.tokens_per_second, in_channels=3)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=token_ids["<|image_pad|>"],
                            video_token_id=token_ids["<|video_pad|>"],
                            vision_start_token_id=token_ids["<|vision_start|>"],
                            vision_end_token_id=token_ids["<|vision_end|>"], tie_word_embeddings=False)


def randomize_qwen_(model, seed: int, std: float) -> None:
    """Random weights: N(0, std) for matrices and biases, 1 + N(0, 0.1) for norm gains. The default
    init (0.02) makes a tiny model repeat one token forever, which would make token-equality tests
    weak; std 0.3 at hidden 64 gives varied tokens whose top-2 logit gaps (~1e-2) dwarf fp32 rounding."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            is_gain = param.ndim == 1 and ("norm" in name or "ln_q" in name)
            param.copy_(1.0 + 0.1 * noise if is_gain else std * noise)


def write_tiny_captioner(out_dir: str | Path, sizes: TinyCaptionerConfig = TINY, seed: int = 0,
                         max_shard_size: str | None = "100KB") -> Path:
    """Write a random SkyCaptioner-layout folder (fp32 weights, sharded so the index path is used)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_size = make_qwen_tokenizer(out, sizes.tokenizer_vocab)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = max(sizes.vocab_size, tok_size)
    config = qwen25vl_config(sizes, token_ids, vocab_size)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    randomize_qwen_(model, seed, sizes.weight_std)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kwargs)
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "min_pixels": sizes.min_pixels, "max_pixels": sizes.max_pixels, "patch_size": 14,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "resample": 3,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(write_tiny_captioner(args.out, SIZES[args.size], args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
