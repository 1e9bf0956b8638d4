"""A procedural video world for skyrt's demo model, in numpy, deterministic under a seed.

One flat-coloured shape (circle, square, triangle, diamond, cross) in a named colour moves with a
named motion (left, right, up, down, bouncing, orbiting, still) over a named background colour
with faint vertical stripes, optionally under a slow camera pan (left / right). Every clip comes
with its prompt, e.g. "a red circle bouncing on a dark blue background, camera panning left", and
its ground truth (per-frame shape centre, camera offset, size, the attributes in force).

Geometry. Positions live on a torus in frame-relative units (u, v) in [0, 1): a shape that leaves
on the left comes back on the right, so "moving left" can go on forever. The camera offset c is a
horizontal shift in the same units: screen u = world u - c, so "camera panning left" (c falling)
moves the stripes and the shape to the RIGHT on screen. The stripes are drawn in world
coordinates, which is what makes a pan visible on a plain background. Motion labels describe the
shape's motion in the world (relative to the background), not on screen.

Sizes are relative to the frame (radius ~ 0.11 * min(H, W)), so any H x W works (128 x 128 and up
is what the demo model is trained and served at). Clips have 1 + 4k frames for the Wan VAE, but any
length renders. `Scene` renders endlessly, in chunks, and switches its attributes at any frame.

Split. A full attribute combination is held out when it contains a held-out (colour, shape) pair
or a held-out (motion, background) pair; every single attribute value still occurs in training, so
the held-out prompts measure composition, not new words.

    python -m skyrt_demo.world --out clip.png   # a contact sheet of a few clips
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# Vocabulary: names -> rendering constants

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# Shape colours: saturated and far apart in RGB (and from every background), so a blurry
# generated shape still lands nearest its own name.
COLOURS: dict[str, tuple[int, int, int]] = {  # name: (R, G, B)
    "red": (225, 40, 40), "green": (40, 200, 70), "blue": (50, 100, 245), "yellow": (245, 220, 40),
    "white": (240, 240, 240), "orange": (250, 140, 30), "purple": (165, 65, 215), "cyan": (40, 215, 225),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {  # name: (R, G, B)
    "black": (14, 14, 14), "dark blue": (20, 32, 95), "dark green": (22, 75, 40), "gray": (115, 115, 115),
    "brown": (95, 60, 28),
}
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "bouncing", "orbiting", "still")
CAMERAS: tuple[str, ...] = ("none", "left", "right")
MOTION_PHRASES: dict[str, str] = {
    "left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
    "bouncing": "bouncing", "orbiting": "orbiting", "still": "standing still",
}
ATTRIBUTE_NAMES: tuple[str, ...] = ("background", "colour", "shape", "motion", "camera")

# Held-out pairs (see the module docstring). Fixed lists, not drawn from a seed, so the split never
# moves between runs, machines or versions of numpy.
HELDOUT_COLOUR_SHAPE: frozenset[tuple[str, str]] = frozenset({
    ("purple", "triangle"), ("yellow", "circle"), ("cyan", "square"), ("orange", "diamond"), ("green", "cross"),
})
HELDOUT_MOTION_BACKGROUND: frozenset[tuple[str, str]] = frozenset({
    ("orbiting", "gray"), ("bouncing", "dark green"), ("left", "brown"),
})

# Motion constants in frame-relative units per frame (at 24 fps): ~1.5 px/frame at 128 px.
SPEED = 0.012  # linear motions
PAN_SPEED = 0.008  # camera pan
BOUNCE_HEIGHT, BOUNCE_PERIOD = 0.38, 24  # |sin| hops: one hop every BOUNCE_PERIOD frames
ORBIT_RADIUS, ORBIT_PERIOD = 0.22, 48
STRIPES_PER_FRAME, STRIPE_AMPLITUDE = 4, 16.0  # background texture (grey levels), world-fixed
# Shape radius as a fraction of min(H, W). The demo VAE (8x down, base width 8) reads a shape back as
# itself in 15 of 15 clips at 0.15-0.20 but in only 6 of 15 at the first world's 0.09-0.13 (crosses came
# back as diamonds, squares and triangles as circles; `python -m skyrt_demo.probe
# --radius 0.09,0.13`): smaller shapes cannot be drawn through that VAE (issue 6).
RADIUS_RANGE = (0.15, 0.20)
# Where a clip's shape starts (frame-relative u, v; uniform in the range). A stream's first block is drawn
# from the prompt alone; with the start fixed at the centre the shape word says what to draw at a known
# place, and the demo DiT learns it (with random starts, 0.2-0.8, it drew a blob of the right colour;
# issue 6). Later positions still cover the frame: every motion but "still" carries the shape across it.
START_RANGE = (0.5, 0.5)
BOUNCE_START_V = (0.8, 0.8)  # bouncing hops rise from near the bottom


# ----------------------------------------------------------------------------------------------
# Attributes and prompts


@dataclass(frozen=True)
class Attributes:
    """What a prompt says: one value per attribute name (see the vocabulary above)."""

    shape: str
    colour: str
    motion: str
    background: str
    camera: str = "none"

    def __post_init__(self):
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                     ("motion", self.motion, MOTIONS), ("background", self.background, BACKGROUNDS),
                                     ("camera", self.camera, CAMERAS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")

    @property
    def prompt(self) -> str:
        """The one canonical English prompt of these attributes."""
        article = "an" if self.colour[0] in "aeiou" else "a"
        text = f"{article} {self.colour} {self.shape} {MOTION_PHRASES[self.motion]} on a {self.background} background"
        if self.camera != "none":
            text += f", camera panning {self.camera}"
        return text

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES}


_PROMPT_RE = re.compile(
    r"^an? (?P<colour>[a-z]+) (?P<shape>[a-z]+) (?P<motion>moving left|moving right|moving up|moving down|bouncing|"
    r"orbiting|standing still) on an? (?P<background>[a-z ]+?) background(?:, camera panning (?P<camera>left|right))?$"
)
_PHRASE_TO_MOTION = {phrase: motion for motion, phrase in MOTION_PHRASES.items()}


def parse_prompt(prompt: str) -> Attributes:
    """Inverse of `Attributes.prompt` (case and surrounding whitespace ignored); ValueError otherwise."""
    m = _PROMPT_RE.match(" ".join(prompt.lower().split()).rstrip("."))
    if m is None:
        raise ValueError(f"not a demo-world prompt: {prompt!r} (expected e.g. {EXAMPLE.prompt!r})")
    return Attributes(shape=m["shape"], colour=m["colour"], motion=_PHRASE_TO_MOTION[m["motion"]],
                      background=m["background"], camera=m["camera"] or "none")


def vocabulary() -> list[str]:
    """Every word (and punctuation mark) a world prompt can contain, sorted: the tokenizer must
    have each of them as a piece of its own."""
    words: set[str] = {"a", "an", "on", "background", ",", "camera", "panning"}
    for text in (*SHAPES, *COLOURS, *BACKGROUNDS, *MOTION_PHRASES.values(), *CAMERAS[1:]):
        words.update(text.split())
    return sorted(words)


def all_combinations() -> list[Attributes]:
    """Every attribute combination, in a fixed order."""
    return [Attributes(s, c, m, b, cam) for s, c, m, b, cam in
            itertools.product(SHAPES, COLOURS, MOTIONS, BACKGROUNDS, CAMERAS)]


def split_of(attrs: Attributes) -> str:
    """'heldout' if the combination contains a held-out pair, else 'train'."""
    if (attrs.colour, attrs.shape) in HELDOUT_COLOUR_SHAPE or (attrs.motion, attrs.background) in HELDOUT_MOTION_BACKGROUND:
        return "heldout"
    return "train"


def combinations(split: str) -> list[Attributes]:
    """The combinations of one split ('train' or 'heldout')."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [a for a in all_combinations() if split_of(a) == split]


