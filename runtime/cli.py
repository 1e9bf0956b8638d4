"""`skyrt` command line: generate, serve, export, caption.

    skyrt generate --model DIR --prompt "a red fox" --num-frames 97 --output out.mp4
    skyrt generate --model DIR --video in.mp4 --captioner SkyCaptioner-V1/ ...   # prompt = the video's caption
    skyrt serve                      # endless stream of the default model on http://127.0.0.1:8000
    skyrt caption clip.mp4 --captioner SkyCaptioner-V1/ [--json]
    skyrt fleet up --config fleet.yaml   # many streams on a Ray cluster (runtime/fleet/cli.py)
    skyrt export onnx --model DIR --out DIR      (export/export_cli.py)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from .caption_schema import MAX_NEW_TOKENS, CaptionParseError
from .captioner import CAPTIONER_ENV, CaptionerSetupError
from .causal_family import PRESETS
from .request import DEFAULTS, RECOMMENDED_KEYS, STREAM_EXCLUDED, cli_settings, setting_type

DEFAULT_PROMPT = "a red circle bouncing on a dark blue background"
DEFAULT_FPS = DEFAULTS["fps"]
# `skyrt serve --captioner DIR` without --caption-every captions the stream this often.
DEFAULT_CAPTION_EVERY_S = 30.0
# Sampling defaults for a model without a recommendation (a real SkyReels-V2 checkpoint): the official
# T2V settings. Models with a demo_model.json (the built-in demo model) recommend their own.
OFFICIAL_SAMPLING = {key: DEFAULTS[key] for key in RECOMMENDED_KEYS}  # GenerationRequest's defaults
# `skyrt serve` (and every stream of `skyrt fleet`): small, fast settings for a model without a recommendation.
SERVE_SAMPLING = {**OFFICIAL_SAMPLING, "height": 128, "width": 128, "num_inference_steps": 4, "guidance_scale": 1.0,
                  "mode": "kvcache", "base_num_frames": 17, "overlap_history": 5, "overlap_carry": "latent"}
CAPTIONER_HELP = (f"SkyCaptioner-V1 checkpoint folder (exported to ONNX on first use) or a folder from "
                  f"'skyrt export onnx --captioner'; default ${CAPTIONER_ENV}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="model folder (official or diffusers layout); default: skyrt's built-in model "
                        "(the shipped demo model, else the tiny random one)")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"),
                   help="torch (reference, default), onnxruntime (exports on first use), tensorrt (builds engines)")
    p.add_argument("--device", default="cpu", help="torch device for the torch backend (cpu, cuda)")
    p.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help="a causal Wan2.1 family (--model holds its checkpoint beside the Wan2.1 VAE and umT5 files): "
                        "runs its own sampler and sets its recommended sampling flags (runtime/causal_family.py)")


def _add_sampling_args(p: argparse.ArgumentParser, defaults: dict, exclude: tuple[str, ...] = ()) -> None:
    """Sampling flags, one per GenerationRequest field the command line takes (runtime/request.py: its
    flag, type, choices and one-line doc). Those a model can recommend default to None here and are
    filled in by `_resolve_sampling_defaults`: the model's demo_model.json recommendation, else
    `defaults`; --fps likewise from a preset; the others default to `defaults`, else the field's default."""
    p.set_defaults(fallback_sampling=defaults)
    for f in cli_settings(exclude):
        options: dict = {"dest": f.name, "help": f.metadata["doc"]}
        kind = setting_type(f)
        if kind is not str:
            options["type"] = kind
        if f.metadata["choices"] is not None:
            options["choices"] = f.metadata["choices"]
        if f.metadata["recommended"]:
            options.update(default=None, help=f"{f.metadata['doc']}; {_default_help(defaults, f.name)}")
        elif f.name == "fps":
            options.update(default=None, help=f"{f.metadata['doc']}; default: the preset's, else {DEFAULT_FPS}")
        elif f.name == "prompt":
            options.update(default=defaults.get("prompt", DEFAULT_PROMPT),
                           help=defaults.get("prompt_help", f.metadata["doc"]))
        else:
            options["default"] = defaults.get(f.name, f.default)
        p.add_argument("--" + f.metadata["cli"], **options)
    p.add_argument("--image", default=None, help="first frame (I2V)")


