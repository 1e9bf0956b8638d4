"""Read a clip of the demo world back into attributes, and score it against a prompt.

The detector knows how the world renders (demo/skyrt_demo/world.py) and nothing else:
- background: per frame, the median of every pixel column (the shape covers a minority of any
  column), averaged over columns and frames -> nearest named background colour;
- shape pixels: far (in RGB) from their column's background; kept near their circular centroid,
  so stray speckles in a generated frame do not move it (positions wrap around, like the world);
- shape colour: median colour of the most distinct shape pixels -> nearest named colour;
- shape type: IoU of the pixel mask with each shape's template rendered at the same centroid and
  area (the world's own `shape_mask`), best match;
- camera pan: shift of the background's column profile between frames (circular cross-correlation,
  sub-pixel peak); panning left moves the stripes right on screen;
- motion: the centroid track, pan added back (motion labels are world motion), differenced over
  4 frames (one latent frame), classified by mean velocity against oscillation (still, left, right,
  up, down, bouncing = vertical oscillation, orbiting = both axes oscillate).

Each attribute is read per frame (or per frame pair) and decided by vote or average over the clip.
`score_clip` returns per-attribute correctness and adherence = the fraction of the five attributes
right. Ground-truth world clips score ~100% (tests/test_demo_world.py); random-weight model outputs
score near chance.

    python -m skyrt_demo.detector  # reads a few world clips and prints the scores
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .world import (ATTRIBUTE_NAMES, BACKGROUNDS, COLOURS, ORBIT_PERIOD, ORBIT_RADIUS, PAN_SPEED, SHAPES, SPEED,
                    Attributes, parse_prompt, shape_mask)

FOREGROUND_DISTANCE = 60.0  # RGB distance from the column background that makes a pixel "shape"
MIN_AREA_FRACTION = 0.004  # a shape covers at least this much of the frame (~65 px at 128x128)
MAX_AREA_FRACTION = 0.25  # more than this is not one shape
VELOCITY_LAG = 4  # frames between the positions a velocity is taken from (one latent frame)
PAN_SEARCH = 0.08  # largest pan looked for, as a fraction of the width per frame


@dataclass
class FrameReading:
    """What one frame shows: background RGB, and the shape if one was found."""

    background_rgb: np.ndarray  # float [3]
    profile: np.ndarray  # float [W]: background luminance per column, mean removed (for the pan)
    found: bool = False
    center: tuple[float, float] = (np.nan, np.nan)  # pixel (x, y), circular mean
    area: float = 0.0
    colour_rgb: np.ndarray | None = None
    shape: str | None = None
    shape_iou: float = 0.0


@dataclass
class Reading:
    """A whole clip, read: one decided value per attribute (None when undecidable) plus evidence."""

    background: str | None
    colour: str | None
    shape: str | None
    motion: str | None
    camera: str | None
    found_fraction: float
    features: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES}


@dataclass
class Score:
    """Per-attribute correctness of a clip against a prompt, and the adherence (fraction right)."""

    prompt: str
    expected: dict[str, str]
    read: dict[str, str | None]
    correct: dict[str, bool]

    @property
    def adherence(self) -> float:
        return float(np.mean([self.correct[name] for name in ATTRIBUTE_NAMES]))

    @property
    def all_correct(self) -> bool:
        return all(self.correct.values())

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "adherence": self.adherence, "correct": self.correct, "read": self.read}


# ----------------------------------------------------------------------------------------------
# Per frame


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    dist = [float(np.linalg.norm(rgb - np.asarray(table[n], np.float64))) for n in names]
    return names[int(np.argmin(dist))]


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _circular_mean(coords: np.ndarray, weights: np.ndarray, period: int) -> float:
    """Weighted mean of positions on a circle of `period` pixels (a shape may straddle an edge)."""
    angle = 2 * np.pi * coords / period
    mean = np.arctan2((weights * np.sin(angle)).sum(), (weights * np.cos(angle)).sum())
    return float((mean / (2 * np.pi) * period) % period)


@lru_cache(maxsize=None)
def _unit_areas() -> dict[str, float]:
    """Area of each shape per r^2 (rendered at a large radius, so edge effects are negligible)."""
    r = 40.0
    return {s: float(shape_mask(s, 256, 256, 128.0, 128.0, r).sum()) / r**2 for s in SHAPES}


def read_frame(frame: np.ndarray) -> FrameReading:
    """frame uint8 [H, W, 3] -> FrameReading."""
    img = frame.astype(np.float64)
    H, W, _ = img.shape
    columns = np.median(img, axis=0)  # [W, 3]: the shape never fills half a column
    reading = FrameReading(background_rgb=columns.mean(axis=0), profile=_luminance(columns) - _luminance(columns).mean())
    dist = np.linalg.norm(img - columns[None], axis=-1)  # [H, W]
    mask = dist > FOREGROUND_DISTANCE
    if mask.sum() < MIN_AREA_FRACTION * H * W:
        return reading
    ys, xs = np.nonzero(mask)
    cx, cy = xs + 0.5, ys + 0.5
    w = np.ones_like(cx)
    for _ in range(2):  # centroid, then again over the pixels near it (drops far speckles)
        mx, my = _circular_mean(cx, w, W), _circular_mean(cy, w, H)
        dx = (cx - mx + W / 2) % W - W / 2
        dy = (cy - my + H / 2) % H - H / 2
        radius = np.sqrt(max(w.sum(), 1.0) / np.pi)
        w = (np.hypot(dx, dy) < 2.5 * radius).astype(np.float64)
    area = w.sum()
    if not (MIN_AREA_FRACTION * H * W <= area <= MAX_AREA_FRACTION * H * W):
        return reading
    mx, my = _circular_mean(cx, w, W), _circular_mean(cy, w, H)
    keep = w > 0
    strong = dist[ys[keep], xs[keep]]
    core = strong >= np.median(strong)  # the most distinct half: shape interiors, not blurred edges
    colour = np.median(img[ys[keep][core], xs[keep][core]], axis=0)
    reading.found, reading.center, reading.area, reading.colour_rgb = True, (mx, my), float(area), colour
    binary = np.zeros((H, W), dtype=bool)
    binary[ys[keep], xs[keep]] = True
    best, best_iou = None, -1.0
    for shape, unit in _unit_areas().items():
        template = shape_mask(shape, H, W, mx, my, float(np.sqrt(area / unit))) >= 0.5
        iou = float((template & binary).sum() / max((template | binary).sum(), 1))
        if iou > best_iou:
            best, best_iou = shape, iou
    reading.shape, reading.shape_iou = best, best_iou
    return reading


def read_frame_attributes(frame: np.ndarray) -> dict[str, str | None]:
    """The attributes one frame shows on its own (no motion, no pan): background, colour, shape."""
    r = read_frame(frame)
    return {"background": _nearest(r.background_rgb, BACKGROUNDS),
            "colour": _nearest(r.colour_rgb, COLOURS) if r.found else None,
            "shape": r.shape if r.found else None}


# ----------------------------------------------------------------------------------------------
# Over a clip


def _profile_shift(a: np.ndarray, b: np.ndarray, max_shift: int) -> float:
    """Sub-pixel s such that b(x) ~ a(x - s) (b is a moved s pixels to the right), circularly."""
    shifts = np.arange(-max_shift, max_shift + 1)
    corr = np.array([float(np.dot(np.roll(a, s), b)) for s in shifts])
    i = int(np.argmax(corr))
    if 0 < i < len(corr) - 1:  # parabola through the peak and its neighbours
        denom = corr[i - 1] - 2 * corr[i] + corr[i + 1]
        if denom < 0:
            return float(shifts[i] + 0.5 * (corr[i - 1] - corr[i + 1]) / denom)
    return float(shifts[i])


def _vote(values: list) -> str | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    names, counts = np.unique(values, return_counts=True)
    return str(names[int(np.argmax(counts))])


def classify_motion(world: np.ndarray, height: int, width: int) -> tuple[str | None, dict]:
    """World track float [T, 2] pixels (NaN where no shape) -> motion name and the features used.

    Velocities are taken over VELOCITY_LAG frames in frame-relative units and compared with the
    world's own speeds: linear motions have a mean velocity that dominates its oscillation;
    bouncing oscillates vertically only; orbiting oscillates on both axes; still barely moves.
    """
    lag = min(VELOCITY_LAG, max(1, len(world) - 1))
    v = (world[lag:] - world[:-lag]) / lag / np.array([width, height], dtype=np.float64)  # [T - lag, 2]
    v = v[np.isfinite(v).all(axis=1)]
    if len(v) < 2:
        return None, {}
    mean, spread = v.mean(axis=0), v.std(axis=0)
    rms = float(np.sqrt((v**2).sum(axis=1).mean()))
    features = {"mean_velocity": mean.tolist(), "velocity_std": spread.tolist(), "rms_speed": rms}
    if rms < 0.35 * SPEED:
        return "still", features
    axis = int(np.argmax(np.abs(mean)))
    if abs(mean[axis]) > 0.5 * SPEED and spread.max() < 0.5 * abs(mean[axis]):
        return (("left", "right") if axis == 0 else ("up", "down"))[int(mean[axis] > 0)], features
    orbit_std = 2 * np.pi * ORBIT_RADIUS / ORBIT_PERIOD / np.sqrt(2)  # per-axis velocity std of an orbit
    if min(spread) > 0.35 * max(spread) and min(spread) > 0.25 * orbit_std:
        return "orbiting", features
    if spread[1] > spread[0]:
        return "bouncing", features
    return None, features  # horizontal oscillation: no motion of the world does that


def unwrap_track(centers: np.ndarray, width: int, height: int) -> np.ndarray:
    """Screen centres float [T, 2] (NaN where no shape was found) -> the same track unwrapped across the
    frame edges (positions wrap around), NaN kept where no shape was found.

    Steps are taken between consecutive frames that found the shape, so a hole (a generated frame
    where the shape fades, often the first one) neither loses the motion made across it nor, at the
    start, leaves the whole track undefined.
    """
    track = np.full_like(centers, np.nan)
    found = np.flatnonzero(np.isfinite(centers).all(axis=1))
    if len(found) == 0:
        return track
    period = np.array([width, height], dtype=np.float64)
    steps = np.diff(centers[found], axis=0)  # [n - 1, 2]
    steps = (steps + period / 2) % period - period / 2  # shortest way round
    track[found] = centers[found[0]] + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    return track


def read_clip(frames: np.ndarray) -> Reading:
    """frames uint8 [T, H, W, 3] -> Reading."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got shape {frames.shape}")
    T, H, W, _ = frames.shape
    per_frame = [read_frame(f) for f in frames]
    background = _nearest(np.mean([r.background_rgb for r in per_frame], axis=0), BACKGROUNDS)
    found = [r for r in per_frame if r.found]
    colour = _vote([_nearest(r.colour_rgb, COLOURS) for r in found])
    shape = _vote([r.shape for r in found])

    # Camera: stripes move right on screen when the camera pans left (camera offset falls).
    max_shift = max(2, int(round(PAN_SEARCH * W)))
    shifts = np.array([_profile_shift(a.profile, b.profile, max_shift) for a, b in zip(per_frame, per_frame[1:])])
    camera_velocity = -float(np.median(shifts)) if len(shifts) else 0.0  # pixels / frame
    pan = PAN_SPEED * W
    camera = "none" if abs(camera_velocity) < 0.4 * pan else ("left" if camera_velocity < 0 else "right")

    # Motion: unwrap the screen track across the frame edges, add the camera motion back.
    centers = np.array([r.center if r.found else (np.nan, np.nan) for r in per_frame], dtype=np.float64)  # [T, 2]
    screen = unwrap_track(centers, W, H)
    cam = np.concatenate([[0.0], np.cumsum(-shifts)]) if len(shifts) else np.zeros(1)
    world = screen.copy()
    world[:, 0] += cam
    motion, motion_features = classify_motion(world, H, W)
    if len(found) < 0.5 * T:
        motion = None  # a track with holes over half the clip says nothing reliable
    features = {"camera_velocity_px": camera_velocity, "mean_shape_iou": float(np.mean([r.shape_iou for r in found]))
                if found else 0.0, **motion_features}
    return Reading(background=background, colour=colour, shape=shape, motion=motion, camera=camera,
                   found_fraction=len(found) / T, features=features)


