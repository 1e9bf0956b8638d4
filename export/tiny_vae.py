"""A tiny causal video decoder for Wan2.1 latents: the TAEHV architecture (madebyollin/taehv, MIT),
written for skyrt, loadable from its released Wan2.1 file (taew2_1.pth / taew2_1.safetensors).

What the architecture is (read from taehv.py at madebyollin/taehv 1f14a56):
- 2D convolutions applied to every frame, plus `MemBlock`s whose only temporal reach is the
  previous frame's input to the same block (zeros before the first frame): relu(conv(cat(x_t,
  x_{t-1})) + x_t). No other state crosses frames.
- Three stages of 3 MemBlocks at widths 256, 128, 64, each followed by a nearest 2x upsample and a
  `TGrow`: a 1x1 conv to stride * C channels split into `stride` consecutive frames (the Wan2.1
  weights grow time x1, x2, x2: one latent frame -> 4 pixel frames), then a conv to the next width.
- Input: model-space latents, what the DiT produces ((mu - mean) / std; TAEHV uses no scale or shift
  of its own), soft-clamped by tanh(x / 3) * 3. Output: RGB in [0, 1] after clamp(0, 1).
- Frame count: F latents -> 4F raw frames; the first 3 (startup frames) are dropped, so the decode
  has 1 + 4 (F - 1) frames, the Wan2.1 VAE's count: streaming, latent 0 gives 1 frame and each later
  latent 4, exactly as skyrt's Wan VAE streaming decoder does. (Alignment: pixel frame 0 is raw frame
  3, the last of latent 0's four.)

skyrt's side: the backend interface speaks raw latents (the VAE mean) and pixels in [-1, 1], so the
`TinyDecoderStep` wrapper normalises on the way in and maps [0, 1] -> [-1, 1] on the way out.

Because the only temporal state is "the previous frame's input to each MemBlock", the whole-clip
decode and the per-latent streaming step are ONE function (`TinyDecoder.run`): T frames at once
with past = (carried memory, x_0 .. x_{T-2}); the new memory is x_{T-1}. Decoding a clip is run()
from zero memories; streaming is run() on one latent at a time carrying the 9 memories.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skyrt.runtime import tiny_decoder as contract
from skyrt.runtime.latents import LATENT_CHANNELS, normalize
from skyrt.runtime.tiny_decoder import TINY_DECODER_FILES, find_tiny_decoder_file

WIDTHS = (256, 128, 64, 64)  # TAEHV's base decoder (not the "super" variant)
TIME_GROW = (1, 2, 2)  # taew2_1: decoder_time_upscale (False, True, True)
TIME_FACTOR = 4  # raw frames per latent frame (product of TIME_GROW)
STARTUP_FRAMES = TIME_FACTOR - 1  # raw frames dropped at the start of a stream
assert STARTUP_FRAMES == contract.STARTUP_FRAMES  # what the exported-graph backends drop (runtime/tiny_decoder.py)
MEMBLOCKS_PER_STAGE = 3


def _conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """tanh(x / 3) * 3: keeps out-of-distribution latents from blowing up the decoder."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(conv(cat(x, past)) + x): `past` is the previous frame's input to this block."""

    def __init__(self, width: int):
        super().__init__()
        # Indices 0, 2, 4 are the released file's keys (conv.0/2/4); 1, 3 are the ReLUs.
        self.conv = nn.Sequential(_conv3x3(2 * width, width), nn.ReLU(), _conv3x3(width, width), nn.ReLU(),
                                  _conv3x3(width, width))

    def forward(self, x: Tensor, past: Tensor) -> Tensor:  # [N, C, H, W] each
        return torch.relu(self.conv(torch.cat([x, past], 1)) + x)


