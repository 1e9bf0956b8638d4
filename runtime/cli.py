"""`skyrt` command line: generate, serve (more subcommands arrive with their issues).

    skyrt generate --model DIR --prompt "a red fox" --num-frames 97 --output out.mp4
    skyrt serve                      # endless stream of the default model on http://127.0.0.1:8000
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="model folder (official or diffusers layout); default: skyrt's built-in tiny model")
    p.add_argument("--backend", default="torch", help="torch (reference)")
    p.add_argument("--device", default="cpu", help="torch device for the torch backend (cpu, cuda)")


def _add_sampling_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("--prompt", default=defaults.get("prompt", "a red circle bouncing on a dark blue background"))
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int, default=defaults["height"])
    p.add_argument("--width", type=int, default=defaults["width"])
    p.add_argument("--steps", dest="num_inference_steps", type=int, default=defaults["steps"])
    p.add_argument("--guidance-scale", type=float, default=defaults["guidance_scale"])
    p.add_argument("--shift", type=float, default=8.0)
    p.add_argument("--ar-step", type=int, default=0)
    p.add_argument("--causal-block-size", type=int, default=1)
    p.add_argument("--base-num-frames", type=int, default=defaults["base_num_frames"])
    p.add_argument("--overlap-history", type=int, default=defaults.get("overlap_history"))
    p.add_argument("--addnoise-condition", type=float, default=0)
    p.add_argument("--overlap-carry", choices=("pixel", "latent"), default=defaults.get("overlap_carry", "pixel"))
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--image", default=None, help="first frame (I2V)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skyrt", description="SkyReels-V2 diffusion-forcing runtime")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a video file")
    _add_model_args(gen)
    _add_sampling_args(gen, {"height": 544, "width": 960, "steps": 30, "guidance_scale": 6.0, "base_num_frames": 97})
    gen.add_argument("--num-frames", type=int, default=97)
    gen.add_argument("--video", default=None, help="video to extend (V2V)")
    gen.add_argument("--end-image", default=None, help="last frame")
    gen.add_argument("--output", "-o", type=Path, default=Path("out.mp4"), help="mp4 path")
    gen.add_argument("--no-progress", action="store_true")

    serve = sub.add_parser("serve", help="serve an endless stream over HTTP (MJPEG, HLS, fragmented MP4)")
    _add_model_args(serve)
    _add_sampling_args(serve, {"height": 128, "width": 128, "steps": 4, "guidance_scale": 1.0,
                               "base_num_frames": 17, "overlap_history": 5, "overlap_carry": "latent"})
    serve.add_argument("--mode", choices=("kvcache", "window"), default="kvcache",
                       help="kvcache: each block denoised once against a ring cache (default); window: official")
    serve.add_argument("--sink-blocks", type=int, default=1, help="kvcache: blocks kept forever at the ring's start")
    serve.add_argument("--window-blocks", type=int, default=8, help="kvcache: rolling blocks of history")
    serve.add_argument("--playlist", type=Path, default=None,
                       help='JSON file {"loop": true, "items": [{"prompt": "...", "duration_s": 30}, ...]}')
    serve.add_argument("--formats", default="mjpeg,hls,mp4", help="outputs to encode, comma separated")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on control endpoints")
    __import__("skyrt.export.export_cli", fromlist=["add_parser"]).add_parser(sub)  # torch only when an export runs
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "export":
            return args.run(args)
    except (ValueError, FileNotFoundError) as err:  # RequestError is a ValueError
        # Bad input: one clear line, no traceback.
        print(f"skyrt {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1


def _load(args):
    from .api import load

    return load(args.model, backend=args.backend, device=args.device)


def _sampling_kwargs(args) -> dict:
    keys = ("prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "shift",
            "ar_step", "causal_block_size", "base_num_frames", "overlap_history", "addnoise_condition", "fps",
            "seed", "image", "overlap_carry")
    return {k: getattr(args, k) for k in keys}


def _generate(args) -> int:
    from .video_io import write_mp4

    pipe = _load(args)
    frames = pipe.generate(num_frames=args.num_frames, video=args.video, end_image=args.end_image,
                           progress=not args.no_progress, **_sampling_kwargs(args))
    count = write_mp4(frames, args.output, fps=args.fps)
    print(f"wrote {args.output}: {count} frames, {frames.shape[2]}x{frames.shape[1]} at {args.fps} fps")
    return 0


def _serve(args) -> int:
    from .server import PromptChange, ServerConfig, load_playlist, serve

    config = ServerConfig(fps=args.fps, formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
                          token=args.token)
    playlist = load_playlist(args.playlist, config.limits) if args.playlist is not None else None
    sampling = _sampling_kwargs(args)
    prompt = PromptChange(sampling.pop("prompt"), sampling.pop("negative_prompt") or None)
    sampling.update(mode=args.mode, sink_blocks=args.sink_blocks, window_blocks=args.window_blocks)
    if args.mode == "kvcache" and sampling["ar_step"] == 0:
        sampling["ar_step"] = args.num_inference_steps  # one block in flight: the lowest latency per block
    pipe = _load(args)
    serve(pipe, sampling, config, host=args.host, port=args.port, prompt=prompt, playlist=playlist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
