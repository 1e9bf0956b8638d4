"""`skyrt export onnx`: every graph of a model folder (or of the captioner) as ONNX, with a manifest.json.

    skyrt export onnx --model DIR --out DIR [--precision fp32|fp16|bf16] [--height 544 --width 960]
                      [--block-frames 1 --cache-blocks 9 --window-frames 25]
    skyrt export onnx --captioner SkyCaptioner-V1/ --out DIR [--precision fp32|fp16]
    skyrt export onnx --preset NAME --model DIR --out DIR [--sink-blocks 1 --window-blocks 5]
    skyrt export engine --onnx DIR --out DIR          # either kind of export folder
    skyrt export engine --preset NAME --model DIR --onnx DIR --out DIR   # the preset's ONNX, then engines
    python -m skyrt.export.export_cli onnx ...      # the same without the skyrt entry point

This module imports no torch at import time: `skyrt serve` builds the whole CLI parser, and only
running an export loads torch (export/onnx_export.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `export` (with its `onnx` subcommand) on the skyrt CLI's subparsers."""
    export = subparsers.add_parser("export", help="export models: ONNX graphs, then engines")
    export.set_defaults(run=run)
    kinds = export.add_subparsers(dest="export_kind", required=True)
    onnx = kinds.add_parser("onnx", help="export every graph as ONNX plus manifest.json",
                            description="Export the text encoder, DiT (window and KV-cached step), cross-attention "
                                        "K/V and streaming VAE graphs of a model folder, or (--captioner) the "
                                        "SkyCaptioner-V1 vision tower and decoder.")
    source = onnx.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None,
                        help="model folder (official or diffusers layout); default: skyrt's built-in tiny model")
    source.add_argument("--captioner", type=Path, default=None,
                        help="SkyCaptioner-V1 / Qwen2.5-VL checkpoint folder: export the captioner instead "
                             "(takes --precision, --opset, --external-data-threshold, --no-progress)")
    source.add_argument("--tiny-decoder", type=Path, default=None,
                        help="TAEHV's taew2_1.pth / .safetensors: export its streaming step graph for --height x "
                             "--width instead (what --decoder tiny runs on --backend onnxruntime)")
    onnx.add_argument("--out", type=Path, required=True, help="output folder (created)")
    onnx.add_argument("--precision", choices=("fp32", "fp16", "bf16", "fp8"), default="fp32",
                      help="fp32 (default), fp16, bf16 or fp8; fp16/bf16 DiT graphs keep norms, RoPE and time "
                           "embedding fp32; fp8 = the fp16 graphs with the DiT's GEMM weights in FP8 E4M3 "
                           "(weight-only Q/DQ, export/quantize.py; engines for compute capability 8.9+); the "
                           "captioner exports fp32 or fp16")
    onnx.add_argument("--height", type=int, default=None, help="pixel height, multiple of 16 (default 544)")
    onnx.add_argument("--width", type=int, default=None, help="pixel width, multiple of 16 (default 960)")
    onnx.add_argument("--block-frames", type=int, default=None,
                      help="latent frames per causal block, baked into dit_step (default 1)")
    onnx.add_argument("--cache-blocks", type=int, default=None,
                      help="KV-cache ring slots, sink + window blocks (default 9)")
    onnx.add_argument("--max-active-blocks", type=int, default=None,
                      help="most blocks one dit_step call denoises (TensorRT profile maximum; default 6)")
    onnx.add_argument("--window-frames", type=int, default=None,
                      help="most latent frames of a dit_window call (default 25 = 97 pixel frames)")
    onnx.add_argument("--window-attention", choices=("full", "causal", "both"), default=None,
                      help="window graphs: full attention, block-causal, or both (default full)")
    onnx.add_argument("--graphs", default=None,
                      help="comma-separated subset of graphs (default: all for the profile)")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    onnx.add_argument("--external-data-threshold", type=int, default=None,
                      help="bytes of weights above which a graph keeps them in <graph>.onnx.data (default 1.8e9)")
    onnx.add_argument("--model-hash", default=None, help=argparse.SUPPRESS)  # recorded in the manifest
    onnx.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_preset_arguments(onnx)
    engine = kinds.add_parser("engine", help="build TensorRT / TensorRT-RTX engines from an ONNX export",
                              description="One engine per graph of an ONNX export folder, each with a manifest "
                                          "(ONNX hash, precision, profile, builder version, compute capabilities).")
    engine.add_argument("--onnx", type=Path, required=True,
                        help="folder written by 'skyrt export onnx' (--model, --preset, --captioner or --tiny-decoder)")
    engine.add_argument("--out", type=Path, required=True, help="engine folder (created)")
    engine.add_argument("--builder", choices=("auto", "tensorrt-rtx", "tensorrt"), default="auto",
                        help="auto (default): tensorrt when it is installed, else tensorrt-rtx; tensorrt-rtx builds without "
                             "a GPU for RTX GPUs; tensorrt builds on the GPU that runs it")
    engine.add_argument("--compute-capability", action="append", default=None,
                        help="TensorRT-RTX target, repeatable (default: 8.0 8.6 8.9 12.0; TensorRT-RTX 1.7 cannot "
                             "build fp32/bf16 GEMMs for 7.5)")
    engine.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder level 0-5 (default 3)")
    engine.add_argument("--workspace-gib", type=float, default=None, help="cap on builder scratch memory")
    engine.add_argument("--graphs", default=None, help="comma-separated subset of graphs (default: all)")
    engine.add_argument("--no-progress", action="store_true", help="no progress bar")
    engine.add_argument("--model", type=Path, default=None, help="with --preset: the preset's model folder")
    engine.add_argument("--precision", choices=("fp32", "fp16", "bf16", "fp8"), default="fp32",
                        help="with --preset: the precision of the ONNX graphs the engines are built from (fp8: "
                             "FP8 weights, engines for 8.9 and 12.0 only: FP8 GEMMs need Ada or later)")
    engine.add_argument("--height", type=int, default=None, help="with --preset: pixel height (default the preset's)")
    engine.add_argument("--width", type=int, default=None, help="with --preset: pixel width (default the preset's)")
    _add_preset_arguments(engine)
    return export


