"""Tests for skyrt.export.text_encoder: umT5 key map, loaders (official .pth and diffusers layout),
prompt cleaning, tiny tokenizer, and parity with transformers, diffusers and (when unpacked on the
machine) the official SkyReels-V2 T5 code. CPU only, tiny random models.

Run: python -m pytest tests/test_text_encoder.py -q
The official-code oracle tests look for the official package at $SKYRT_OFFICIAL_DIR
(an unpacked skyreels_v2_infer folder) and are skipped when it is unset.
"""
from __future__ import annotations

import html
import os
import re

import pytest
import torch

from checkpoints import OFFICIAL_DIR, import_official_module

te = pytest.importorskip("skyrt.export.text_encoder")
transformers = pytest.importorskip("transformers")
from transformers import UMT5EncoderModel  # noqa: E402

from skyrt.export.checkpoint import CheckpointError  # noqa: E402

TEXT_LEN = 24
PROMPTS = [
    "A cat walks along the beach.",
    # needs cleaning: double-escaped entity, mojibake, tabs/newlines, runs of spaces, edge spaces
    "  the   DOG &amp;amp; a  fox\n\tjumps   over a frozen lake, caf\u00c3\u00a9 lighting  ",
    "",
    # longer than TEXT_LEN tokens: truncated, </s> kept last
    "A golden retriever races toward the coral reef at golden hour, film grain, shallow depth of field, "
    "aerial shot, vivid colors, dramatic clouds, 4K, highly detailed.",
]
needs_official = pytest.mark.skipif(not (OFFICIAL_DIR / "modules" / "t5.py").is_file(),
                                    reason=f"official SkyReels-V2 code not found at {OFFICIAL_DIR}")


# ---------------------------------------------------------------------------------------------
# Independent references (written here, not taken from the module under test)
# ---------------------------------------------------------------------------------------------

