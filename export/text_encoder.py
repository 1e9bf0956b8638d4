"""umT5 text encoder for SkyReels-V2 / Wan2.1: prompt -> context [B, text_len, 4096].

What this file holds
- The official checkpoint layout (`models_t5_umt5-xxl-enc-bf16.pth`, Wan's own T5Encoder with a
  relative position embedding in every block) mapped onto transformers' `UMT5EncoderModel`
  (the key map below), plus a config inferred from the state-dict shapes (the official folder
  carries no config for the T5).
- The official prompt cleaning and encode semantics: tokenize with padding/truncation to
  `text_len` (512) and the EOS token, run the encoder with the attention mask, zero every position
  past a prompt's true length (official: `context * mask`; diffusers: trim to the length and pad
  with zeros; both give the same tensor).
- Loaders for both layouts and a tiny real tokenizer built offline for tests and demo models.

Nothing here downloads anything: tokenizers and models come from local folders only.

Run the tests: `python -m pytest tests/test_text_encoder.py -q`.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from skyrt.runtime.prompt import clean_prompt  # torch-free: the serving tokenizer cleans the same way

from .checkpoint import CheckpointError, StateDict, check_keys_and_shapes, read_pth

__all__ = [
    "UMT5_SIZES",
    "TextEncoder",
    "clean_prompt",
    "convert_official_umt5_state_dict",
    "infer_umt5_config",
    "load_text_encoder_diffusers",
    "load_text_encoder_official",
    "load_tokenizer",
    "make_tiny_tokenizer",
    "official_umt5_expected_shapes",
    "official_umt5_key_to_transformers",
    "umt5_config_for_official",
]

DEFAULT_TEXT_LEN = 512

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

# Official `umt5_xxl` (modules/t5.py): vocab_size 256384, dim 4096, dim_attn 4096, dim_ffn 10240,
# num_heads 64, encoder_layers 24, num_buckets 32, shared_pos False (a relative bias per block),
# T5RelativeEmbedding max_dist 128, tanh-GELU gate (= transformers "gated-gelu" / gelu_new),
# T5LayerNorm eps 1e-6. d_kv = dim_attn / num_heads = 64.
UMT5_SIZES: dict[str, dict] = {
    "xxl": dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128),
    # Tiny variant for tests and demo checkpoints (vocab fits make_tiny_tokenizer's default).
    "tiny": dict(vocab_size=256, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128),
}


def _umt5_config(**fields):
    from transformers import UMT5Config

    base = dict(feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0, pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False, use_cache=False)
    fields = {**base, **fields}
    fields.setdefault("num_decoder_layers", fields["num_layers"])
    return UMT5Config(**fields)


def umt5_config_for_official(size: str = "xxl", **overrides):
    """transformers `UMT5Config` for the official umT5 encoder (`size="xxl"`) or a tiny test one."""
    if size not in UMT5_SIZES:
        raise ValueError(f"unknown umT5 size {size!r}; known: {sorted(UMT5_SIZES)}")
    return _umt5_config(**{**UMT5_SIZES[size], **overrides})


def infer_umt5_config(sd: Mapping[str, torch.Tensor], relative_attention_max_distance: int = 128):
    """Infer the `UMT5Config` of an official-layout encoder state dict from its tensor shapes.

    vocab/d_model from token_embedding, d_ff from block 0's fc1, heads and buckets from block 0's
    relative bias [num_buckets, num_heads], d_kv from q [heads*d_kv, d_model], layers from the
    highest block index. The maximum distance (128 in umT5) is not stored in the weights.
    """
    needed = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
              "blocks.0.pos_embedding.embedding.weight"]
    absent = [k for k in needed if k not in sd]
    if absent:
        raise CheckpointError(
            f"cannot infer the umT5 config: the state dict lacks {', '.join(absent)} "
            "(is this the official models_t5_umt5-xxl-enc-*.pth encoder checkpoint?)")
    vocab_size, d_model = sd["token_embedding.weight"].shape
    num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
    if dim_attn % num_heads:
        raise CheckpointError(f"blocks.0.attn.q.weight has {dim_attn} outputs, not a multiple of "
                              f"{num_heads} heads (from the relative bias shape)")
    d_ff = sd["blocks.0.ffn.fc1.weight"].shape[0]
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return _umt5_config(vocab_size=int(vocab_size), d_model=int(d_model), d_kv=int(dim_attn // num_heads),
                        d_ff=int(d_ff), num_layers=max(layers) + 1, num_heads=int(num_heads),
                        relative_attention_num_buckets=int(num_buckets),
                        relative_attention_max_distance=relative_attention_max_distance)


# --------------------------------------------------------------------------------------------
# Official checkpoint key map (Wan's umT5 names -> transformers' UMT5EncoderModel names)
# --------------------------------------------------------------------------------------------

_TOP_LEVEL = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
_PER_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # gelu(gate(x)) ...
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",     # ... * fc1(x)
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
# transformers keeps the input embedding twice: `shared` and the stack's tied `embed_tokens`.
_TIED_EMBEDDING = "encoder.embed_tokens.weight"


def official_umt5_key_to_transformers(k: str) -> str:
    """Name of an official umT5-encoder key in transformers' `UMT5EncoderModel`; unknown -> error."""
    if k in _TOP_LEVEL:
        return _TOP_LEVEL[k]
    m = _BLOCK_KEY.fullmatch(k)
    if m and m.group(2) in _PER_BLOCK:
        return f"encoder.block.{m.group(1)}.{_PER_BLOCK[m.group(2)]}"
    raise CheckpointError(f"unmapped umT5 checkpoint key {k!r} (not part of the official umT5 encoder layout)")