def _default_help(defaults: dict, key: str) -> str:
    return f"default: the model's recommendation (demo_model.json), else {defaults[key]}"


def _resolve_sampling_defaults(args, model_dir: Path) -> None:
    """Fill the sampling flags left unset: first from --preset or the model's recommendation, then from
    the command's own defaults (a real checkpoint has no recommendation: the official settings apply)."""
    from .default_model import SAMPLING_KEYS, recommended_sampling

    if args.preset is not None:
        recommended = PRESETS[args.preset].sampling_defaults()
        _check_preset_flags(args, recommended)
    else:
        recommended = recommended_sampling(model_dir) if model_dir.is_dir() else {}
    for key in SAMPLING_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, recommended.get(key, args.fallback_sampling[key]))
    if args.fps is None:
        args.fps = recommended.get("fps", DEFAULT_FPS)


def _check_preset_flags(args, recommended: dict) -> None:
    """Flags a causal preset cannot honour, refused here: Pipeline takes a value equal to its own default
    as unset (the preset's), so an explicit --steps 30 or --mode window would silently become the preset's."""
    if args.mode not in (None, "kvcache"):
        raise ValueError(f"--preset {args.preset} runs its own sampler with a KV cache (--mode kvcache); "
                         f"--mode {args.mode} is the SkyReels-V2 diffusion-forcing rollout")
    steps = recommended["num_inference_steps"]
    if args.num_inference_steps not in (None, steps):
        raise ValueError(f"--preset {args.preset} was distilled for {steps} steps; --steps "
                         f"{args.num_inference_steps} is not one of its schedules")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skyrt", description="SkyReels-V2 diffusion-forcing runtime")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a video file")
    _add_model_args(gen)
    # prompt None = not given: with --video the prompt is then the video's caption (--captioner).
    _add_sampling_args(gen, {**OFFICIAL_SAMPLING, "prompt": None,
                             "prompt_help": f"default: with --video, the video's caption (--captioner); "
                                            f"else {DEFAULT_PROMPT!r}"})
    gen.add_argument("--video", default=None, help="video to extend (V2V)")
    gen.add_argument("--captioner", type=Path, default=None,
                     help=f"captions --video when no --prompt is given: {CAPTIONER_HELP}")
    gen.add_argument("--end-image", default=None, help="last frame")
    gen.add_argument("--output", "-o", type=Path, default=Path("out.mp4"), help="mp4 path")
    gen.add_argument("--no-progress", action="store_true")

    serve = sub.add_parser("serve", help="serve an endless stream over HTTP (MJPEG, HLS, fragmented MP4)")
    _add_model_args(serve)
    _add_sampling_args(serve, SERVE_SAMPLING, exclude=STREAM_EXCLUDED)  # the flags of Pipeline.stream's settings
    serve.add_argument("--playlist", type=Path, default=None,
                       help='JSON file {"loop": true, "items": [{"prompt": "...", "duration_s": 30}, ...]}')
    serve.add_argument("--formats", default="mjpeg,hls,mp4", help="outputs to encode, comma separated")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", default=None,
                       help="control token (shows in the process list: prefer --token-file or $SKYRT_TOKEN); "
                            "default: one generated per run, printed at start in the page's URL")
    serve.add_argument("--token-file", type=Path, default=None, help="read the control token from this file")
    serve.add_argument("--no-token", action="store_true",
                       help="leave POST /prompt and PUT /playlist open to anyone who can reach the server")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a host name control requests may use besides IP addresses and localhost "
                            "(a reverse proxy's public name; repeatable)")
    serve.add_argument("--max-connections", type=int, default=1000, help="open connections in all (default 1000)")
    serve.add_argument("--max-connections-per-address", type=int, default=256,
                       help="open connections from one client address (default 256; behind a proxy raise it)")
    serve.add_argument("--stall-timeout", type=float, default=20.0, metavar="SECONDS",
                       help="cut off a stream client whose socket accepts nothing this long (default 20)")
    serve.add_argument("--send-buffer-kib", type=int, default=256, metavar="KIB",
                       help="kernel send buffer of each stream client (default 256; a slow client's backlog lives "
                            "in a drop-oldest ring, not here): lower it for many viewers on little memory, raise "
                            "it for distant viewers on fast links")
    serve.add_argument("--state", type=Path, default=None, metavar="FILE",
                       help="keep the prompt and playlist in FILE (written atomically on every change) and "
                            "resume them from it at start")
    serve.add_argument("--publish", action="append", default=[], metavar="URL",
                       help="push the H.264 stream to an RTMP receiver, rtmp://HOST[:PORT]/APP/KEY (a relay, "
                            "a restream service); repeatable; reconnects with backoff")
    serve.add_argument("--ll-hls-part", type=float, default=0.25, metavar="SECONDS",
                       help="low-latency HLS beside HLS at /llhls/live.m3u8, in parts this long (whole frames; "
                            "default 0.25); 0 turns it off")
    serve.add_argument("--captioner", type=Path, default=None,
                       help=f"caption the stream live (GET /caption): {CAPTIONER_HELP} (with --caption-every)")
    serve.add_argument("--caption-every", type=float, default=None, metavar="SECONDS",
                       help=f"caption the last SECONDS of the stream every SECONDS (default "
                            f"{DEFAULT_CAPTION_EVERY_S:g} with --captioner); costs generated frames/s while it runs")

    caption = sub.add_parser("caption", help="caption a video with SkyCaptioner-V1 (T2V prompt or structured JSON)",
                             description="Caption a video with SkyCaptioner-V1 (16 frames, greedy decoding) and "
                                         "print the caption as a T2V prompt, or as SkyCaptioner's JSON (--json).")
    caption.add_argument("video", type=Path, help="video file")
    caption.add_argument("--captioner", type=Path, default=None, help=CAPTIONER_HELP)
    caption.add_argument("--json", action="store_true", help="print the structured caption as JSON")
    caption.add_argument("--strict", action="store_true",
                         help="fail (exit 2) on any schema issue: missing fields, labels outside the closed sets")
    caption.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                         help=f"most tokens the captioner writes (default {MAX_NEW_TOKENS}, the official setting)")
    caption.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    caption.add_argument("--backend", dest="captioner_backend", choices=("onnxruntime", "tensorrt"),
                         default="onnxruntime", help="onnxruntime (default, CPU) or tensorrt (engines built on first "
                                                     "use; needs an NVIDIA GPU)")
    caption.add_argument("--no-progress", action="store_true", help="no messages while a first use exports")
    __import__("skyrt.export.export_cli", fromlist=["add_parser"]).add_parser(sub)  # torch only when an export runs
    __import__("skyrt.runtime.fleet.cli", fromlist=["add_parser"]).add_parser(sub)  # Ray only when a fleet command runs
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `skyrt` command; returns its exit code (in-process: tests call this)."""
    return _dispatch(build_parser().parse_args(argv))


def run() -> None:
    """The `skyrt` console command. A server that has shut down leaves without the interpreter's
    teardown (see exit_without_teardown: a SIGTERM'd server must be gone within 2 s)."""
    args = build_parser().parse_args()
    code = _dispatch(args)
    if args.command == "serve":
        from .server.startup import exit_without_teardown

        exit_without_teardown(code)
    sys.exit(code)


def _dispatch(args) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
        if args.command in ("export", "fleet"):
            return args.run(args)
        if args.command == "caption":
            return _caption(args)
    except CaptionParseError as err:
        # The model's own words are the only clue to what went wrong: show them whole.
        print(f"skyrt {args.command}: error: the captioner's output is not a valid caption: {err}\n"
              f"raw output:\n{err.raw}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, CaptionerSetupError) as err:  # RequestError is a ValueError
        # Bad input: one clear line, no traceback.
        print(f"skyrt {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1


def _load(args):
    from .api import load

    return load(args.model, backend=args.backend, device=args.device, preset=args.preset)


def _sampling_kwargs(args) -> dict:
    """Pipeline.generate / stream arguments from the flags, unset ones resolved against the model."""
    from .default_model import default_model_dir

    _resolve_sampling_defaults(args, args.model.expanduser() if args.model is not None else default_model_dir())
    keys = [f.name for f in cli_settings(exclude=STREAM_EXCLUDED)] + ["image"]  # generate passes num_frames itself
    return {k: getattr(args, k) for k in keys}


def _open_captioner(args, folder: Path | None, why: str):
    """The Captioner of `folder` (else $SKYRT_CAPTIONER); none given is an error that says `why` one is
    needed and how to pass it. Nothing is ever downloaded: the user points at the checkpoint."""
    from .captioner import open_captioner

    if folder is None and os.environ.get(CAPTIONER_ENV):
        folder = Path(os.environ[CAPTIONER_ENV])
    if folder is None:
        raise ValueError(f"{why}: pass --captioner DIR (a SkyCaptioner-V1 checkpoint folder, e.g. a download of "
                         f"Skywork/SkyCaptioner-V1, or its 'skyrt export onnx --captioner' folder) or set "
                         f"{CAPTIONER_ENV}; skyrt does not download models")
    return open_captioner(folder, backend=getattr(args, "captioner_backend", "onnxruntime"),
                          threads=getattr(args, "threads", None), progress=not getattr(args, "no_progress", False))


def _caption(args) -> int:
    """`skyrt caption VIDEO`: the T2V prompt rendering (default) or the structured JSON."""
    from .caption_schema import to_t2v_prompt

    if not args.video.is_file():  # before opening the captioner: that may take a first-use export
        raise FileNotFoundError(f"video {args.video} not found")
    captioner = _open_captioner(args, args.captioner, "skyrt caption needs the SkyCaptioner-V1 model")
    caption = captioner.caption_video(args.video, strict=args.strict, max_new_tokens=args.max_new_tokens)
    if caption.issues:
        print(f"skyrt caption: warning: {'; '.join(caption.issues)}", file=sys.stderr)
    print(caption.to_json(indent=2) if args.json else to_t2v_prompt(caption))
    return 0


def _generate_prompt(args) -> str:
    """--prompt; else, with --video, the T2V rendering of the video's caption; else the default prompt."""
    from .caption_schema import to_t2v_prompt

    if args.prompt is not None:
        return args.prompt
    if args.video is None:
        return DEFAULT_PROMPT
    why = "--video without --prompt takes the prompt from a caption of the video (or pass --prompt TEXT)"
    captioner = _open_captioner(args, args.captioner, why)
    prompt = to_t2v_prompt(captioner.caption_video(args.video))
    if not prompt:
        raise ValueError(f"the caption of {args.video} renders to an empty prompt; pass --prompt TEXT")
    print(f"prompt (caption of {args.video}): {prompt}")
    return prompt


def _generate(args) -> int:
    from .video_io import write_mp4

    block_size_given = args.causal_block_size is not None
    # Captioning first: a missing captioner fails before the DiT loads, and its memory is freed by then.
    sampling = {**_sampling_kwargs(args), "prompt": _generate_prompt(args)}
    num_frames = args.num_frames
    if not block_size_given and args.video is None:
        num_frames = _window_frames_in_whole_blocks(num_frames, sampling)
    pipe = _load(args)
    frames = pipe.generate(num_frames=num_frames, video=args.video, end_image=args.end_image,
                           progress=not args.no_progress, **sampling)
    count = write_mp4(frames, args.output, fps=args.fps)
    print(f"wrote {args.output}: {count} frames, {frames.shape[2]}x{frames.shape[1]} at {args.fps} fps")
    return 0


def _window_frames_in_whole_blocks(num_frames: int, sampling: dict) -> int:
    """Window mode refuses a clip whose latent frames do not split into causal blocks (the official
    code leaves the rest as noise). When the block size is the model's recommendation rather than the
    user's choice, a default must not make the command fail: round the clip to whole blocks (up, unless
    that overflows the window) and say so. kvcache mode takes any frame count, and a long
    (multi-window) video keeps its own checks."""
    from . import latents as lat

    block = sampling["causal_block_size"]
    overlap = sampling["overlap_history"]
    single_window = overlap is None or num_frames <= sampling["base_num_frames"]
    if sampling["mode"] != "window" or not single_window or (num_frames - 1) % lat.TEMPORAL_FACTOR:
        return num_frames
    latent = lat.latent_length(num_frames)
    if latent % block == 0:
        return num_frames
    up, down = lat.pixel_length(-(-latent // block) * block), lat.pixel_length(latent // block * block)
    rounded = up if up <= sampling["base_num_frames"] or down < 1 else down  # one window holds at most base frames
    print(f"skyrt generate: note: {num_frames} frames are {latent} latent frames, not whole blocks of the model's "
          f"causal_block_size={block} in window mode; generating {rounded} frames (pass --num-frames "
          f"{rounded}, --causal-block-size 1 or --mode kvcache to choose)", file=sys.stderr)
    return rounded


def _serve(args) -> int:
    from .server import load_playlist, serve
    from .server.startup import StartupInterrupted, resolve_token, sigterm_sets

    token = resolve_token(args.token, args.token_file, args.no_token)
    sampling, prompt = serve_sampling(args)  # first: it resolves --fps (a preset's, else 24)
    config = server_config(args, token.token)
    playlist = load_playlist(args.playlist, config.limits) if args.playlist is not None else None
    captioning = _live_captioning(args)  # before loading the model: a bad captioner folder fails fast
    # The pipeline loads and runs in a child process (server/generator_process.py): serving never
    # shares an interpreter lock with generation.
    spec = pipeline_spec(args)
    try:
        with sigterm_sets(threading.Event()) as stopped:  # a stop while the model loads is a clean exit too
            serve(spec, sampling, config, host=args.host, port=args.port, prompt=prompt, playlist=playlist,
                  show_token=token.generated, startup_cancelled=stopped, **captioning)
    except StartupInterrupted:
        print("skyrt serve: stopped (SIGTERM) before the stream started", file=sys.stderr)
    return 0


def server_config(args, token: str | None):
    """The ServerConfig of parsed `skyrt serve` flags (`skyrt fleet` builds each stream's the same way)."""
    from .server import ConnectionLimits, ServerConfig
    from .server.llhls import PART_TARGET_S

    return ServerConfig(fps=args.fps, formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
                        token=token, allowed_hosts=tuple(h.lower() for h in args.allowed_host),
                        connections=ConnectionLimits(args.max_connections, args.max_connections_per_address),
                        state_path=args.state, write_timeout_s=args.stall_timeout,
                        stream_send_buffer_bytes=args.send_buffer_kib * 1024,
                        publish=tuple(getattr(args, "publish", ())),
                        ll_hls_part_s=getattr(args, "ll_hls_part", PART_TARGET_S))


def pipeline_spec(args):
    """The PipelineSpec (model, backend, device, preset) the stream's child process loads (`skyrt fleet`
    builds each stream's the same way)."""
    from .server.generator_process import PipelineSpec

    return PipelineSpec(None if args.model is None else str(args.model.expanduser()), args.backend, args.device,
                        options={} if args.preset is None else {"preset": args.preset})


def serve_sampling(args):
    """(Pipeline.stream keywords without the prompt, the first PromptChange) of parsed `skyrt serve`
    flags, unset ones resolved against the model's recommendation."""
    from .server import PromptChange

    sampling = _sampling_kwargs(args)
    prompt = PromptChange(sampling.pop("prompt"), sampling.pop("negative_prompt") or None)
    if args.mode == "kvcache" and sampling["ar_step"] == 0:
        sampling["ar_step"] = args.num_inference_steps  # one block in flight: the lowest latency per block
    return sampling, prompt


def _live_captioning(args) -> dict:
    """serve()'s captioner and caption_every_s: on with --captioner or --caption-every (a captioner from
    $SKYRT_CAPTIONER alone does not start captioning: it costs generated frames/s)."""
    if args.captioner is None and args.caption_every is None:
        return {}
    every = DEFAULT_CAPTION_EVERY_S if args.caption_every is None else args.caption_every
    if every <= 0:
        raise ValueError(f"--caption-every must be a positive number of seconds, got {args.caption_every:g}")
    captioner = _open_captioner(args, args.captioner, "--caption-every needs a captioner")
    return {"captioner": captioner, "caption_every_s": every}


if __name__ == "__main__":
    run()