def to_official_key(k: str) -> str:
    """transformers UMT5EncoderModel key -> official Wan umT5 key, written out by hand from the official module names."""
    top = {"shared.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
    if k in top:
        return top[k]
    m = re.fullmatch(r"encoder\.block\.(\d+)\.layer\.(\d)\.(.+)", k)
    assert m, k
    i, sub, rest = m.groups()
    table = {
        ("0", "layer_norm.weight"): "norm1.weight",
        ("0", "SelfAttention.q.weight"): "attn.q.weight",
        ("0", "SelfAttention.k.weight"): "attn.k.weight",
        ("0", "SelfAttention.v.weight"): "attn.v.weight",
        ("0", "SelfAttention.o.weight"): "attn.o.weight",
        ("0", "SelfAttention.relative_attention_bias.weight"): "pos_embedding.embedding.weight",
        ("1", "layer_norm.weight"): "norm2.weight",
        ("1", "DenseReluDense.wi_0.weight"): "ffn.gate.0.weight",
        ("1", "DenseReluDense.wi_1.weight"): "ffn.fc1.weight",
        ("1", "DenseReluDense.wo.weight"): "ffn.fc2.weight",
    }
    return f"blocks.{i}.{table[(sub, rest)]}"


def to_official_state_dict(model_sd: dict) -> dict:
    return {to_official_key(k): v.clone() for k, v in model_sd.items() if k != "encoder.embed_tokens.weight"}


def ref_clean(text: str) -> str:
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


@torch.inference_mode()
def reference_embeds(model, tokenizer, prompts, text_len):
    """transformers model run directly, then trimmed to each length and zero-padded (diffusers-style)."""
    enc = tokenizer([ref_clean(p) for p in prompts], padding="max_length", max_length=text_len, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    hidden = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state.float()
    lens = enc.attention_mask.sum(1).tolist()
    out = torch.zeros_like(hidden)
    for b, n in enumerate(lens):
        out[b, :n] = hidden[b, :n]
    return out


def load_official_t5_module():
    """The official modules/t5.py."""
    return import_official_module("t5")


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return te.make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return te.load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    config = te.umt5_config_for_official("tiny", vocab_size=max(256, len(tokenizer)))
    torch.manual_seed(0)
    model = UMT5EncoderModel(config).eval()
    with torch.no_grad():  # non-trivial weights: norms away from 1, biases of order 1
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name or name == "shared.weight":
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def official_pth(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(to_official_state_dict(hf_model.state_dict()), path)
    return path


# ---------------------------------------------------------------------------------------------
# Tokenizer and cleaning
# ---------------------------------------------------------------------------------------------

def test_tiny_tokenizer_is_t5_like(tok_dir, tokenizer):
    assert (tok_dir / "tokenizer.json").is_file()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert 100 < len(tokenizer) <= 256
    enc = tokenizer(["a cat", PROMPTS[3]], padding="max_length", max_length=TEXT_LEN, truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    n0 = int(mask[0].sum())
    assert ids[0, n0 - 1] == 1 and (ids[0, n0:] == 0).all() and (mask[0, n0:] == 0).all()
    assert mask[1].all() and ids[1, -1] == 1  # truncated, </s> kept


def test_clean_prompt_matches_diffusers_and_official():
    from diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2_diffusion_forcing import prompt_clean

    cases = PROMPTS + ["a\x1cb\x1dc\x1ed\x1fe", "x&#28;y", "\u00a0nbsp\u2028line\u3000ideo  ", "&lt;b&gt;bold&lt;/b&gt;",
                       "tab\t\tand\r\nnewline", "\x85nel", "Ã©tÃ©"]
    for case in cases:
        assert te.clean_prompt(case) == prompt_clean(case) == ref_clean(case), repr(case)
    assert te.clean_prompt(PROMPTS[1]) == "the DOG & a fox jumps over a frozen lake, caf\u00e9 lighting"
    if (OFFICIAL_DIR / "modules" / "tokenizers.py").is_file():
        off = import_official_module("tokenizers")
        for case in cases:
            assert te.clean_prompt(case) == off.whitespace_clean(off.basic_clean(case)), repr(case)


# ---------------------------------------------------------------------------------------------
# Key map and configs
# ---------------------------------------------------------------------------------------------

def test_key_map_round_trip(hf_model):
    sd = hf_model.state_dict()
    for k in sd:
        if k != "encoder.embed_tokens.weight":
            assert te.official_umt5_key_to_transformers(to_official_key(k)) == k
    converted = te.convert_official_umt5_state_dict(to_official_state_dict(sd))
    assert set(converted) == set(sd)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight"):
        te.official_umt5_key_to_transformers("blocks.0.attn.qkv.weight")
    with pytest.raises(CheckpointError, match=r"pos_embedding\.embedding\.weight"):
        te.official_umt5_key_to_transformers("pos_embedding.embedding.weight")  # shared-pos T5, not umT5


def test_xxl_config_and_inference():
    cfg = te.umt5_config_for_official("xxl")
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.d_kv) == \
        (256384, 4096, 10240, 24, 64, 64)
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (32, 128)
    assert cfg.feed_forward_proj == "gated-gelu" and cfg.dense_act_fn == "gelu_new"
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    official = to_official_state_dict(model.state_dict())
    assert {k: tuple(v.shape) for k, v in official.items()} == te.official_umt5_expected_shapes(cfg)
    inferred = te.infer_umt5_config(official)
    for field in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads", "d_kv",
                  "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj"):
        assert getattr(inferred, field) == getattr(cfg, field), field


@needs_official
def test_xxl_shapes_match_official_umt5_xxl():
    t5 = load_official_t5_module()
    model = t5.umt5_xxl(encoder_only=True, return_tokenizer=False, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == te.official_umt5_expected_shapes(te.umt5_config_for_official("xxl"))


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------

def test_official_layout_matches_transformers(hf_model, tokenizer, official_pth, tok_dir):
    enc = te.load_text_encoder_official(official_pth, tok_dir, text_len=TEXT_LEN)
    out = enc.encode(PROMPTS)
    ref = reference_embeds(hf_model, tokenizer, PROMPTS, TEXT_LEN)
    assert out.shape == (len(PROMPTS), TEXT_LEN, hf_model.config.d_model) and out.dtype == torch.float32
    diff = (out - ref).abs().max().item()
    print(f"official layout vs transformers: max abs diff {diff:.3e}")
    assert diff <= 1e-5
    _, mask = enc.tokenize(PROMPTS)
    assert (out[mask == 0] == 0).all() and (out[mask == 1].abs().sum(-1) > 0).all()
    assert int(mask[2].sum()) == 1  # empty prompt: </s> only


def test_official_layout_bf16_file_becomes_fp32(hf_model, tok_dir, tmp_path):
    path = tmp_path / "bf16.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in to_official_state_dict(hf_model.state_dict()).items()}, path)
    enc = te.load_text_encoder_official(path, tok_dir, text_len=TEXT_LEN)
    assert all(p.dtype == torch.float32 for p in enc.model.parameters())
    assert enc.model.encoder.embed_tokens.weight is enc.model.shared.weight
    assert enc.encode(["a cat"]).dtype == torch.float32


@needs_official
def test_official_layout_matches_official_code(hf_model, tokenizer, official_pth, tok_dir):
    """The official T5Encoder loads our official-layout file strictly and agrees with our encode."""
    t5 = load_official_t5_module()
    c = hf_model.config
    official = t5.T5Encoder(vocab=c.vocab_size, dim=c.d_model, dim_attn=c.num_heads * c.d_kv, dim_ffn=c.d_ff,
                            num_heads=c.num_heads, num_layers=c.num_layers,
                            num_buckets=c.relative_attention_num_buckets, shared_pos=False, dropout=0.0)
    official.load_state_dict(torch.load(official_pth, weights_only=True), strict=True)
    official.eval()
    enc = te.load_text_encoder_official(official_pth, tok_dir, text_len=TEXT_LEN)
    ids, mask = enc.tokenize(PROMPTS)
    with torch.no_grad():
        ref = official(ids, mask) * mask.unsqueeze(-1)
    diff = (enc.encode(PROMPTS) - ref).abs().max().item()
    print(f"official layout vs official T5Encoder: max abs diff {diff:.3e}")
    assert diff <= 1e-5


def test_diffusers_layout_matches_transformers(hf_model, tokenizer, tmp_path):
    hf_model.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    enc = te.load_text_encoder_diffusers(tmp_path / "text_encoder", text_len=TEXT_LEN)  # tokenizer/ beside it
    diff = (enc.encode(PROMPTS) - reference_embeds(hf_model, tokenizer, PROMPTS, TEXT_LEN)).abs().max().item()
    print(f"diffusers layout vs transformers: max abs diff {diff:.3e}")
    assert diff <= 1e-5


def test_matches_diffusers_pipeline(hf_model, tokenizer, official_pth, tok_dir):
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    pipe = SkyReelsV2DiffusionForcingPipeline(tokenizer=tokenizer, text_encoder=hf_model, transformer=None,
                                              vae=None, scheduler=None)
    with torch.inference_mode():
        ref = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=TEXT_LEN, device=torch.device("cpu"),
                                         dtype=torch.float32)
    enc = te.load_text_encoder_official(official_pth, tok_dir, text_len=TEXT_LEN)
    diff = (enc.encode(PROMPTS) - ref).abs().max().item()
    print(f"official layout vs diffusers _get_t5_prompt_embeds: max abs diff {diff:.3e}")
    assert diff <= 1e-5


# ---------------------------------------------------------------------------------------------
# Bad checkpoints
# ---------------------------------------------------------------------------------------------

def _save(sd, path):
    torch.save(sd, path)
    return path


def test_missing_key_is_named(hf_model, tok_dir, tmp_path):
    sd = to_official_state_dict(hf_model.state_dict())
    del sd["blocks.1.ffn.fc2.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.ffn\.fc2\.weight"):
        te.load_text_encoder_official(_save(sd, tmp_path / "m.pth"), tok_dir)


def test_unexpected_key_is_named(hf_model, tok_dir, tmp_path):
    sd = to_official_state_dict(hf_model.state_dict())
    sd["blocks.0.attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): blocks\.0\.attn\.extra\.weight"):
        te.load_text_encoder_official(_save(sd, tmp_path / "u.pth"), tok_dir)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.extra\.weight"):
        te.convert_official_umt5_state_dict(sd)


def test_wrong_shape_is_named(hf_model, tok_dir, tmp_path):
    sd = to_official_state_dict(hf_model.state_dict())
    want = tuple(sd["blocks.1.attn.k.weight"].shape)
    sd["blocks.1.attn.k.weight"] = torch.zeros(want[0] + 8, want[1])
    with pytest.raises(CheckpointError) as err:
        te.load_text_encoder_official(_save(sd, tmp_path / "s.pth"), tok_dir)
    msg = str(err.value)
    assert "blocks.1.attn.k.weight" in msg and str((want[0] + 8, want[1])) in msg and str(want) in msg


def test_not_an_encoder_checkpoint(tok_dir, tmp_path):
    with pytest.raises(CheckpointError, match="token_embedding.weight"):
        te.load_text_encoder_official(_save({"foo": torch.zeros(1)}, tmp_path / "x.pth"), tok_dir)


class _Payload:
    """Unpickling this runs os.mkdir(marker): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_object_is_refused(hf_model, tok_dir, tmp_path):
    marker = tmp_path / "code_ran"
    sd = to_official_state_dict(hf_model.state_dict())
    sd["payload"] = _Payload(marker)
    path = _save(sd, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        te.load_text_encoder_official(path, tok_dir)
    assert not marker.exists()


def test_diffusers_layout_bad_folders(hf_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "text_encoder"
    hf_model.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    del weights["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"):
        te.load_text_encoder_diffusers(folder, tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="config.json"):
        te.load_text_encoder_diffusers(tmp_path / "empty", tmp_path / "nowhere")