EXAMPLE = Attributes("circle", "red", "bouncing", "dark blue", "left")


# ----------------------------------------------------------------------------------------------
# Trajectories (frame-relative units, torus)


@dataclass(frozen=True)
class Style:
    """The free parameters of a clip that the prompt does not name (drawn from the seed)."""

    radius: float  # shape radius / min(H, W)
    speed: float = 1.0  # multiplies every motion and pan speed
    orbit_sign: float = 1.0  # +1 counter-clockwise on screen, -1 clockwise
    phase: float = 0.0  # in [0, 1): where in its hop / orbit the motion starts
    stripe_phase: float = 0.0  # world offset of the background stripes

    @staticmethod
    def sample(rng: np.random.Generator) -> "Style":
        return Style(radius=float(rng.uniform(*RADIUS_RANGE)), speed=float(rng.uniform(0.85, 1.15)),
                     orbit_sign=float(rng.choice([-1.0, 1.0])), phase=float(rng.uniform()),
                     stripe_phase=float(rng.uniform()))


def motion_delta(motion: str, style: Style, t: np.ndarray) -> np.ndarray:
    """World displacement [len(t), 2] (du, dv; v grows downwards) after t frames of `motion`,
    zero at t = 0 so every segment starts where the previous one left the shape."""
    t = np.asarray(t, dtype=np.float64)
    zero = np.zeros_like(t)
    s = SPEED * style.speed
    if motion == "left":
        return np.stack([-s * t, zero], -1)
    if motion == "right":
        return np.stack([s * t, zero], -1)
    if motion == "up":
        return np.stack([zero, -s * t], -1)
    if motion == "down":
        return np.stack([zero, s * t], -1)
    if motion == "still":
        return np.stack([zero, zero], -1)
    if motion == "bouncing":
        # |sin| hops above a floor; the phase picks where in a hop the clip starts.
        period = BOUNCE_PERIOD / style.speed
        hop = lambda x: -BOUNCE_HEIGHT * np.abs(np.sin(np.pi * (x / period + style.phase)))  # noqa: E731
        return np.stack([zero, hop(t) - hop(0.0)], -1)
    if motion == "orbiting":
        period = ORBIT_PERIOD / style.speed
        angle = 2 * np.pi * style.phase + style.orbit_sign * 2 * np.pi * t / period
        a0 = 2 * np.pi * style.phase
        # v grows downwards: a positive sign runs counter-clockwise as seen on screen.
        du = ORBIT_RADIUS * (np.cos(angle) - np.cos(a0))
        dv = -ORBIT_RADIUS * (np.sin(angle) - np.sin(a0))
        return np.stack([du, dv], -1)
    raise ValueError(f"unknown motion {motion!r}")


