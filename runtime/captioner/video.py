"""Step 1 of captioning: 16 frames of a video file, picked and sized as the official script does."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import NUM_FRAMES, OFFICIAL_FRAME_SIZE



def sample_frame_indices(total_frames: int, num_frames: int = NUM_FRAMES) -> list[int]:
    """Uniform indices as the official script picks them: round(i * (total - 1) / num_frames) for
    i < num_frames, clipped to the last frame (short clips repeat frames)."""
    if total_frames < 1:
        raise ValueError("the video has no frames")
    step = max(0.0, (total_frames - 1) / num_frames)
    return [min(int(np.round(step * i)), total_frames - 1) for i in range(num_frames)]


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        # Demuxing counts packets without decoding; the header's frame count is often absent or wrong.
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def read_video_frames(path: str | Path, num_frames: int = NUM_FRAMES,
                      size: tuple[int, int] | None = OFFICIAL_FRAME_SIZE) -> np.ndarray:
    """`num_frames` frames of a video file as uint8 [T, H, W, 3] RGB (PyAV).

    size=(height, width) resizes every frame with FFmpeg's scaler (default: the official 420x360,
    aspect ignored, as decord does there); None keeps the video's size.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found")
    wanted = sample_frame_indices(_count_frames(path), num_frames)
    picked: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            if index > wanted[-1]:
                break
            if index in wanted:
                if size is not None:
                    frame = frame.reformat(width=size[1], height=size[0], format="rgb24")
                picked[index] = frame.to_ndarray(format="rgb24")
    missing = [i for i in wanted if i not in picked]
    if missing:
        raise ValueError(f"{path}: could not decode frames {missing[:5]} (counted {wanted[-1] + 1}+ frames)")
    return np.stack([picked[i] for i in wanted])

