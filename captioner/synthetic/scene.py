"""What a synthetic scene contains: one or two groups of identical objects, and how the groups lie.

A scene is either one group of one to three identical objects ("three red circles") or two groups
of different kinds (one to three objects in all) placed so that one group is clearly to the left
of, or above, the other. Positions are drawn at random, but a relation is only ever stated where
a person would agree with it: every object of the first group lies left of (above) every object of
the second, and the groups are further apart along that axis than across it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 40),
}
# Background names share no word with the object colors, so a caption's words stay unambiguous.
BACKGROUNDS = {"white": (238, 238, 235), "gray": (128, 128, 130), "black": (22, 22, 26)}
SIZES = ("small", "large")
RELATIONS = ("left of", "above")  # groups[0] RELATION groups[1]; "right of"/"below" are the swaps

# Object radius as a fraction of the image side, per size class (min, max).
_RADIUS = {"small": (0.11, 0.13), "large": (0.18, 0.22)}
_GAP = 0.03  # least empty space between two objects, as a fraction of the image side
_TRIES = 200


@dataclass(frozen=True)
class ObjectGroup:
    """Identical objects: same shape, color and size class; `centers` in pixels."""

    shape: str
    color: str
    size: str
    radius: float
    centers: tuple[tuple[float, float], ...]

    @property
    def count(self) -> int:
        return len(self.centers)

    @property
    def kind(self) -> tuple[str, str]:
        return (self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: str
    groups: tuple[ObjectGroup, ...]  # one or two
    relation: str | None  # None for one group, else groups[0] RELATION groups[1]

    def to_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "background": self.background,
            "relation": self.relation,
            "groups": [
                {
                    "shape": g.shape,
                    "color": g.color,
                    "size": g.size,
                    "radius": round(g.radius, 3),
                    "centers": [[round(x, 3), round(y, 3)] for x, y in g.centers],
                }
                for g in self.groups
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        groups = tuple(
            ObjectGroup(
                g["shape"],
                g["color"],
                g["size"],
                float(g["radius"]),
                tuple((float(x), float(y)) for x, y in g["centers"]),
            )
            for g in data["groups"]
        )
        return cls(int(data["image_size"]), data["background"], groups, data["relation"])


def sample_scene(rng: np.random.Generator, image_size: int) -> Scene:
    """A random scene: half are a single group, half two groups in a stated relation."""
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < 0.5:
        count = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
        kind = _random_kind(rng)
        return Scene(image_size, background, (_place_alone(rng, image_size, kind, count),), None)
    counts = [(1, 1), (2, 1), (1, 2)][int(rng.choice(3, p=[0.8, 0.1, 0.1]))]
    first_kind = _random_kind(rng)
    second_kind = _random_kind(rng)
    while second_kind[:2] == first_kind[:2]:
        second_kind = _random_kind(rng)
    relation = str(rng.choice(RELATIONS))
    groups = _place_pair(rng, image_size, (first_kind, second_kind), counts, relation)
    return Scene(image_size, background, groups, relation)


def _random_kind(rng: np.random.Generator) -> tuple[str, str, str]:
    return (str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), str(rng.choice(SIZES)))


def _radius(rng: np.random.Generator, size: str, image_size: int) -> float:
    low, high = _RADIUS[size]
    return float(rng.uniform(low, high) * image_size)


def _free(center, radius, placed, image_size) -> bool:
    """Inside the image and clear of every object placed so far."""
    x, y = center
    if not (radius <= x <= image_size - radius and radius <= y <= image_size - radius):
        return False
    gap = _GAP * image_size
    return all((x - px) ** 2 + (y - py) ** 2 > (radius + pr + gap) ** 2 for (px, py), pr in placed)


def _place_alone(rng, image_size, kind, count) -> ObjectGroup:
    color, shape, size = kind
    for _ in range(_TRIES):
        radius = _radius(rng, size, image_size)
        centers: list[tuple[float, float]] = []
        for _ in range(_TRIES):
            center = tuple(rng.uniform(radius, image_size - radius, size=2).tolist())
            if _free(center, radius, [(c, radius) for c in centers], image_size):
                centers.append(center)
                if len(centers) == count:
                    return ObjectGroup(shape, color, size, radius, tuple(centers))
        size = "small"  # three large objects may not fit; small ones always do
    raise RuntimeError("could not place the objects")  # unreachable for the sizes above


def _place_pair(rng, image_size, kinds, counts, relation) -> tuple[ObjectGroup, ObjectGroup]:
    """Place group 0 in the left (top) half and group 1 in the other, then check the relation."""
    sizes = [kind[2] for kind in kinds]
    for attempt in range(_TRIES):
        if attempt == _TRIES // 2:
            sizes = ["small", "small"]
        radii = [_radius(rng, size, image_size) for size in sizes]
        placed: list[tuple[tuple[float, float], float]] = []
        groups: list[list[tuple[float, float]]] = [[], []]
        for g, (count, radius) in enumerate(zip(counts, radii, strict=True)):
            for _ in range(_TRIES):
                along = rng.uniform(radius, image_size / 2) + g * (image_size / 2 - radius)
                across = rng.uniform(radius, image_size - radius)
                center = (along, across) if relation == "left of" else (across, along)
                if _free(center, radius, placed, image_size):
                    placed.append((center, radius))
                    groups[g].append(center)
                    if len(groups[g]) == count:
                        break
        if [len(g) for g in groups] == list(counts) and _relation_clear(groups, radii, relation):
            return tuple(
                ObjectGroup(kind[1], kind[0], size, radius, tuple(centers))
                for kind, size, radius, centers in zip(kinds, sizes, radii, groups, strict=True)
            )
    raise RuntimeError("could not place the objects")  # unreachable for the sizes above


def _relation_clear(groups, radii, relation) -> bool:
    """Every object of group 0 before every object of group 1 along the axis, and the group
    centers further apart along the axis than across it."""
    axis = 0 if relation == "left of" else 1
    first_end = max(c[axis] for c in groups[0])
    second_start = min(c[axis] for c in groups[1])
    if first_end >= second_start:
        return False
    means = [np.mean(np.array(g), axis=0) for g in groups]
    along = abs(means[1][axis] - means[0][axis])
    across = abs(means[1][1 - axis] - means[0][1 - axis])
    return along > across