def pan_delta(camera: str, style: Style, t: np.ndarray) -> np.ndarray:
    """Camera offset change [len(t)] after t frames: panning left moves the camera to lower u."""
    sign = {"none": 0.0, "left": -1.0, "right": 1.0}[camera]
    return sign * PAN_SPEED * style.speed * np.asarray(t, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Rendering


def shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) of a shape of radius r centred at the origin.

    Corner regions use the max of half-plane distances (exact inside and on the edges, which is all
    anti-aliasing needs). Sizes are chosen so the five shapes have similar areas.
    """
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.9 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.25 * r) / math.sqrt(2.0)
    if shape == "triangle":
        # Equilateral, pointing up, centroid at the origin, circumradius R: three half-planes.
        half_in = 0.5 * 1.35 * r  # inradius = R / 2
        bottom = dy - half_in
        right = 0.8660254 * dx - 0.5 * dy - half_in
        left = -0.8660254 * dx - 0.5 * dy - half_in
        return np.maximum(bottom, np.maximum(right, left))
    if shape == "cross":
        arm, half_width = 1.05 * r, 0.38 * r
        bar_h = np.maximum(np.abs(dx) - arm, np.abs(dy) - half_width)
        bar_v = np.maximum(np.abs(dx) - half_width, np.abs(dy) - arm)
        return np.minimum(bar_h, bar_v)
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, height: int, width: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage float32 [H, W] in [0, 1] of a shape centred at pixel (cx, cy), wrapping
    around the frame edges (the torus). The detector matches generated shapes against these."""
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32) + 0.5
    dx = (xs - cx + width / 2) % width - width / 2  # toroidal distance along x: [W]
    dy = (ys - cy + height / 2) % height - height / 2  # [H]
    sdf = shape_sdf(shape, dx[None, :], dy[:, None], r)
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def background_row(background: str, width: int, camera_offset: float, stripe_phase: float) -> np.ndarray:
    """One row of background pixels float32 [W, 3]: the named colour plus world-fixed vertical stripes."""
    xs = (np.arange(width, dtype=np.float64) + 0.5) / width + camera_offset + stripe_phase  # world u
    stripes = STRIPE_AMPLITUDE * np.sin(2 * np.pi * STRIPES_PER_FRAME * xs)
    return (np.asarray(BACKGROUNDS[background], np.float64)[None, :] + stripes[:, None]).astype(np.float32)