def score_reading(reading: Reading, prompt: str | Attributes) -> Score:
    """Compare a reading with what a prompt (or Attributes) asks for."""
    attrs = prompt if isinstance(prompt, Attributes) else parse_prompt(prompt)
    expected = attrs.as_dict()
    read = reading.as_dict()
    correct = {name: read[name] == expected[name] for name in ATTRIBUTE_NAMES}
    return Score(prompt=attrs.prompt, expected=expected, read=read, correct=correct)


def score_clip(frames: np.ndarray, prompt: str | Attributes) -> Score:
    """frames uint8 [T, H, W, 3] against a world prompt -> Score (adherence in [0, 1])."""
    return score_reading(read_clip(frames), prompt)


def main(argv: list[str] | None = None) -> int:
    from .world import clip_sampling_parser, sample_clips

    args = clip_sampling_parser("score ground-truth world clips with the detector", clips=20).parse_args(argv)
    scores = []
    for clip in sample_clips(args):
        s = score_clip(clip.frames, clip.prompt)
        scores.append(s.adherence)
        wrong = {k: s.read[k] for k, ok in s.correct.items() if not ok}
        print(f"{s.adherence:.2f}  {clip.prompt}" + (f"   read {wrong}" if wrong else ""))
    print(f"mean adherence {np.mean(scores):.3f} over {len(scores)} clips")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
