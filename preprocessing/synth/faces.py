"""Face sprites from real photographs shipped in packages, with expressions and an opening mouth.

Two real faces ship offline: scikit-image's astronaut (Eileen Collins) and matplotlib's Grace Hopper
sample photo. MTCNN (facenet-pytorch) located their boxes and five landmarks once; face_landmarks.json
caches the result, keyed by a pixel hash (regenerate an entry with `detect_landmarks`). Every
synthetic person is one of the two photos varied by flip, aspect, tilt and a colour shift. Expressions
are smooth landmark-anchored warps plus local shading (both survive grey 48x48 / 64x64 crops, so a
small CNN can learn them); speech opens the jaw and draws a dark mouth cavity.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

FER_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
N_LEVELS = 6  # mouth openings 0 (closed) .. 1 in equal steps
LANDMARK_CACHE = Path(__file__).with_name("face_landmarks.json")


@dataclass(frozen=True)
class SourceFace:
    image: np.ndarray  # RGB uint8
    box: np.ndarray  # x1, y1, x2, y2
    landmarks: np.ndarray  # (5, 2): left eye, right eye, nose, left mouth corner, right mouth corner


def photos() -> list[tuple[str, np.ndarray]]:
    """The shipped face photographs, (name, RGB image)."""
    import matplotlib
    import skimage.data

    hopper = cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    return [("astronaut", skimage.data.astronaut()), ("grace_hopper", cv2.cvtColor(hopper, cv2.COLOR_BGR2RGB))]


def photo_digest(image: np.ndarray) -> str:
    """sha256 of the decoded pixels (a different photo or JPEG decoder invalidates the cache)."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def detect_landmarks(image: np.ndarray) -> dict:
    """MTCNN's box and five landmarks for the photo's face, rounded to whole pixels."""
    from facenet_pytorch import MTCNN

    boxes, _, landmarks = MTCNN(keep_all=False, device="cpu").detect(image, landmarks=True)
    return {"sha256": photo_digest(image),
            "box": np.round(np.asarray(boxes, dtype=object).astype(np.float32)[0]).astype(int).tolist(),
            "landmarks": np.round(np.asarray(landmarks, dtype=object).astype(np.float32)[0]).astype(int).tolist()}


@functools.cache
def source_faces() -> tuple[SourceFace, ...]:
    """The photos with their MTCNN box and landmarks, read from LANDMARK_CACHE when it matches the
    pixels (so generation needs no torch), else detected now."""
    cache = json.loads(LANDMARK_CACHE.read_text()) if LANDMARK_CACHE.is_file() else {}
    faces = []
    for name, image in photos():
        found = cache.get(name)
        if found is None or found["sha256"] != photo_digest(image):
            found = detect_landmarks(image)
        faces.append(SourceFace(image=image, box=np.array(found["box"], np.float64),
                                landmarks=_order(np.array(found["landmarks"], np.float64))))
    return tuple(faces)


@dataclass(frozen=True)
class Identity:
    """One synthetic person: a source photo and how it is varied."""

    photo: int
    flip: bool
    aspect: float  # face width relative to the photo's
    tilt: float  # degrees
    gains: tuple[float, float, float]  # per-channel colour gains
    offset: float  # brightness offset (0..1 scale)
    gamma: float

    def to_dict(self) -> dict:
        return asdict(self)


def random_identity(rng: np.random.Generator, photo: int) -> Identity:
    """A variant of `photo` different enough to count as another person."""
    return Identity(
        photo=photo,
        flip=bool(rng.random() < 0.5),
        aspect=round(float(rng.uniform(0.88, 1.12)), 3),
        tilt=round(float(rng.uniform(-4.0, 4.0)), 2),
        gains=tuple(round(float(g), 3) for g in rng.uniform(0.8, 1.2, size=3)),
        offset=round(float(rng.uniform(-0.06, 0.06)), 3),
        gamma=round(float(rng.uniform(0.85, 1.15)), 3),
    )