def _add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset and its options (export/preset_export.py), on `export onnx` and `export engine`."""
    from skyrt.runtime.causal_family import PRESETS  # torch-free

    parser.add_argument("--preset", default=None, choices=tuple(PRESETS),
                        help="export a causal-family preset's graphs from --model (its checkpoint and LoRA, merged): "
                             "dit_step in its blocks and ring, dit_step_full, umT5 and the VAE")
    parser.add_argument("--sink-blocks", type=int, default=None, help="with --preset: ring sink blocks (default the preset's)")
    parser.add_argument("--window-blocks", type=int, default=None,
                        help="with --preset: ring window blocks (default the preset's)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="with --preset: the checkpoint file to read")
    parser.add_argument("--lora", type=Path, default=None, help="with --preset: the LoRA file to merge")
    parser.add_argument("--lora-alpha", type=float, default=None,
                        help="with --preset: the LoRA's alpha (default the preset's)")


def run(args: argparse.Namespace) -> int:
    """Run `skyrt export onnx|engine` from parsed arguments."""
    if args.export_kind == "engine":
        return run_engine(args)
    return run_onnx(args)


def run_engine(args: argparse.Namespace) -> int:
    """Build engines (torch-free) and put the ONNX manifest and tokenizer beside them; with --preset,
    export the preset's ONNX graphs into --onnx first (torch)."""
    from skyrt.runtime.tiny_decoder import is_tiny_decoder_export

    from .engine import (BuildOptions, graphs_from_onnx_manifest, pick_builder, write_engine_folder,
                         write_tiny_decoder_engine_folder)

    if args.preset is None and is_tiny_decoder_export(args.onnx):  # `export onnx --tiny-decoder`'s folder
        options = BuildOptions(builder=pick_builder(args.builder), optimization_level=args.optimization_level,
                               workspace_gib=args.workspace_gib, compute_capabilities=args.compute_capability)
        path = write_tiny_decoder_engine_folder(args.onnx, args.out, options, progress=not args.no_progress)
        print(f"wrote the tiny decoder's engine {path} (--decoder tiny on --backend tensorrt: --decoder-path {args.out})")
        return 0
    if args.preset is not None:
        if args.model is None:
            raise ValueError("--preset needs --model FOLDER (the preset's checkpoint beside the Wan2.1 files)")
        _export_preset(args, args.onnx)

    specs = graphs_from_onnx_manifest(args.onnx)
    if args.graphs:
        wanted = {g.strip() for g in args.graphs.split(",") if g.strip()}
        unknown = wanted - {s.name for s in specs}
        if unknown:
            raise ValueError(f"{args.onnx} has no graph(s) {', '.join(sorted(unknown))}")
        specs = [s for s in specs if s.name in wanted]
    options = BuildOptions(builder=pick_builder(args.builder), optimization_level=args.optimization_level,
                           workspace_gib=args.workspace_gib, compute_capabilities=args.compute_capability)
    paths = write_engine_folder(args.onnx, args.out, options, progress=not args.no_progress, graphs=specs)
    print(f"wrote {len(paths)} engines to {args.out}")
    return 0


# `export onnx` options that shape the video model's graphs and mean nothing to the captioner.
# The captioner's export precisions (export/captioner/export.py PRECISIONS; that module imports torch).
CAPTIONER_PRECISIONS = ("fp32", "fp16")
DIT_ONLY_OPTIONS = ("height", "width", "block_frames", "cache_blocks", "max_active_blocks", "window_frames",
                    "window_attention", "graphs", "model_hash", "preset")


