"""Does a trained decoder know where things are? A minimal-pair test on the synthetic scenes.

For every reference caption of a two-group image ("a red circle to the left of a blue square"), the
decoder scores it and its mirror with the relation words swapped ("... to the right of ...").
Both use the same words and templates, and the grammar draws which group is named first at
random, so only the picture can tell them apart: a decoder that cannot see the layout prefers the
true caption half of the time, one that sees it more often.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from captioner.checkpoint import load_checkpoint
from captioner.store import FeatureStore
from captioner.synthetic.grammar import mirror_relation
from captioner.synthetic.scene import Scene
from captioner.text import PAD_ID


@torch.inference_mode()
def layout_preference(
    checkpoint: Path,
    features: Path,
    scenes: dict[str, Scene],
    split: str = "test",
    batch_size: int = 256,
) -> tuple[float | None, int]:
    """(share of captions preferred over their mirror, number of captions compared) on the
    two-group images of `split`. `scenes` maps image file names to scenes (`read_scenes`)."""
    loaded, _ = load_checkpoint(checkpoint)
    decoder = loaded.build_decoder()
    store = FeatureStore.open(features)
    corpus, ids = store.corpus(), store.image_ids()
    by_image = corpus.captions_by_image()
    pairs = []  # (store row, caption ids, mirrored caption ids)
    for row in store.split_indices(split):
        if scenes[Path(ids[row]).name].relation is None:
            continue
        for index in by_image[row]:
            tokens = corpus.captions[index].tokens
            mirrored = mirror_relation(tokens)
            if mirrored is not None:
                encode = loaded.vocabulary.encode
                pairs.append((int(row), encode(tokens), encode(mirrored)))
    wins = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = np.array(sorted({row for row, _, _ in chunk}))
        stored = store.read(decoder.feature_kind, rows)
        image_features = torch.from_numpy(np.asarray(stored, dtype=np.float32))
        position = {row: i for i, row in enumerate(rows.tolist())}
        image_index = torch.tensor([position[row] for row, _, _ in chunk])
        true = _log_likelihood(decoder, image_features, image_index, [c for _, c, _ in chunk])
        mirror = _log_likelihood(decoder, image_features, image_index, [m for _, _, m in chunk])
        wins += int((true > mirror).sum())
    return (wins / len(pairs) if pairs else None), len(pairs)


def _log_likelihood(decoder, features, image_index, captions: list[list[int]]) -> torch.Tensor:
    """Summed log-probability of each caption (with its end token) given its image."""
    lengths = torch.tensor([len(c) for c in captions])
    padded = torch.full((len(captions), int(lengths.max())), PAD_ID)
    for i, caption in enumerate(captions):
        padded[i, : len(caption)] = torch.tensor(caption)
    log_probs = decoder.teacher_forced_log_probs(features, image_index, padded, lengths)
    targets = padded[:, 1 : log_probs.shape[1] + 1]
    picked = log_probs.gather(2, targets.unsqueeze(2)).squeeze(2)
    real = torch.arange(targets.shape[1]) < (lengths - 1).unsqueeze(1)
    return torch.where(real, picked, 0.0).sum(1)