def convert_official_umt5_state_dict(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Official encoder state dict -> `UMT5EncoderModel` state dict (tied embedding included).

    Every unmapped key is listed in one error.
    """
    unmapped = []
    out: StateDict = {}
    for key, value in sd.items():
        try:
            out[official_umt5_key_to_transformers(key)] = value
        except CheckpointError:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"unexpected keys in the umT5 checkpoint ({len(unmapped)}): "
                              + ", ".join(sorted(unmapped)))
    if "shared.weight" in out:
        out[_TIED_EMBEDDING] = out["shared.weight"]
    return out


def official_umt5_expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every key of an official umT5 encoder checkpoint for `config`, with its shape."""
    d, f, a = config.d_model, config.d_ff, config.num_heads * config.d_kv
    shapes = {"token_embedding.weight": (config.vocab_size, d), "norm.weight": (d,)}
    per_block = {"norm1.weight": (d,), "attn.q.weight": (a, d), "attn.k.weight": (a, d),
                 "attn.v.weight": (a, d), "attn.o.weight": (d, a),
                 "pos_embedding.embedding.weight": (config.relative_attention_num_buckets, config.num_heads),
                 "norm2.weight": (d,), "ffn.gate.0.weight": (f, d), "ffn.fc1.weight": (f, d),
                 "ffn.fc2.weight": (d, f)}
    for i in range(config.num_layers):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in per_block.items()})
    return shapes


# --------------------------------------------------------------------------------------------
# Prompt cleaning and tokenizer
# --------------------------------------------------------------------------------------------

def load_tokenizer(folder: str | Path):
    """A tokenizer from a local folder (e.g. the official `google/umt5-xxl` subfolder); never downloads."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist (tokenizers are never downloaded)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


_WORDS = {
    "subject": ["a cat", "the dog", "a young woman", "an old man", "two birds", "a red car", "a horse",
                "the astronaut", "a small boat", "a child", "a robot", "the dancer", "a fox", "a train",
                "a golden retriever", "the chef", "a jellyfish", "a knight", "the skateboarder", "a whale"],
    "action": ["walks along", "runs across", "sits quietly on", "flies over", "looks at", "drives through",
               "jumps over", "swims beneath", "floats above", "dances in", "rests beside", "climbs",
               "glides past", "explores", "wanders through", "races toward", "circles around"],
    "place": ["the beach", "a busy street", "the snowy mountains", "a quiet forest", "the city at night",
              "a green field", "an ancient temple", "the desert dunes", "a neon-lit alley", "a frozen lake",
              "the coral reef", "a rainy harbor", "a sunflower meadow", "the volcanic island", "a library"],
    "style": ["cinematic lighting", "soft morning light", "golden hour", "slow motion", "aerial shot",
              "close-up", "wide angle", "handheld camera", "shallow depth of field", "vivid colors",
              "film grain", "dramatic clouds", "4K, highly detailed", "pastel tones", "moody atmosphere"],
}


def _tiny_corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    w = _WORDS
    out = []
    for i in range(n):
        s = f"{rng.choice(w['subject'])} {rng.choice(w['action'])} {rng.choice(w['place'])}"
        if i % 2:
            s += f", {rng.choice(w['style'])}"
        if i % 3 == 0:
            s += f", {rng.choice(w['style'])}"
        out.append(s[0].upper() + s[1:] + ".")
    return out


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 256, num_sentences: int = 400, seed: int = 0) -> Path:
    """Train a small T5-like Unigram tokenizer offline and save it as a transformers fast tokenizer.

    Specials like T5's: <pad> id 0, </s> id 1 (appended to every sequence), <unk> id 2; Metaspace
    pre-tokenization; NFKC normalisation. Trained on generated English prompts, so `vocab_size` is
    an upper bound (the Unigram trainer stops when the corpus has no more useful pieces).
    `AutoTokenizer.from_pretrained(out_dir)` (or `load_tokenizer`) loads the folder.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False,
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation))
    tok.train_from_iterator(_tiny_corpus(num_sentences, seed), trainer=trainer)
    ids = [tok.token_to_id(s) for s in specials]
    if ids != [0, 1, 2]:
        raise RuntimeError(f"tiny tokenizer specials got ids {ids}, expected [0, 1, 2]")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=DEFAULT_TEXT_LEN, padding_side="right")
    out_dir = Path(out_dir)
    fast.save_pretrained(str(out_dir))
    # transformers 5 writes "TokenizersBackend", a class 4.x does not know; both resolve this name.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------

