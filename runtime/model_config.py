"""DiT hyper-parameters under the official config.json names, torch-free.

Read by the serving runtime (model folders) and by the torch reference model (export/dit.py), with
converters from the official and the diffusers config.json layouts and the released model sizes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

CLIP_DIM = 1280  # width of the open-clip ViT-H/14 features the i2v models take ([B, 257, 1280])


# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class DiTConfig:
    """Transformer hyper-parameters under the official config.json names."""

    model_type: str = "t2v"  # 't2v' or 'i2v' (i2v adds CLIP image tokens and k_img/v_img)
    text_len: int = 512  # the caller zero-pads the umT5 context to this many tokens
    in_dim: int = 16  # latent channels in (i2v: 16 noisy + 20 conditioning = 36)
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256  # width of the sinusoidal timestep embedding
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    eps: float = 1e-6
    inject_sample_info: bool = False  # fps embedding (DF-1.3B only)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096  # umT5-xxl width
    cross_attn_norm: bool = True
    qk_norm: bool = True
    rope_max_positions: int = 1024  # the trained RoPE table length: positions must stay below it
    # Frames per causal block the checkpoint was configured with (diffusers' `num_frame_per_block`).
    # Informational: forward() masks only when the caller passes `causal_block_size`.
    num_frame_per_block: int = 1

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim={self.head_dim} must be even and >= 6 for the 3-axis RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even")
        if self.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {self.num_frame_per_block}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    # -- official config.json --------------------------------------------------------------
    @classmethod
    def from_official(cls, raw: dict) -> "DiTConfig":
        """From an official config.json dict; `_class_name`, `__name__`, other unknown keys are ignored.

        `window_size` is accepted only as global attention ((-1, -1)): local windows are not used
        by any SkyReels-V2 checkpoint and are not implemented.
        """
        window = raw.get("window_size")
        if window is not None and tuple(window) != (-1, -1):
            raise ValueError(f"window_size={window} (local attention) is not supported; expected (-1, -1)")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_official(self) -> dict:
        """An official config.json dict (all WanModel.__init__ arguments; skyrt extras only if set)."""
        out = {"_class_name": "WanModel"}
        for key, value in asdict(self).items():
            if key == "rope_max_positions" and value == 1024:
                continue  # not an official field; write it only when it differs from the table size
            if key == "num_frame_per_block" and value == 1:
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    # -- diffusers transformer/config.json ----------------------------------------------------
    @classmethod
    def from_diffusers(cls, raw: dict) -> "DiTConfig":
        """From a diffusers SkyReelsV2Transformer3DModel config.json dict."""
        heads, head_dim = int(raw["num_attention_heads"]), int(raw["attention_head_dim"])
        dim = heads * head_dim
        image_dim = raw.get("image_dim")
        if image_dim is not None and int(image_dim) != CLIP_DIM:
            raise ValueError(f"image_dim={image_dim}: only {CLIP_DIM}-wide CLIP features are supported")
        added_kv = raw.get("added_kv_proj_dim")
        if (image_dim is None) != (added_kv is None) or (added_kv is not None and int(added_kv) != dim):
            raise ValueError(f"image_dim={image_dim} and added_kv_proj_dim={added_kv} must be both unset or "
                             f"{CLIP_DIM} and dim={dim} (the i2v layout)")
        if raw.get("pos_embed_seq_len") is not None:
            raise ValueError("pos_embed_seq_len (first-last-frame image position embedding) is not supported")
        in_dim = int(raw.get("in_channels", 16))
        return cls(
            model_type="i2v" if image_dim is not None else "t2v",
            text_len=512,  # diffusers keeps it in the pipeline (max_sequence_length), not the config
            in_dim=in_dim,
            dim=dim,
            ffn_dim=int(raw["ffn_dim"]),
            freq_dim=int(raw.get("freq_dim", 256)),
            out_dim=int(raw.get("out_channels") or in_dim),
            num_heads=heads,
            num_layers=int(raw["num_layers"]),
            eps=float(raw.get("eps", 1e-6)),
            inject_sample_info=bool(raw.get("inject_sample_info", False)),
            patch_size=tuple(raw.get("patch_size", (1, 2, 2))),
            text_dim=int(raw.get("text_dim", 4096)),
            cross_attn_norm=bool(raw.get("cross_attn_norm", True)),
            qk_norm=raw.get("qk_norm", "rms_norm_across_heads") is not None,
            rope_max_positions=int(raw.get("rope_max_seq_len", 1024)),
            num_frame_per_block=int(raw.get("num_frame_per_block", 1)),
        )

    def to_diffusers(self) -> dict:
        """Keyword arguments for diffusers' SkyReelsV2Transformer3DModel (used by tests as the oracle)."""
        i2v = self.model_type == "i2v"
        return dict(
            patch_size=self.patch_size, num_attention_heads=self.num_heads, attention_head_dim=self.head_dim,
            in_channels=self.in_dim, out_channels=self.out_dim, text_dim=self.text_dim, freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim, num_layers=self.num_layers, cross_attn_norm=self.cross_attn_norm,
            qk_norm="rms_norm_across_heads" if self.qk_norm else None, eps=self.eps,
            image_dim=CLIP_DIM if i2v else None, added_kv_proj_dim=self.dim if i2v else None,
            rope_max_seq_len=self.rope_max_positions, inject_sample_info=self.inject_sample_info,
            num_frame_per_block=self.num_frame_per_block,
        )


# The released SkyReels-V2 DF transformers (official WanModel configs; diffusers
# SkyReelsV2Transformer3DModel agrees). The 720P DF-14B has the same transformer as the 540P one.
DF_1_3B_540P = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, inject_sample_info=True)
DF_14B_540P = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, inject_sample_info=False)
DF_14B_720P = DF_14B_540P
# Tests and the built-in demo: 2 heads of 16, every code path of the real model.
TINY = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=16)
