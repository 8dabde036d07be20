"""The demo's dataset: rendered scenes of shapes with reference captions about what and where.

`write_synthetic_dataset` writes a Karpathy-format caption file plus images (read back by
`captioner.readers.read_corpus` like any real dataset); `write_unlabelled_images` writes fresh
scenes to caption; `read_scenes` and `scene_accuracy` score captions against the true scenes, and
`captioner.synthetic.layout_probe` (which loads torch models, so is not imported here) measures
whether a trained decoder can tell a caption from its left/right mirror.
"""

from captioner.synthetic.dataset import (
    CAPTION_FILE,
    make_scene,
    read_scenes,
    split_of,
    write_synthetic_dataset,
    write_unlabelled_images,
)
from captioner.synthetic.grammar import (
    CaptionCheck,
    check_caption,
    describe,
    find_mentions,
    mirror_relation,
    scene_accuracy,
)
from captioner.synthetic.scene import Scene, sample_scene

__all__ = [
    "CAPTION_FILE",
    "CaptionCheck",
    "Scene",
    "check_caption",
    "describe",
    "find_mentions",
    "make_scene",
    "mirror_relation",
    "read_scenes",
    "sample_scene",
    "scene_accuracy",
    "split_of",
    "write_synthetic_dataset",
    "write_unlabelled_images",
]
