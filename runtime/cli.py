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

from . import registry
from .caption_schema import MAX_NEW_TOKENS, CaptionParseError
from .captioner import CAPTIONER_ENV, CaptionerSetupError
from .causal_family import PRESETS
from .request import DEFAULTS, RECOMMENDED_KEYS, STREAM_EXCLUDED, cli_settings, setting_type
from .resolve import COMMAND_LINE, Settings

DEFAULT_PROMPT = "a red circle bouncing on a dark blue background"
# `skyrt serve --captioner DIR` without --caption-every captions the stream this often.
DEFAULT_CAPTION_EVERY_S = 30.0
# What `skyrt generate` runs on a model without a recommendation (a real SkyReels-V2 checkpoint): the
# request type's defaults, the official T2V settings. Models with a demo_model.json recommend their own.
OFFICIAL_SAMPLING = {key: DEFAULTS[key] for key in RECOMMENDED_KEYS}
# `skyrt serve` (and every stream of `skyrt fleet`): small, fast settings, the command's own layer of the
# request (runtime/resolve.py): under the model's recommendation, a preset and every flag given.
SERVE_DEFAULTS = {"height": 128, "width": 128, "num_inference_steps": 4, "guidance_scale": 1.0, "mode": "kvcache",
                  "base_num_frames": 17, "overlap_history": 5, "overlap_carry": "latent"}
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
    p.add_argument("--decoder", default="wan", choices=("wan", "tiny"),
                   help="wan: the Wan2.1 VAE decodes (default); tiny: TAEHV's taew2_1 (much cheaper; torch, onnxruntime "
                        "and tensorrt backends): the model folder's taew2_1.safetensors / taew2_1.pth, or --decoder-path")
    p.add_argument("--decoder-path", type=Path, default=None,
                   help="with --decoder tiny: the tiny decoder's weights file, or an export folder of it (skyrt export "
                        "onnx --tiny-decoder; on tensorrt also its engine folder: skyrt export engine --onnx THAT)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="one CUDA graph per DiT step shape, captured once and replayed (--backend tensorrt, or torch "
                        "with --device cuda: its fixed-shape step, the whole ring under a mask)")


def _add_sampling_args(p: argparse.ArgumentParser, command_defaults: dict, exclude: tuple[str, ...] = ()) -> None:
    """Sampling flags, one per GenerationRequest field the command line takes (runtime/request.py: its
    flag, type, choices and one-line doc). Every flag defaults to None, "not given" (the command line
    cannot spell None): the flags given are the user's layer of the request, whatever their values, and
    the rest come from the lower layers (`command_defaults`, the model's recommendation, a preset)."""
    for f in cli_settings(exclude):
        options: dict = {"dest": f.name, "default": None,
                         "help": f"{f.metadata['doc']}; {_default_help(command_defaults, f)}"}
        kind = setting_type(f)
        if kind is not str:
            options["type"] = kind
        if f.metadata["choices"] is not None:
            options["choices"] = f.metadata["choices"]
        if f.name == "prompt":
            options["help"] = command_defaults.get("prompt_help", f.metadata["doc"])
        p.add_argument("--" + f.metadata["cli"], **options)
    p.add_argument("--image", default=None, help="first frame (I2V)")
    p.add_argument("--explain", action="store_true",
                   help="print the resolved request, every setting with the layer it came from (default, command, "
                        "model, preset, user, derived), and exit without generating")


def _default_help(command_defaults: dict, f) -> str:
    value = command_defaults.get(f.name, DEFAULTS.get(f.name))
    if f.metadata["recommended"]:
        return f"default: a preset's, else the model's recommendation (demo_model.json), else {value}"
    if f.name == "fps":
        return f"default: a preset's, else {value}"
    return f"default {value}"


def cli_user_settings(args, exclude: tuple[str, ...] = ()) -> dict:
    """The sampling flags given on the command line (or as fleet YAML keys): only those, as given."""
    return {f.name: getattr(args, f.name) for f in cli_settings(exclude)
            if getattr(args, f.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skyrt", description="SkyReels-V2 diffusion-forcing runtime")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a video file")
    _add_model_args(gen)
    # prompt None = not given: with --video the prompt is then the video's caption (--captioner).
    _add_sampling_args(gen, {"prompt_help": f"what the video shows; default: with --video, the video's caption "
                                            f"(--captioner); else {DEFAULT_PROMPT!r}"})
    gen.add_argument("--video", default=None, help="video to extend (V2V)")
    gen.add_argument("--captioner", type=Path, default=None,
                     help=f"captions --video when no --prompt is given: {CAPTIONER_HELP}")
    gen.add_argument("--end-image", default=None, help="last frame")
    gen.add_argument("--output", "-o", type=Path, default=Path("out.mp4"), help="mp4 path")
    gen.add_argument("--no-progress", action="store_true")

    serve = sub.add_parser("serve", help="serve an endless stream (MJPEG, HLS, LL-HLS, fragmented MP4, WebRTC; RTMP push)")
    _add_model_args(serve)
    _add_sampling_args(serve, {**SERVE_DEFAULTS,
                               "prompt_help": f"the stream's first prompt; default {DEFAULT_PROMPT!r}"},
                       exclude=STREAM_EXCLUDED)  # the flags of Pipeline.stream's settings
    serve.add_argument("--playlist", type=Path, default=None,
                       help='JSON file {"loop": true, "items": [{"prompt": "...", "duration_s": 30}, ...]}; '
                            'with a causal --preset an item may start a new stream from "image" or "video"')
    serve.add_argument("--schedule", type=Path, default=None, metavar="FILE",
                       help='YAML or JSON file {"timezone": "Europe/Berlin", "entries": [{"at": "07:00", "prompt": '
                            '"..."}, {"at": "18:00", "days": ["mon", "fri"], "playlist": {...}}]}: what the stream '
                            "shows by the wall clock, switched at block boundaries (not with --playlist)")
    serve.add_argument("--timezone", default="UTC", metavar="ZONE",
                       help="IANA time zone of a schedule that names none (default UTC), e.g. Europe/Berlin")
    serve.add_argument("--video", default=None,
                       help="a short clip the stream starts from (a causal --preset only; its last whole blocks)")
    serve.add_argument("--media-dir", type=Path, default=None,
                       help="the folder playlist items' image / video files are named in (default: the --playlist "
                            "file's folder); files outside it are refused")
    from .server.outputs import DEFAULT_FORMATS, FORMATS  # the output registry names them

    serve.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                       help=f"outputs to encode, comma separated, of {','.join(FORMATS)} (default "
                            f"{','.join(DEFAULT_FORMATS)}; "
                            f"LL-HLS comes with hls, RTMP with --publish)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", default=None,
                       help="control token (shows in the process list: prefer --token-file or $SKYRT_TOKEN); "
                            "default: one generated per run, printed at start in the page's URL")
    serve.add_argument("--token-file", type=Path, default=None, help="read the control token from this file")
    serve.add_argument("--no-token", action="store_true",
                       help="leave POST /prompt, PUT /playlist and PUT /schedule open to anyone who can reach the "
                            "server")
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
    serve.add_argument("--generator-stall", type=float, default=0.0, metavar="SECONDS",
                       help="restart the generator's process when it produces no frame for SECONDS (a hung "
                            "driver); the last frame stays on screen, /metrics counts it; default 0: off")
    serve.add_argument("--threads", type=int, default=None, metavar="N",
                       help="intra-op threads of the generator (torch, OpenMP, onnxruntime); default: usable cores "
                            "minus the serving process's one; 0 leaves the libraries' defaults (one per core)")
    serve.add_argument("--state", type=Path, default=None, metavar="FILE",
                       help="keep the prompt, playlist and schedule in FILE (written atomically on every change) and the "
                            "stream itself in FILE.stream.npz (a snapshot), and resume both from there at start: "
                            "the stream continues where it stood")
    serve.add_argument("--snapshot-every", type=float, default=30.0, metavar="SECONDS",
                       help="with --state: write the stream snapshot every SECONDS (default 30; 0: only when the "
                            "server stops); a restart after a crash goes back at most this far")
    serve.add_argument("--publish", action="append", default=[], metavar="URL",
                       help="push the H.264 stream to an RTMP receiver, rtmp://HOST[:PORT]/APP/KEY (a relay, "
                            "a restream service); repeatable; reconnects with backoff")
    serve.add_argument("--max-webrtc-sessions", type=int, default=64, metavar="N",
                       help="WebRTC (WHEP) viewers at once (default 64; each holds UDP sockets and a DTLS session)")
    serve.add_argument("--max-webrtc-sessions-per-address", type=int, default=4, metavar="N",
                       help="WebRTC (WHEP) viewers at once from one client address (default 4; behind a reverse "
                            "proxy every offer comes from the proxy: raise it to --max-webrtc-sessions there)")
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
    for name in ("cli:export_parser", "cli:fleet_parser"):  # by name: runtime/registry.py says why
        registry.resolve(name)(sub)
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

    return load(args.model, backend=args.backend, device=args.device, preset=args.preset, **_decoder_kwargs(args),
                **_graph_kwargs(args))


def _graph_kwargs(args) -> dict:
    """skyrt.load's cuda_graphs= from --cuda-graphs (none when not given); onnxruntime has no such option."""
    if not getattr(args, "cuda_graphs", False):
        return {}
    if args.backend == "onnxruntime":
        raise SystemExit("--cuda-graphs: the onnxruntime backend does not capture CUDA graphs; use --backend "
                         "tensorrt, or --backend torch --device cuda")
    return {"cuda_graphs": True}


def _decoder_kwargs(args) -> dict:
    """skyrt.load's decoder= / decoder_path= from --decoder / --decoder-path (none when left default)."""
    path = getattr(args, "decoder_path", None)
    kwargs = {} if getattr(args, "decoder", "wan") == "wan" else {"decoder": args.decoder}
    return kwargs if path is None else {**kwargs, "decoder_path": str(path.expanduser())}


def _model_folder(args) -> Path:
    from .default_model import default_model_dir

    return args.model.expanduser() if args.model is not None else default_model_dir()


def explain(resolution, what: str) -> str:
    """`--explain`'s text: every setting of the request, its value and the layer it came from."""
    return (f"{what}: the request, every setting with its value and where it came from\n"
            f"(layers, lowest first: default < command < model < preset < user; then derived)\n"
            + resolution.explain())


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


def _generate_settings(args, prompt: str | None) -> Settings:
    """The request's layers from `skyrt generate`'s flags: those given are the user's; a prompt the
    command chose (the default one, a caption of --video) is the command's."""
    user = cli_user_settings(args)
    if "prompt" in user:
        return Settings(user, COMMAND_LINE)
    name = "skyrt generate" if args.video is None else "skyrt generate: the caption of --video"
    return Settings(user, COMMAND_LINE, {"prompt": prompt}, name)


def _generate(args) -> int:
    from .video_io import write_mp4

    if args.explain:  # no captioner, no model load: the model folder's files and the preset only
        from .resolve import folder_layers, resolve_request

        prompt = DEFAULT_PROMPT if args.video is None else f"<the caption of {args.video}>"
        resolution = resolve_request(_generate_settings(args, prompt), folder_layers(_model_folder(args), args.preset))
        print(explain(_in_whole_blocks(resolution, args), "skyrt generate"))
        return 0
    # Captioning first: a missing captioner fails before the DiT loads, and its memory is freed by then.
    prompt = None if args.prompt is not None else _generate_prompt(args)
    pipe = _load(args)
    resolution = _in_whole_blocks(pipe.resolve(_generate_settings(args, prompt)), args)
    frames = pipe.generate(request=resolution.request, image=args.image, video=args.video, end_image=args.end_image,
                           progress=not args.no_progress)
    fps = resolution.request.fps
    count = write_mp4(frames, args.output, fps=fps)
    print(f"wrote {args.output}: {count} frames, {frames.shape[2]}x{frames.shape[1]} at {fps} fps")
    return 0


def _in_whole_blocks(resolution, args):
    """Window mode refuses a clip whose latent frames do not split into causal blocks (the official
    code leaves the rest as noise). When the block size is not the user's choice (a model's
    recommendation), a default must not make the command fail: round the clip to whole blocks (up,
    unless that overflows the window) and say so. kvcache mode takes any frame count, and a long
    (multi-window) video or a V2V extension keeps its own checks."""
    from . import latents as lat

    req = resolution.request
    if resolution.set_by_user("causal_block_size") or args.video is not None:
        return resolution
    block, num_frames = req.causal_block_size, req.num_frames
    single_window = req.overlap_history is None or num_frames <= req.base_num_frames
    if req.mode != "window" or not single_window or (num_frames - 1) % lat.TEMPORAL_FACTOR:
        return resolution
    latent = lat.latent_length(num_frames)
    if latent % block == 0:
        return resolution
    up, down = lat.pixel_length(-(-latent // block) * block), lat.pixel_length(latent // block * block)
    rounded = up if up <= req.base_num_frames or down < 1 else down  # one window holds at most base frames
    print(f"skyrt generate: note: {num_frames} frames are {latent} latent frames, not whole blocks of the model's "
          f"causal_block_size={block} in window mode; generating {rounded} frames (pass --num-frames "
          f"{rounded}, --causal-block-size 1 or --mode kvcache to choose)", file=sys.stderr)
    return resolution.derive(f"whole blocks of causal_block_size={block} ({resolution.source('causal_block_size')})",
                             num_frames=rounded)


def _serve(args) -> int:
    from .server import load_playlist, load_schedule, serve
    from .server.startup import StartupInterrupted, resolve_token, sigterm_sets

    sampling, prompt = serve_sampling(args)
    if args.explain:  # no model load: the model folder's files and the preset only
        from .resolve import folder_layers, resolve_request

        settings = Settings({**sampling.user, "prompt": prompt.prompt}, sampling.surface, sampling.command,
                            sampling.command_name)
        resolution = resolve_request(settings, folder_layers(_model_folder(args), args.preset), stream=True)
        print(explain(resolution, "skyrt serve"))
        return 0
    token = resolve_token(args.token, args.token_file, args.no_token)
    config = server_config(args, token.token)
    if args.playlist is not None and args.schedule is not None:
        raise SystemExit("skyrt serve: give --schedule or --playlist, not both; a schedule entry may run a playlist: "
                         '{"at": "07:00", "playlist": {"items": [...]}}')
    playlist = load_playlist(args.playlist, config.limits) if args.playlist is not None else None
    schedule = load_schedule(args.schedule, config.limits, config.timezone) if args.schedule is not None else None
    captioning = _live_captioning(args)  # before loading the model: a bad captioner folder fails fast
    # The pipeline loads and runs in a child process (server/generator_process.py): serving never
    # shares an interpreter lock with generation.
    spec = pipeline_spec(args)
    try:
        with sigterm_sets(threading.Event()) as stopped:  # a stop while the model loads is a clean exit too
            serve(spec, sampling, config, host=args.host, port=args.port, prompt=prompt, playlist=playlist,
                  show_token=token.generated, startup_cancelled=stopped, schedule=schedule, **captioning)
    except StartupInterrupted:
        print("skyrt serve: stopped (SIGTERM) before the stream started", file=sys.stderr)
    return 0


def server_config(args, token: str | None):
    """The ServerConfig of parsed `skyrt serve` flags (`skyrt fleet` builds each stream's the same way)."""
    from .server import ConnectionLimits, Limits, ServerConfig
    from .server.llhls import PART_TARGET_S

    media = getattr(args, "media_dir", None)
    for named_from in ("playlist", "schedule"):  # the file's items are named from its folder
        if media is None and getattr(args, named_from, None) is not None:
            media = getattr(args, named_from).expanduser().parent
    limits = Limits(media_dir=None if media is None else str(Path(media).expanduser()))
    # fps: the stream's request's (a --fps flag is in its user layer, a preset's 16, else 24).
    return ServerConfig(fps=None, limits=limits, formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
                        token=token, allowed_hosts=tuple(h.lower() for h in args.allowed_host),
                        connections=ConnectionLimits(args.max_connections, args.max_connections_per_address),
                        state_path=args.state, write_timeout_s=args.stall_timeout,
                        stream_send_buffer_bytes=args.send_buffer_kib * 1024,
                        publish=tuple(getattr(args, "publish", ())),
                        ll_hls_part_s=getattr(args, "ll_hls_part", PART_TARGET_S),
                        max_webrtc_sessions=getattr(args, "max_webrtc_sessions", 64),
                        generator_stall_s=getattr(args, "generator_stall", 0.0),
                        max_webrtc_sessions_per_address=getattr(args, "max_webrtc_sessions_per_address", 4),
                        timezone=getattr(args, "timezone", "UTC"))


def pipeline_spec(args):
    """The PipelineSpec (model, backend, device, preset) the stream's child process loads (`skyrt fleet`
    builds each stream's the same way)."""
    from .server.generator_process import PipelineSpec
    from .threads import backend_thread_options, resolve_thread_count

    from .server.resume import snapshot_path

    state, every = getattr(args, "state", None), float(getattr(args, "snapshot_every", 30.0))
    if every < 0:
        raise SystemExit(f"skyrt serve: --snapshot-every {every:g}: give 0 (only at a stop) or a positive number "
                         "of seconds, e.g. 30")
    threads = resolve_thread_count(getattr(args, "threads", None))
    return PipelineSpec(None if args.model is None else str(args.model.expanduser()), args.backend, args.device,
                        options={**({} if args.preset is None else {"preset": args.preset}), **_decoder_kwargs(args),
                                 **_graph_kwargs(args), **backend_thread_options(args.backend, threads)},
                        threads=threads.count,
                        snapshot_path=None if state is None else str(snapshot_path(state.expanduser())),
                        snapshot_every_s=every)


def serve_sampling(args, surface: str = COMMAND_LINE):
    """(the stream's Settings without the prompt, the first PromptChange) of parsed `skyrt serve` flags:
    the flags given (on the command line, or as the fleet YAML's keys: `surface`) are the user's layer,
    SERVE_DEFAULTS the command's. The server resolves them once against the loaded model."""
    from .server import PromptChange

    user = cli_user_settings(args, exclude=STREAM_EXCLUDED)
    for start in ("image", "video"):  # inputs of the stream, not settings
        if getattr(args, start, None) is not None:
            user[start] = getattr(args, start)
    prompt = PromptChange(user.pop("prompt", DEFAULT_PROMPT), user.pop("negative_prompt", None) or None)
    return Settings(user, surface, SERVE_DEFAULTS, "skyrt serve"), prompt


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