class TextEncoder:
    """transformers `UMT5EncoderModel` + tokenizer + text_len with the official encode semantics."""

    def __init__(self, model, tokenizer, text_len: int = DEFAULT_TEXT_LEN, clean: bool = True):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = int(text_len)
        self.clean = clean

    @property
    def d_model(self) -> int:
        return int(self.model.config.d_model)

    def tokenize(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each [B, text_len] int64, cleaned, padded right, with </s>."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [clean_prompt(p) if self.clean else p for p in prompts]
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_len,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """Context [B, text_len, d_model] float32; rows past each prompt's length are exactly zero."""
        ids, mask = self.tokenize(prompts)
        device = next(self.model.parameters()).device
        hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        hidden = hidden.float() * mask.to(device=device, dtype=torch.float32).unsqueeze(-1)
        return hidden


def _model_from_state(config, state: StateDict, source: str):
    """Build a UMT5EncoderModel without a random init (meta tensors) and fill it from `state`."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    check_keys_and_shapes(model.state_dict(), state, source)
    model.load_state_dict(state, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # one tensor, as transformers ties them
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{source}: tensors left uninitialised: {', '.join(leftover)}")
    return model.eval()


def load_text_encoder_official(pth_path: str | Path, tokenizer_dir: str | Path, text_len: int = DEFAULT_TEXT_LEN,
                               dtype: torch.dtype = torch.float32, config=None) -> TextEncoder:
    """Official layout: `models_t5_umt5-xxl-enc-bf16.pth` + the `google/umt5-xxl` tokenizer folder.

    The .pth is read with weights_only=True. The config is inferred from the tensor shapes unless
    given. Missing/unexpected keys and shape mismatches raise a CheckpointError that names them in
    the official key names. Floating weights are cast to `dtype` (bf16 -> fp32 by default).
    """
    pth_path = Path(pth_path)
    if not pth_path.is_file():
        raise CheckpointError(f"missing file {pth_path} (the official umT5 encoder checkpoint)")
    sd = read_pth(pth_path)
    if config is None:
        config = infer_umt5_config(sd)
    expected = {k: torch.empty(s, device="meta") for k, s in official_umt5_expected_shapes(config).items()}
    check_keys_and_shapes(expected, sd, str(pth_path))
    # Cast key by key, dropping each source tensor as it goes, so bf16 and fp32 copies of the whole
    # 5.7B-parameter encoder are never held at once.
    for key in list(sd):
        value = sd.pop(key)
        sd[key] = value.to(dtype) if value.is_floating_point() else value
    model = _model_from_state(config, convert_official_umt5_state_dict(sd), str(pth_path))
    return TextEncoder(model, load_tokenizer(tokenizer_dir), text_len=text_len)


def load_text_encoder_diffusers(text_encoder_dir: str | Path, tokenizer_dir: str | Path | None = None,
                                text_len: int = DEFAULT_TEXT_LEN, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """Diffusers layout: `text_encoder/` (UMT5EncoderModel save_pretrained) + `tokenizer/`.

    `tokenizer_dir` defaults to the `tokenizer` folder beside `text_encoder_dir`. Loading is local
    only and strict: missing, unexpected or mismatched weights raise a CheckpointError.
    """
    from transformers import UMT5EncoderModel

    text_encoder_dir = Path(text_encoder_dir)
    cfg_path = text_encoder_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"missing file {cfg_path} (expected by the diffusers text_encoder layout)")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    if model_type != "umt5":
        raise CheckpointError(f"{cfg_path}: model_type is {model_type!r}; skyrt expects the umT5 encoder ('umt5')")
    try:
        model, info = UMT5EncoderModel.from_pretrained(str(text_encoder_dir), local_files_only=True,
                                                       output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{text_encoder_dir} could not be loaded as a UMT5EncoderModel: {err}") from err
    problems = []
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in (info.get(what) or []))
        if keys:
            problems.append(f"{what.replace('_', ' ')} ({len(keys)}): {', '.join(keys)}")
    if problems:
        raise CheckpointError(f"{text_encoder_dir} does not match its config:\n  " + "\n  ".join(problems))
    model = model.to(dtype=dtype).eval()
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else text_encoder_dir.parent / "tokenizer"
    return TextEncoder(model, load_tokenizer(tokenizer_dir), text_len=text_len)