@dataclass
class Face:
    """A person's sprite at one size, with its landmarks in sprite coordinates."""

    image: np.ndarray  # (H, W, 3) uint8, neutral, mouth closed
    mask: np.ndarray  # (H, W) bool: the head ellipse that is pasted
    box: np.ndarray  # face box (x1, y1, x2, y2)
    landmarks: np.ndarray  # (5, 2)

    @property
    def frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Face-aligned axes: eye midpoint, unit x (eye line), unit y (down), inter-ocular distance."""
        left, right = self.landmarks[0], self.landmarks[1]
        ex = right - left
        iod = float(np.hypot(*ex))
        ex = ex / iod
        return (left + right) / 2, ex, np.array([-ex[1], ex[0]]), iod

    def mouth_geometry(self) -> tuple[float, float]:
        """Mouth half-width and mouth-centre depth below the eyes, in inter-ocular units."""
        origin, ex, ey, iod = self.frame
        corners = self.landmarks[3:5]
        centre = corners.mean(axis=0)
        return float(np.hypot(*(corners[1] - corners[0]))) / 2 / iod, float((centre - origin) @ ey) / iod

    def mouth_box(self) -> np.ndarray:
        """A box around the lips and the opening jaw (x1, y1, x2, y2)."""
        iod = self.frame[3]
        half = self.mouth_geometry()[0]
        centre = self.landmarks[3:5].mean(axis=0)
        return np.round(np.array([centre[0] - 1.4 * half * iod, centre[1] - 0.22 * iod,
                                  centre[0] + 1.4 * half * iod, centre[1] + 0.42 * iod]))


def build_face(identity: Identity, face_height: int) -> Face:
    """Render `identity` so its face box is `face_height` pixels tall."""
    src = source_faces()[identity.photo]
    x1, y1, x2, y2 = src.box
    scale = face_height / (y2 - y1)
    # Area-resize first (the warp alone would alias when shrinking Grace Hopper's 220 px face).
    image = cv2.resize(src.image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    height = int(round(face_height * 1.55))
    width = int(round(face_height * 1.35))
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2 - 0.08 * (y2 - y1)]) * scale
    theta = np.deg2rad(identity.tilt)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    linear = rot @ np.diag([identity.aspect * (-1.0 if identity.flip else 1.0), 1.0])
    shift = np.array([width / 2, height / 2]) - linear @ centre
    matrix = np.hstack([linear, shift[:, None]])
    sprite = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    colour = (sprite.astype(np.float32) / 255.0) ** identity.gamma * np.array(identity.gains, np.float32)
    sprite = np.clip((colour + identity.offset) * 255.0 + 0.5, 0, 255).astype(np.uint8)

    corners = np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]]) * scale @ linear.T + shift
    box = np.round(np.concatenate([corners.min(axis=0), corners.max(axis=0)]))
    landmarks = _order(src.landmarks * scale @ linear.T + shift)
    yy, xx = np.mgrid[0:height, 0:width]
    mask = ((xx - width / 2 + 0.5) / (0.47 * width)) ** 2 + ((yy - height / 2 + 0.5) / (0.49 * height)) ** 2 <= 1.0
    return Face(image=sprite, mask=mask, box=box, landmarks=landmarks)


def expression_sprites(face: Face, expressions: tuple[str, ...], levels: int = N_LEVELS) -> np.ndarray:
    """(len(expressions), levels, H, W, 3) sprites: each expression at each mouth opening."""
    out = np.empty((len(expressions), levels) + face.image.shape, np.uint8)
    for i, name in enumerate(expressions):
        for j in range(levels):
            out[i, j] = render_expression(face, name, 1.0, j / (levels - 1))
    return out


def render_expression(face: Face, name: str, strength: float, opening: float) -> np.ndarray:
    """`face` showing expression `name` at `strength` (0..1) with the mouth open by `opening` (0..1)."""
    origin, ex, ey, iod = face.frame
    half, depth = face.mouth_geometry()
    moves, shades, gape = _expression_spec(name, half, depth)
    opening = max(opening, gape * strength)
    height, width = face.image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rel = np.stack([xx - origin[0], yy - origin[1]], axis=-1)
    u = (rel @ ex) / iod  # face coordinates in inter-ocular units
    v = (rel @ ey) / iod
    du = np.zeros_like(u)
    dv = np.zeros_like(v)
    for cu, cv, mu, mv, sigma in moves:
        weight = np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * sigma**2)) * strength
        du += weight * mu
        dv += weight * mv
    if opening > 0:  # the jaw drops: everything below the lip line moves down, fading towards the chin
        below = np.clip((v - depth + 0.02) / 0.06, 0, 1) * np.exp(-np.maximum(v - depth - 0.3, 0) ** 2 / 0.125)
        dv += opening * 0.16 * below * np.exp(-u**2 / (2 * 0.42**2))
    # Backward map: a pixel shows what lies `displacement` behind it (smooth fields, so this is close).
    dx = (du * ex[0] + dv * ey[0]) * iod
    dy = (du * ex[1] + dv * ey[1]) * iod
    map_x = (xx - dx).astype(np.float32)
    map_y = (yy - dy).astype(np.float32)
    image = cv2.remap(face.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if shades:
        gain = np.ones_like(u)
        for cu, cv, sigma, amount in shades:
            gain += strength * amount * np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * sigma**2))
        image = np.clip(image.astype(np.float32) * gain[..., None] + 0.5, 0, 255).astype(np.uint8)
    if opening > 0:
        _draw_cavity(image, face, name, moves, strength, opening)
    return image


def _draw_cavity(image: np.ndarray, face: Face, name: str, moves: list, strength: float, opening: float) -> None:
    """Paint the dark open mouth between the (moved) lips."""
    origin, ex, ey, iod = face.frame
    half, depth = face.mouth_geometry()
    lift = sum(strength * mv * np.exp(-((half - cu) ** 2 + (depth - cv) ** 2) / (2 * s**2))
               for cu, cv, _, mv, s in moves)  # how far the corners moved (their mean)
    centre = origin + iod * (depth + lift + 0.06 * opening) * ey
    axes = (0.8 * half * iod, max(0.5, 0.1 * opening * iod))
    angle = float(np.degrees(np.arctan2(ex[1], ex[0])))
    scale = 16  # cv2's fixed-point shift of 4 bits: sub-pixel ellipses
    c = (int(round(centre[0] * scale)), int(round(centre[1] * scale)))
    a = (int(round(axes[0] * scale)), int(round(axes[1] * scale)))
    cv2.ellipse(image, c, a, angle, 0, 360, (45, 18, 22), -1, cv2.LINE_AA, 4)
    if name == "happiness":  # a smile shows the upper teeth
        teeth = (a[0] * 3 // 4, max(1, a[1] // 2))
        top = (c[0] - int(round(ey[0] * a[1] / 2)), c[1] - int(round(ey[1] * a[1] / 2)))
        cv2.ellipse(image, top, teeth, angle, 180, 360, (225, 222, 210), -1, cv2.LINE_AA, 4)


def _expression_spec(name: str, half: float, depth: float) -> tuple[list, list, float]:
    """Landmark-anchored moves (u, v, du, dv, sigma), shadings (u, v, sigma, gain) and a built-in mouth
    opening, all in inter-ocular units (u: along the eyes, v: down from the eyes)."""
    both = (-1.0, 1.0)
    if name == "neutral":
        return [], [], 0.0
    if name == "happiness":  # corners up and out, cheeks raised and lit, lower lids up
        moves = [(s * half, depth, s * 0.07, -0.13, 0.18) for s in both]
        moves += [(s * 0.45, depth - 0.3, 0.0, -0.05, 0.2) for s in both]
        moves += [(s * 0.5, 0.12, 0.0, -0.04, 0.12) for s in both]
        return moves, [(s * 0.48, depth - 0.3, 0.18, 0.22) for s in both], 0.0
    if name == "sadness":  # corners down, inner brows up, outer brows down, shadowed eyes, darker face
        moves = [(s * half, depth, -s * 0.02, 0.13, 0.18) for s in both]
        moves += [(s * 0.2, -0.35, 0.0, -0.1, 0.15) for s in both]
        moves += [(s * 0.62, -0.3, 0.0, 0.07, 0.15) for s in both]
        shades = [(s * 0.5, 0.25, 0.15, -0.28) for s in both] + [(0.0, depth * 0.5, 0.9, -0.14)]
        return moves, shades, 0.0
    if name == "anger":  # inner brows down and together (dark furrow), lips pressed, corners in
        moves = [(s * 0.2, -0.32, -s * 0.06, 0.12, 0.15) for s in both]
        moves += [(s * 0.65, -0.3, 0.0, -0.04, 0.15) for s in both]
        moves += [(s * half, depth, -s * 0.05, 0.02, 0.15) for s in both]
        moves += [(0.0, depth - 0.06, 0.0, 0.03, 0.1), (0.0, depth + 0.08, 0.0, -0.04, 0.1)]
        shades = [(0.0, -0.2, 0.12, -0.45)] + [(s * 0.3, -0.3, 0.15, -0.3) for s in both]
        return moves, shades, 0.0
    if name == "surprise":  # brows high, lids up, jaw dropped with the mouth open
        moves = [(s * u, -0.32, 0.0, -0.16, 0.2) for s in both for u in (0.2, 0.6)]
        moves += [(s * 0.5, -0.05, 0.0, -0.05, 0.1) for s in both]
        return moves, [(0.0, -0.65, 0.3, 0.1)], 0.7
    if name == "fear":  # inner brows up and together, lips stretched sideways, eyes widened
        moves = [(s * 0.2, -0.33, -s * 0.05, -0.12, 0.15) for s in both]
        moves += [(s * half, depth, s * 0.1, 0.03, 0.18) for s in both]
        return moves, [(s * 0.5, 0.0, 0.1, 0.15) for s in both], 0.25
    if name == "disgust":  # upper lip raised, nose wrinkled, corners down
        moves = [(0.0, depth - 0.07, 0.0, -0.07, 0.15)] + [(s * half, depth, 0.0, 0.05, 0.15) for s in both]
        return moves, [(0.0, 0.25, 0.1, -0.4)], 0.0
    if name == "contempt":  # one corner up, with a dimple
        return [(half, depth, 0.05, -0.1, 0.15)], [(half + 0.06, depth, 0.08, -0.3)], 0.0
    raise ValueError(f"unknown expression {name!r}")


def _order(points: np.ndarray) -> np.ndarray:
    """Landmarks with eyes and mouth corners in left-to-right image order (flips swap them)."""
    points = np.asarray(points, np.float64).copy()
    for a, b in ((0, 1), (3, 4)):
        if points[a, 0] > points[b, 0]:
            points[[a, b]] = points[[b, a]]
    return points


def crop_grey(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """A square grey crop around `box` resized to `size` (FER style; render the face near that size,
    as the bilinear warp does not low-pass)."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1)
    scale = size / side
    matrix = np.array([[scale, 0, size / 2 - (x1 + x2) / 2 * scale], [0, scale, size / 2 - (y1 + y2) / 2 * scale]])
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.warpAffine(grey, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