@dataclass
class Truth:
    """Ground truth of a clip: per frame, where the shape is and which attributes are in force.

    centers: float64 [T, 2] screen pixel (x, y) of the shape centre (wrapped into the frame);
    world: float64 [T, 2] unwrapped world position in pixels (what the motion label describes);
    camera: float64 [T] unwrapped camera offset in pixels; radius in pixels;
    segments: [(first_frame, Attributes)] in order (one entry unless the prompt switched).
    """

    centers: np.ndarray
    world: np.ndarray
    camera: np.ndarray
    radius: float
    segments: list[tuple[int, Attributes]]

    def attributes_at(self, frame: int) -> Attributes:
        current = self.segments[0][1]
        for first, attrs in self.segments:
            if first <= frame:
                current = attrs
        return current


@dataclass
class Clip:
    """Frames uint8 [T, H, W, 3], the prompt in force at frame 0, and the ground truth."""

    frames: np.ndarray
    prompt: str
    truth: Truth

    @property
    def attributes(self) -> Attributes:
        return self.truth.segments[0][1]


class Scene:
    """An endless world: renders frames in order, chunk by chunk; `set_attributes` switches what
    the prompt says from the next rendered frame on, the shape going on from where it is.

    Deterministic: the same (attributes, seed, size) renders the same frames, however the frames are
    split into chunks.
    """

    def __init__(self, attrs: Attributes, height: int = 128, width: int = 128, seed: int = 0,
                 style: Style | None = None):
        if height < 16 or width < 16:
            raise ValueError(f"frames of {height}x{width} are too small for the world (>= 16x16)")
        self.height, self.width = int(height), int(width)
        rng = np.random.default_rng(seed)
        self.style = style or Style.sample(rng)
        start = rng.uniform(*START_RANGE, size=2)
        if attrs.motion == "bouncing":
            start[1] = rng.uniform(*BOUNCE_START_V)
        self._anchor = start.astype(np.float64)  # world (u, v) at the current segment start
        self._cam_anchor = 0.0
        self._segment_start = 0
        self.frame = 0  # index of the next frame to render
        self.segments: list[tuple[int, Attributes]] = [(0, attrs)]

    @property
    def attributes(self) -> Attributes:
        return self.segments[-1][1]

    @property
    def radius_px(self) -> float:
        return self.style.radius * min(self.height, self.width)

    def set_attributes(self, attrs: Attributes) -> None:
        """Switch to `attrs` at the next frame (the prompt switch of an endless stream)."""
        if attrs == self.attributes:
            return
        pos, cam = self._state(np.array([self.frame]))
        self._anchor, self._cam_anchor = pos[0], float(cam[0])
        self._segment_start = self.frame
        if self.segments[-1][0] == self.frame:
            self.segments[-1] = (self.frame, attrs)
        else:
            self.segments.append((self.frame, attrs))

    def _state(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World position [n, 2] (unwrapped, frame-relative units) and camera offset [n] at `frames`."""
        attrs = self.attributes
        t = frames - self._segment_start
        return self._anchor + motion_delta(attrs.motion, self.style, t), self._cam_anchor + pan_delta(
            attrs.camera, self.style, t)

    def render(self, count: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The next `count` frames uint8 [count, H, W, 3] and their truth arrays (see `Truth`)."""
        frames = np.arange(self.frame, self.frame + count)
        world, cam = self._state(frames)
        attrs = self.attributes
        H, W = self.height, self.width
        scale = np.array([W, H], dtype=np.float64)
        screen = world.copy()
        screen[:, 0] -= cam
        centers = (screen % 1.0) * scale
        colour = np.asarray(COLOURS[attrs.colour], np.float32)
        out = np.empty((count, H, W, 3), dtype=np.uint8)
        r = self.radius_px
        for i in range(count):
            row = background_row(attrs.background, W, cam[i], self.style.stripe_phase)  # [W, 3]
            alpha = shape_mask(attrs.shape, H, W, centers[i, 0], centers[i, 1], r)[..., None]  # [H, W, 1]
            img = row[None] * (1.0 - alpha) + colour * alpha
            out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        self.frame += count
        truth = {"centers": centers, "world": world * scale, "camera": cam * W}
        return out, truth

    def chunks(self, chunk_frames: int) -> Iterator[np.ndarray]:
        """Endless frames, `chunk_frames` at a time."""
        while True:
            yield self.render(chunk_frames)[0]


def _check_frames(num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1 (the VAE wants 1 + 4k)")


def render_clip(attrs: Attributes, num_frames: int = 33, height: int = 128, width: int = 128, seed: int = 0,
                style: Style | None = None) -> Clip:
    """One clip of `attrs` (any length; 1 + 4k frames for the VAE)."""
    return render_switch_clip(attrs, None, None, num_frames, height, width, seed, style)


def render_switch_clip(first: Attributes, second: Attributes | None, switch_frame: int | None, num_frames: int,
                       height: int = 128, width: int = 128, seed: int = 0, style: Style | None = None) -> Clip:
    """A clip whose prompt switches from `first` to `second` at frame `switch_frame` (None: no switch)."""
    _check_frames(num_frames)
    scene = Scene(first, height, width, seed, style)
    parts: list[tuple[np.ndarray, dict]] = []
    if second is not None and switch_frame is not None and 0 < switch_frame < num_frames:
        parts.append(scene.render(switch_frame))
        scene.set_attributes(second)
        parts.append(scene.render(num_frames - switch_frame))
    else:
        parts.append(scene.render(num_frames))
    frames = np.concatenate([p[0] for p in parts])
    truth = Truth(
        centers=np.concatenate([p[1]["centers"] for p in parts]),
        world=np.concatenate([p[1]["world"] for p in parts]),
        camera=np.concatenate([p[1]["camera"] for p in parts]),
        radius=scene.radius_px, segments=list(scene.segments))
    return Clip(frames=frames, prompt=first.prompt, truth=truth)


class World:
    """Draws attribute combinations and clips from one seed (train or held-out split)."""

    def __init__(self, seed: int = 0, height: int = 128, width: int = 128):
        self.rng = np.random.default_rng(seed)
        self.height, self.width = height, width
        self._combos = {split: combinations(split) for split in ("train", "heldout")}

    def sample_attributes(self, split: str = "train") -> Attributes:
        combos = self._combos[split]
        return combos[int(self.rng.integers(len(combos)))]

    def sample_clip(self, num_frames: int = 33, split: str = "train") -> Clip:
        attrs = self.sample_attributes(split)
        return render_clip(attrs, num_frames, self.height, self.width, seed=int(self.rng.integers(2**31)))

    def sample_switch_clip(self, num_frames: int, switch_frame: int, split: str = "train") -> Clip:
        """A clip that switches, at `switch_frame`, to a combination that differs in at least one attribute."""
        first = self.sample_attributes(split)
        second = first
        while second == first:
            second = self.sample_attributes(split)
        return render_switch_clip(first, second, switch_frame, num_frames, self.height, self.width,
                                  seed=int(self.rng.integers(2**31)))


def contact_sheet(clips: Sequence[Clip], every: int = 4) -> np.ndarray:
    """uint8 image [rows * H, cols * W, 3]: one row per clip, every `every`-th frame."""
    rows = [np.concatenate(list(c.frames[::every]), axis=1) for c in clips]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)


def clip_sampling_parser(description: str, clips: int):
    """An argparse parser for a command that samples world clips: --clips, --frames, --size, --seed
    (read by `sample_clips`)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--clips", type=int, default=clips)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    return p


def sample_clips(args) -> list[Clip]:
    """The clips a `clip_sampling_parser` command line asks for, drawn from one World."""
    world = World(args.seed, args.size, args.size)
    return [world.sample_clip(args.frames) for _ in range(args.clips)]


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    p = clip_sampling_parser("render a contact sheet of world clips", clips=6)
    p.add_argument("--out", default="world.png")
    args = p.parse_args(argv)
    clips = sample_clips(args)
    for c in clips:
        print(c.prompt)
    Image.fromarray(contact_sheet(clips)).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