def run_captioner_onnx(args: argparse.Namespace) -> int:
    """`skyrt export onnx --captioner DIR`: the captioner's graphs (official 16 frames at 420x360)."""
    given = [f"--{name.replace('_', '-')}" for name in DIT_ONLY_OPTIONS if getattr(args, name, None) is not None]
    if given:
        # Refuse rather than ignore: a user passing --height expects it to change something.
        raise ValueError(f"{', '.join(given)} shape(s) the video model's graphs; the captioner export takes only "
                         "--precision, --opset, --external-data-threshold and --no-progress")
    if args.precision not in CAPTIONER_PRECISIONS:  # before torch is imported
        raise ValueError(f"--precision {args.precision}: the captioner exports {' or '.join(CAPTIONER_PRECISIONS)}")
    from .captioner.export import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, export_captioner_onnx

    threshold = args.external_data_threshold or EXTERNAL_DATA_THRESHOLD
    manifest = export_captioner_onnx(args.captioner, args.out, precision=args.precision, progress=not args.no_progress,
                                     opset=args.opset or DEFAULT_OPSET, external_data_threshold=threshold)
    print(f"wrote {len(manifest['graphs'])} captioner graphs and {args.out / 'manifest.json'}")
    return 0


# `export onnx` options a preset fixes itself (its block, its blocks in flight, no window graphs).
PRESET_FIXED_OPTIONS = ("block_frames", "cache_blocks", "max_active_blocks", "window_frames", "window_attention")
PRESET_ONLY_OPTIONS = ("sink_blocks", "window_blocks", "checkpoint", "lora", "lora_alpha")


def _export_preset(args: argparse.Namespace, out: Path) -> dict:
    """`--preset NAME --model DIR`: the preset's graphs (export/preset_export.py) into `out`."""
    given = [f"--{n.replace('_', '-')}" for n in PRESET_FIXED_OPTIONS if getattr(args, n, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: the {args.preset} preset fixes its block size, blocks in flight and "
                         "attention; set its ring with --sink-blocks / --window-blocks")
    from .preset_export import export_preset_onnx

    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if getattr(args, "graphs", None) else None
    manifest = export_preset_onnx(
        args.model, out, args.preset, height=args.height, width=args.width, sink_blocks=args.sink_blocks,
        window_blocks=args.window_blocks, precision=args.precision, graphs=graphs, progress=not args.no_progress,
        opset=getattr(args, "opset", None), external_data_threshold=getattr(args, "external_data_threshold", None),
        model_hash=getattr(args, "model_hash", None), checkpoint=args.checkpoint, lora=args.lora,
        lora_alpha=args.lora_alpha)
    print(f"wrote {len(manifest['graphs'])} graphs of the {args.preset} preset and {out / 'manifest.json'}")
    return manifest
def run_tiny_decoder_onnx(args: argparse.Namespace) -> int:
    """`skyrt export onnx --tiny-decoder FILE --height H --width W`: the tiny decoder's step graph folder."""
    if args.height is None or args.width is None:
        raise ValueError("--tiny-decoder exports one fixed size: give --height and --width (pixels, multiples of 8)")
    if args.precision != "fp32":
        raise ValueError("--tiny-decoder exports fp32 (its graph is small: fp16 saves little)")
    from .tiny_vae import export_tiny_decoder_folder

    out = export_tiny_decoder_folder(args.tiny_decoder, args.out, args.height, args.width)
    print(f"wrote the tiny decoder's step graph for {args.height}x{args.width} to {out}")
    return 0


def run_onnx(args: argparse.Namespace) -> int:
    """Run `skyrt export onnx` from parsed arguments; prints where the manifest went."""
    if args.captioner is not None:
        return run_captioner_onnx(args)
    if args.tiny_decoder is not None:
        return run_tiny_decoder_onnx(args)
    if args.preset is not None:
        if args.model is None:
            raise ValueError("--preset needs --model FOLDER (the preset's checkpoint beside the Wan2.1 files)")
        _export_preset(args, args.out)
        return 0
    given = [f"--{n.replace('_', '-')}" for n in PRESET_ONLY_OPTIONS if getattr(args, n, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} are options of a preset export: add --preset NAME")
    from .onnx_export import export_onnx, profile_from_options

    profile = profile_from_options(
        height=args.height, width=args.width, block_frames=args.block_frames, cache_blocks=args.cache_blocks,
        max_active_blocks=args.max_active_blocks, window_frames=args.window_frames,
        window_attention=args.window_attention, precision=args.precision, opset=args.opset,
        external_data_threshold=args.external_data_threshold)
    model = args.model
    if model is None:
        from skyrt.runtime.default_model import default_model_dir

        model = default_model_dir()
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    manifest = export_onnx(model, args.out, profile, graphs=graphs, progress=not args.no_progress,
                           model_hash=args.model_hash)
    print(f"wrote {len(manifest['graphs'])} graphs and {args.out / 'manifest.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyrt.export.export_cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"skyrt export: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