class TimeGrow(nn.Module):
    """1x1 conv C -> stride * C, split into `stride` consecutive frames: [N*T, C] -> [N*T*stride, C]."""

    def __init__(self, width: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(width, width * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        nt, c, h, w = x.shape
        return self.conv(x).reshape(nt * self.stride, c, h, w)


def _decoder_layers() -> nn.Sequential:
    """The decoder as one nn.Sequential, in the released file's index order (its keys are
    decoder.{index}...; parameterless layers keep their index too)."""
    layers: list[nn.Module] = [SoftClamp(), _conv3x3(LATENT_CHANNELS, WIDTHS[0]), nn.ReLU()]
    for stage, grow in enumerate(TIME_GROW):
        width = WIDTHS[stage]
        layers += [MemBlock(width) for _ in range(MEMBLOCKS_PER_STAGE)]
        layers += [nn.Upsample(scale_factor=2), TimeGrow(width, grow), _conv3x3(width, WIDTHS[stage + 1], bias=False)]
    layers += [nn.ReLU(), _conv3x3(WIDTHS[3], 3)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class MemorySpec:
    """One MemBlock's carried frame: [N, channels, h * scale, w * scale] for latents [.., h, w]."""

    channels: int
    scale: int

    def shape(self, batch: int, h: int, w: int) -> tuple[int, int, int, int]:
        return (batch, self.channels, h * self.scale, w * self.scale)


MEMORY_SPECS = tuple(MemorySpec(WIDTHS[s], 2 ** s) for s in range(len(TIME_GROW)) for _ in range(MEMBLOCKS_PER_STAGE))


class TinyDecoder(nn.Module):
    """TAEHV's Wan2.1 decoder. Works in TAEHV's conventions: model-space latents in, RGB [0, 1] out."""

    def __init__(self):
        super().__init__()
        self.decoder = _decoder_layers()

    def zero_memories(self, batch: int, h: int, w: int, like: Tensor) -> list[Tensor]:
        """The memories before the first frame (TAEHV starts every MemBlock from zeros)."""
        return [like.new_zeros(m.shape(batch, h, w)) for m in MEMORY_SPECS]

    def run(self, z: Tensor, memories: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """z [N, T, 16, h, w] model-space, memories (MEMORY_SPECS) -> (raw frames [N, 4T, 3, 8h, 8w],
        unclamped, nothing dropped; the new memories)."""
        n, t = z.shape[:2]
        x = z.reshape(n * t, *z.shape[2:])  # frames of one video stay consecutive: index = n * T + t
        new_memories, k = [], 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                frames = x.shape[0] // n
                x5 = x.reshape(n, frames, *x.shape[1:])
                past = torch.cat([memories[k][:, None], x5[:, :-1]], 1).reshape(x.shape)
                new_memories.append(x5[:, -1])
                x, k = layer(x, past), k + 1
            else:
                x = layer(x)
        return x.reshape(n, -1, *x.shape[1:]), new_memories

    def decode_video(self, z: Tensor) -> Tensor:
        """A whole clip, TAEHV's decode_video: z [N, F, 16, h, w] -> RGB [N, 1 + 4(F-1), 3, 8h, 8w] in [0, 1]."""
        n, _, _, h, w = z.shape
        frames, _ = self.run(z, self.zero_memories(n, h, w, z))
        return frames.clamp(0, 1)[:, STARTUP_FRAMES:]


class TinyDecoderStep(nn.Module):
    """One streaming step in skyrt's conventions (what the ONNX step graph is): raw latent frame
    mu [1, 16, 1, h, w] + the 9 memories -> pixels [1, 3, 4, 8h, 8w] in [-1, 1] (all four; the caller
    drops the first 3 of a stream's first step) + the new memories."""

    def __init__(self, tiny: TinyDecoder):
        super().__init__()
        self.tiny = tiny

    def forward(self, mu: Tensor, *memories: Tensor):
        z = normalize(mu, channel_axis=1).permute(0, 2, 1, 3, 4)  # [1, 1, 16, h, w] NTCHW
        frames, new = self.tiny.run(z, list(memories))  # [1, 4, 3, H, W]
        pixels = frames.clamp(0, 1).permute(0, 2, 1, 3, 4) * 2 - 1  # [1, 3, 4, H, W]
        return (pixels, *new)


def decode_raw(tiny: TinyDecoder, mu: Tensor) -> Tensor:
    """Whole clip in skyrt's conventions: raw mu [N, 16, F, h, w] -> pixels [N, 3, 1 + 4(F-1), H, W] in [-1, 1]."""
    z = normalize(mu, channel_axis=1).permute(0, 2, 1, 3, 4)
    return tiny.decode_video(z).permute(0, 2, 1, 3, 4) * 2 - 1


class TinyStreamingDecoder:
    """The tiny decoder one latent frame at a time (== decode_raw of the whole clip), carrying the 9
    MemBlock memories across calls: the first call yields 1 pixel frame, each later call 4."""

    def __init__(self, tiny: TinyDecoder):
        self.step = TinyDecoderStep(tiny)
        self.reset()

    def reset(self) -> None:
        self.memories: list[Tensor] | None = None

    @torch.inference_mode()
    def decode_next(self, mu_frame: Tensor) -> Tensor:
        """mu_frame [1, 16, 1, h, w] raw -> pixels [1, 3, n, 8h, 8w] in [-1, 1], n = 1 first, then 4."""
        if mu_frame.ndim != 5 or mu_frame.shape[1] != LATENT_CHANNELS or mu_frame.shape[2] != 1:
            raise ValueError(f"decode_next takes one raw latent frame [1, {LATENT_CHANNELS}, 1, h, w], "
                             f"got {tuple(mu_frame.shape)}")
        first = self.memories is None
        if first:
            _, _, _, h, w = mu_frame.shape
            self.memories = self.step.tiny.zero_memories(mu_frame.shape[0], h, w, mu_frame)
        pixels, *self.memories = self.step(mu_frame, *self.memories)
        return pixels[:, :, STARTUP_FRAMES:] if first else pixels


# ---- the released file ------------------------------------------------------------------------
class TinyDecoderFileError(ValueError):
    """The file is not TAEHV's Wan2.1 decoder (taew2_1); the message names what it looks like."""


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise TinyDecoderFileError(f"{path} holds a {type(sd).__name__}, not a state dict; the tiny decoder "
                                   f"needs TAEHV's taew2_1.pth (github.com/madebyollin/taehv)")
    return dict(sd)


def _looks_like(sd: Mapping[str, Tensor]) -> str | None:
    """A name for a known wrong file, from its keys and shapes."""
    if "decoder.conv1.weight" in sd or "conv1.weight" in sd or "encoder.conv1.weight" in sd:
        return "the Wan2.1 VAE (Wan2.1_VAE.pth / diffusion_pytorch_model.safetensors), not TAEHV's tiny decoder"
    first = sd.get("decoder.1.weight")
    if first is not None and first.ndim == 4 and first.shape[1] != LATENT_CHANNELS:
        return (f"a TAEHV decoder for {first.shape[1]}-channel latents (taew2_2 is Wan2.2-5B's, taehv1_5 "
                f"Hunyuan 1.5's), not Wan2.1's 16")
    if "decoder.0.weight" in sd:
        return "a TAEHV 'super' decoder (another architecture), not taew2_1"
    return None


def tiny_decoder_state(sd: Mapping[str, Tensor], where: str, expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The decoder.* tensors of a released TAEHV file, checked against `expected` (a TinyDecoder's
    state_dict): every key present with its shape. encoder.* keys (the file also holds the encoder)
    are ignored. A TimeGrow weight with more output channels than this decoder grows is cut to its
    last ones, as TAEHV's own loader does (patch_tgrow_layers: the last timestep's channels)."""
    wrong = _looks_like(sd)
    if wrong:
        raise TinyDecoderFileError(f"{where} looks like {wrong}; --decoder tiny needs taew2_1.pth or "
                                   f"taew2_1.safetensors from github.com/madebyollin/taehv")
    decoder = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    missing = sorted(set(expected) - set(decoder))
    extra = sorted(set(decoder) - set(expected))
    if missing or extra:
        raise TinyDecoderFileError(f"{where} is not TAEHV's Wan2.1 decoder layout: missing {missing[:4]}, "
                                   f"unexpected {extra[:4]} (expected taew2_1.pth from github.com/madebyollin/taehv)")
    out = {}
    for key, want in expected.items():
        have = decoder[key]
        if have.ndim == 4 and want.ndim == 4 and key.endswith("conv.weight") and have.shape[0] > want.shape[0] \
                and have.shape[1:] == want.shape[1:] and have.shape[0] % want.shape[0] == 0:
            have = have[-want.shape[0]:]  # a TimeGrow trained to grow more than this decoder does
        if tuple(have.shape) != tuple(want.shape):
            raise TinyDecoderFileError(f"{where}: {key} has shape {tuple(have.shape)}, taew2_1's is "
                                       f"{tuple(want.shape)}")
        out[key] = have.float()
    return out


def load_tiny_decoder(path: str | Path, device: str | torch.device = "cpu") -> TinyDecoder:
    """TinyDecoder with the weights of a released taew2_1 file (.pth or .safetensors), fp32, eval."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tiny decoder weights at {path} (expected taew2_1.pth or "
                                f"taew2_1.safetensors from github.com/madebyollin/taehv)")
    tiny = TinyDecoder()
    tiny.load_state_dict(tiny_decoder_state(_read_state_dict(path), str(path), tiny.state_dict()))
    return tiny.to(device).eval()


DECODERS = ("wan", "tiny")


def open_decoder(decoder: str, decoder_path: str | Path | None, folder: str | Path,
                 device: str | torch.device = "cpu") -> TinyDecoder | None:
    """A backend's decoder= choice: None for "wan" (the Wan2.1 VAE decodes), the loaded TinyDecoder
    for "tiny" (decoder_path, else the model folder's TINY_DECODER_FILES)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}: choose one of {', '.join(DECODERS)}")
    if decoder == "wan":
        if decoder_path is not None:
            raise ValueError("decoder_path= is the tiny decoder's weights file; it needs decoder='tiny'")
        return None
    return load_tiny_decoder(decoder_path if decoder_path is not None else find_tiny_decoder_file(folder), device)


# ---- the streaming step as an ONNX graph ---------------------------------------------------------
def step_io_names() -> tuple[list[str], list[str]]:
    """The step graph's inputs (mu, memory_0..8) and outputs (pixels, new_memory_0..8)."""
    k = range(len(MEMORY_SPECS))
    return ["mu", *(f"memory_{i}" for i in k)], ["pixels", *(f"new_memory_{i}" for i in k)]


def export_tiny_decoder_onnx(tiny: TinyDecoder, path: str | Path, latent_h: int, latent_w: int) -> Path:
    """Write TinyDecoderStep as an ONNX graph of fixed shapes: mu [1, 16, 1, h, w] raw and the 9
    memories (MEMORY_SPECS) in; pixels [1, 3, 4, 8h, 8w] in [-1, 1] and the 9 new memories out. The
    caller zeros the memories before a stream and drops the first 3 frames of its first step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = TinyDecoderStep(tiny.float().eval())
    mu = torch.zeros(1, LATENT_CHANNELS, 1, latent_h, latent_w)
    memories = tiny.zero_memories(1, latent_h, latent_w, mu)
    inputs, outputs = step_io_names()
    with torch.no_grad():
        torch.onnx.export(step, (mu, *memories), str(path), input_names=inputs, output_names=outputs,
                          opset_version=17, dynamo=False)
    return path


def export_tiny_decoder_folder(weights: str | Path, out: str | Path, height: int, width: int) -> Path:
    """The released file's streaming step for pixel frames height x width as an export folder: the graph
    (export_tiny_decoder_onnx) and its manifest (runtime/tiny_decoder.py: format, latent size, I/O with
    shapes, the weights' sha256), what the exported-graph backends run with decoder="tiny"."""
    import hashlib
    import json

    if height % 8 or width % 8:
        raise ValueError(f"the tiny decoder makes 8x the latent size: {height}x{width} is not a multiple of 8")
    out = Path(out)
    h, w = height // 8, width // 8
    graph = export_tiny_decoder_onnx(load_tiny_decoder(weights), out / f"{contract.STEP_GRAPH}.onnx", h, w)
    inputs, outputs = step_io_names()
    memories = [list(m.shape(1, h, w)) for m in MEMORY_SPECS]
    spec = lambda name, shape: {"name": name, "shape": shape, "dtype": "float32"}  # noqa: E731
    manifest = {
        "format": contract.EXPORT_FORMAT, "latent": [h, w], "pixels": [height, width],
        "weights": Path(weights).name, "weights_sha256": hashlib.sha256(Path(weights).read_bytes()).hexdigest(),
        "graph": {"file": graph.name,
                  "inputs": [spec(inputs[0], [1, LATENT_CHANNELS, 1, h, w]),
                             *(spec(n, m) for n, m in zip(inputs[1:], memories))],
                  "outputs": [spec(outputs[0], [1, 3, TIME_FACTOR, height, width]),
                              *(spec(n, m) for n, m in zip(outputs[1:], memories))]},
    }
    (out / contract.EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


__all__ = ["DECODERS", "export_tiny_decoder_folder", "MEMORY_SPECS", "STARTUP_FRAMES", "TINY_DECODER_FILES", "TinyDecoder", "TinyDecoderFileError",
           "TinyDecoderStep", "TinyStreamingDecoder", "decode_raw", "export_tiny_decoder_onnx",
           "find_tiny_decoder_file", "load_tiny_decoder", "open_decoder", "step_io_names", "tiny_decoder_state"]
