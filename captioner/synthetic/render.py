"""Draw a scene with PIL: a textured background (tint, gradient, noise) and anti-aliased shapes."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from captioner.synthetic.scene import BACKGROUNDS, COLORS, Scene

_SUPERSAMPLE = 4  # shapes are drawn on a 4x larger canvas, then scaled down: smooth edges


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image of side `scene.image_size`; `rng` varies texture and tints."""
    size = scene.image_size
    background = Image.fromarray(_background(scene.background, size, rng), "RGB")
    big = size * _SUPERSAMPLE
    image = background.resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for group in scene.groups:
        for x, y in group.centers:
            color = _jitter(COLORS[group.color], rng, 18)
            angle = float(rng.uniform(-15, 15)) if group.shape != "circle" else 0.0
            points = _outline(
                group.shape, x * _SUPERSAMPLE, y * _SUPERSAMPLE, group.radius * _SUPERSAMPLE, angle
            )
            draw.polygon(points, fill=color)
    # Box-averaging back leaves the background's pixels exactly as drawn and smooths the edges.
    image = image.resize((size, size), Image.Resampling.BOX)
    return image


def _background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(_jitter(BACKGROUNDS[name], rng, 14), dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gradient = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
    pixels = base + gradient[..., None] * rng.uniform(3, 12)
    pixels += rng.normal(0.0, rng.uniform(1, 4), size=(size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _outline(shape: str, x: float, y: float, r: float, degrees: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of circumradius about `r` centred at (x, y), rotated."""
    if shape == "circle":
        corners = [(1.0, 2 * math.pi * k / 64) for k in range(64)]
    elif shape == "square":
        corners = [(1.0, math.pi / 4 + math.pi / 2 * k) for k in range(4)]
    elif shape == "triangle":
        corners = [(1.0, -math.pi / 2 + 2 * math.pi / 3 * k) for k in range(3)]
    elif shape == "star":
        corners = [(1.0 if k % 2 == 0 else 0.42, -math.pi / 2 + math.pi / 5 * k) for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    turn = math.radians(degrees)
    return [(x + r * d * math.cos(a + turn), y + r * d * math.sin(a + turn)) for d, a in corners]
