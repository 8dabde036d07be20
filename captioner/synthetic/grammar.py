"""Captions for a scene, and the reverse: reading a caption back to check it against the scene.

The grammar states what a person would say: the count, (sometimes) the size, the color and the
shape of each group, and for two groups where one is relative to the other. The references of an
image cycle through the wording templates, so they vary the way human ones do
("a red circle to the left of a blue square" / "a blue square to the right of a red circle").

`check_caption` parses a generated caption with the same vocabulary, so a model can be scored on
what it got right about the scene (objects, layout) and not only on n-gram overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from captioner.synthetic.scene import COLORS, SHAPES, ObjectGroup, Scene

_NUMBERS = {1: "a", 2: "two", 3: "three"}
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_SIZE_WORDS = {"small": ("small",), "large": ("large", "big")}
_SIZE_OF_WORD = {word: size for size, words in _SIZE_WORDS.items() for word in words}
_PLURALS = {shape: shape + "s" for shape in SHAPES}

_SINGLE_TEMPLATES = (
    "{a}",
    "there {verb} {a}",
    "{a} on a {background} background",
    "a picture of {a}",
    "an image of {a}",
)
# For two groups: which group is named first is drawn per caption, and the relation words are
# chosen to match, so the words ("left"/"right", ...) can only be predicted from the picture.
# {0} and {1} take the pair of words in this order when groups[0] is named first, else swapped.
_PAIR_TEMPLATES = {
    "left of": (
        ("{x} to the {0} of {y}", ("left", "right")),
        ("{x} {0} of {y}", ("left", "right")),
        ("{x} on the {0} of {y}", ("left", "right")),
        ("{x} on the {0} and {y} on the {1}", ("left", "right")),
    ),
    "above": (
        ("{x} {0} {y}", ("above", "below")),
        ("{x} {0} {y}", ("over", "under")),
        ("{x} at the {0} and {y} at the {1}", ("top", "bottom")),
        ("{x} {verb} {0} {y}", ("above", "below")),
    ),
}
# Words between two object mentions that say where the first one is relative to the second.
_RELATION_WORDS = {
    "left": "left of",
    "right": "right of",
    "above": "above",
    "over": "above",
    "top": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
    "bottom": "below",
}
_INVERSE = {"right of": "left of", "below": "above"}
_MIRRORED = {"left": "right", "above": "below", "over": "under", "top": "bottom"}
_MIRRORED.update({b: a for a, b in list(_MIRRORED.items())})


def describe(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
    """`count` distinct reference captions, cycling through the templates in a random order."""
    templates = _SINGLE_TEMPLATES if scene.relation is None else _PAIR_TEMPLATES[scene.relation]
    order = [templates[i] for i in rng.permutation(len(templates))]
    captions: list[str] = []
    for attempt in range(50 * count):
        if len(captions) == count:
            break
        template = order[attempt % len(order)]
        fill = _fill if scene.relation is None else _fill_pair
        text = fill(template, scene, rng)
        if text not in captions:
            captions.append(text)
    return [text[0].upper() + text[1:] + "." for text in captions]


def _fill(template: str, scene: Scene, rng: np.random.Generator) -> str:
    (group,) = scene.groups
    return template.format(
        a=_noun_phrase(group, with_size=rng.random() < 0.5, rng=rng),
        verb=_verb(group),
        background=scene.background,
    )


def _fill_pair(
    template: tuple[str, tuple[str, str]], scene: Scene, rng: np.random.Generator
) -> str:
    text, words = template
    first = int(rng.integers(2))
    x, y = scene.groups[first], scene.groups[1 - first]
    text = text.format(
        *(words if first == 0 else words[::-1]),
        x=_noun_phrase(x, with_size=rng.random() < 0.5, rng=rng),
        y=_noun_phrase(y, with_size=rng.random() < 0.5, rng=rng),
        verb=_verb(x),
    )
    if rng.random() < 0.2:
        text += f" on a {scene.background} background"
    return text


def _verb(group: ObjectGroup) -> str:
    return "is" if group.count == 1 else "are"


def _noun_phrase(group: ObjectGroup, with_size: bool, rng: np.random.Generator) -> str:
    words = [str(rng.choice(_SIZE_WORDS[group.size]))] if with_size else []
    words += [group.color, group.shape if group.count == 1 else _PLURALS[group.shape]]
    number = _NUMBERS[group.count]
    if number == "a" and words[0][0] in "aeiou":
        number = "an"
    return " ".join([number, *words])


def mirror_relation(tokens: Sequence[str]) -> list[str] | None:
    """The caption with every relation word swapped for its opposite ("left" <-> "right",
    "above" <-> "below", ...): the same words saying the opposite layout. None if it has none."""
    if not any(word in _MIRRORED for word in tokens):
        return None
    return [_MIRRORED.get(word, word) for word in tokens]


@dataclass(frozen=True)
class Mention:
    """An object group named in a caption: `tokens[start:end]` is e.g. "two small red circles"."""

    count: int
    color: str
    shape: str
    size: str | None
    start: int
    end: int


def find_mentions(tokens: Sequence[str]) -> list[Mention]:
    """Every "<number> [size] <color> <shape>" in the caption, number agreeing with the noun."""
    mentions = []
    for i, word in enumerate(tokens):
        if word not in _COUNT_WORDS:
            continue
        count, rest = _COUNT_WORDS[word], list(tokens[i + 1 : i + 4])
        size = _SIZE_OF_WORD.get(rest[0]) if rest else None
        if size is not None:
            rest = rest[1:]
        shapes = SHAPES if count == 1 else tuple(_PLURALS.values())
        if len(rest) >= 2 and rest[0] in COLORS and rest[1] in shapes:
            end = i + 3 + (size is not None)
            mentions.append(Mention(count, rest[0], SHAPES[shapes.index(rest[1])], size, i, end))
    return mentions


@dataclass(frozen=True)
class CaptionCheck:
    objects: bool  # every group named once, with the right count, color, shape (and size if said)
    layout: bool | None  # the stated relation holds; None for a scene of one group


def check_caption(tokens: Sequence[str], scene: Scene) -> CaptionCheck:
    """What a caption (tokenized, lower case) got right about the scene it describes."""
    mentions = find_mentions(tokens)
    objects = len(mentions) == len(scene.groups) and all(
        any(_names(mention, group) for mention in mentions) for group in scene.groups
    )
    if scene.relation is None:
        return CaptionCheck(objects, None)
    return CaptionCheck(objects, _stated_relation(tokens, mentions, scene) == scene.relation)


def _names(mention: Mention, group: ObjectGroup) -> bool:
    return (mention.count, mention.color, mention.shape) == (
        group.count,
        group.color,
        group.shape,
    ) and mention.size in (None, group.size)


def _stated_relation(tokens: Sequence[str], mentions: list[Mention], scene: Scene) -> str | None:
    """The relation the caption states between groups[0] and groups[1], in the scene's terms."""
    if len(mentions) < 2:
        return None
    first, second = mentions[0], mentions[1]
    relation = next(
        (_RELATION_WORDS[w] for w in tokens[first.end : second.start] if w in _RELATION_WORDS), None
    )
    kinds = [(m.color, m.shape) for m in (first, second)]
    if relation in _INVERSE:
        relation, kinds = _INVERSE[relation], kinds[::-1]
    if kinds != [group.kind for group in scene.groups]:
        return None
    return relation


def scene_accuracy(hypotheses: Sequence[Sequence[str]], scenes: Sequence[Scene]) -> dict:
    """Fractions of captions with the objects right, and (on two-group scenes) the layout right."""
    pairs = zip(hypotheses, scenes, strict=True)
    checks = [check_caption(tokens, scene) for tokens, scene in pairs]
    layout = [check.layout for check in checks if check.layout is not None]
    return {
        "objects": float(np.mean([check.objects for check in checks])) if checks else 0.0,
        "layout": float(np.mean(layout)) if layout else 0.0,
        "layout_images": len(layout),
    }
