"""Frames in and out: images, videos and mp4 files as uint8 [T, H, W, 3] arrays (PyAV, Pillow).

Conversions follow the official SkyReels-V2 code: pixels in [-1, 1] are x / 127.5 - 1; frames out
are ((x / 2 + 0.5).clip(0, 1) * 255) truncated to uint8 (the official pipeline truncates, it does
not round); images are resized with Pillow's default bicubic filter to (width, height).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

import numpy as np

ImageLike = Union[str, Path, np.ndarray, "PIL.Image.Image"]  # noqa: F821
VideoLike = Union[str, Path, np.ndarray]


def load_image(image: ImageLike, width: int, height: int) -> np.ndarray:
    """Any image input -> uint8 [height, width, 3], resized like the official pipeline."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            pil = Image.open(path)
        except (OSError, ValueError) as err:  # UnidentifiedImageError is an OSError
            raise ValueError(f"{path} is not an image Pillow can read ({err}); pass a PNG, JPEG or WebP file") from None
    elif isinstance(image, np.ndarray):
        pil = Image.fromarray(_as_uint8_rgb(image, "image"))
    elif hasattr(image, "convert"):
        pil = image
    else:
        raise TypeError(f"image must be a path, a uint8 [H, W, 3] array or a PIL image, not {type(image).__name__}")
    pil = pil.convert("RGB")
    if pil.size != (width, height):
        pil = pil.resize((width, height), Image.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


def load_video(video: VideoLike, width: int, height: int) -> np.ndarray:
    """A video file or uint8 [T, H, W, 3] array -> uint8 [T, height, width, 3]."""
    if isinstance(video, (str, Path)):
        frames = read_video(video)
    elif isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"video array must be uint8 [T, H, W, 3], got shape {video.shape}")
        frames = [_as_uint8_rgb(f, "video frame") for f in video]
    else:
        raise TypeError(f"video must be a path or a uint8 [T, H, W, 3] array, not {type(video).__name__}")
    if len(frames) == 0:
        raise ValueError("video has no frames")
    return np.stack([load_image(f, width, height) for f in frames])


def read_video(path: str | Path) -> list[np.ndarray]:
    """Decode every frame of a video file as uint8 [H, W, 3] (PyAV)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.FFmpegError as err:
        raise ValueError(f"{path} is not a video PyAV can read ({err}); pass an mp4, webm or mkv file") from None


def to_model_pixels(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1] (official x / (255 / 2) - 1)."""
    return (frames.astype(np.float32) / (255.0 / 2.0) - 1.0).transpose(3, 0, 1, 2).copy()


def to_uint8_frames(pixels: np.ndarray) -> np.ndarray:
    """float [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (official: truncation after * 255)."""
    scaled = np.clip(pixels / 2.0 + 0.5, 0.0, 1.0) * 255.0
    return scaled.transpose(1, 2, 3, 0).astype(np.uint8)


def write_mp4(frames: Iterable[np.ndarray], path: str | Path, fps: int, crf: int = 18) -> int:
    """Write uint8 [H, W, 3] frames as H.264 (yuv420p) mp4; returns the number of frames written."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with av.open(str(path), mode="w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                height, width = frame.shape[:2]
                if height % 2 or width % 2:
                    raise ValueError(f"H.264 yuv420p needs even frame sizes, got {width}x{height}")
                stream = container.add_stream("libx264", rate=fps)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.options = {"crf": str(crf), "preset": "veryfast"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
            count += 1
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return count


def _as_uint8_rgb(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{what} must be uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return array
