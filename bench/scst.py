"""Self-critical training step: what the CIDEr-D reward costs of a step, ours against
coco-caption's scorer used as the reward, in one run.

One SCST step at train_decoder.py's defaults (sizes 512, 16 images x 5 samples, 14x14x2048 maps
for the attention model): sample 5 captions per image, reward them, teacher-force the samples
with gradients, backward, Adam. The reward is timed inside the step: ours (captioner.cider, each
image's reference vectors built once and kept) and the baseline, pycocoevalcap's CiderScorer fed
the same candidates, references and train-split document frequencies on every call, as the
reference self-critical code does. Both give the same numbers (tests/test_cider.py).

References and document frequencies are the real Flickr8k train captions (../shared/fixtures);
the features are random (the step's cost does not depend on them) and the decoder untrained, so
nearly every sample runs to the 20-word limit: the longest, dearest step SCST takes.

    python bench/scst.py [--device cpu|cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from pycocoevalcap.cider.cider_scorer import CiderScorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe_machine  # noqa: E402  (bench/machine.py)

from captioner.models import DecoderConfig, build_decoder  # noqa: E402
from captioner.readers import read_corpus  # noqa: E402
from captioner.text import END, Vocabulary  # noqa: E402
from captioner.training import TrainConfig  # noqa: E402
from captioner.training.batches import Batch  # noqa: E402
from captioner.training.objectives import SelfCritical  # noqa: E402
from captioner.training.reward import CiderReward  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "flickr8k"
IMAGES = TrainConfig.batch_size // 5  # a default batch: 16 images of 5 captions
GRID, CHANNELS = 196, 2048


class _AllTrainImages(list):
    """pycocoevalcap takes log(number of images) from len(crefs): the train split's count."""

    images = 0

    def __len__(self) -> int:
        return self.images


class CocoCaptionReward(CiderReward):
    """The baseline: pycocoevalcap's scorer as the reward, rebuilt for every batch."""

    def __init__(self, corpus, rows, vocabulary) -> None:  # (CiderReward's own scorer unused)
        self.vocabulary = vocabulary
        self.references = {
            row: [" ".join([*c.tokens, END]) for c in captions]
            for row, captions in corpus.references(rows).items()
        }
        frequencies = CiderScorer(n=4, sigma=6.0)
        for references in self.references.values():
            frequencies += ("", references)
        frequencies.compute_doc_freq()
        self.document_frequency = frequencies.document_frequency

    def __call__(self, captions, rows) -> np.ndarray:
        scorer = CiderScorer(n=4, sigma=6.0)
        for caption, row in zip(captions, rows, strict=True):
            words = [*caption.words(self.vocabulary), *([END] if caption.ended else [])]
            scorer += (" ".join(words), self.references[row])
        scorer.crefs = _AllTrainImages(scorer.crefs)
        scorer.crefs.images = len(self.references)
        scorer.document_frequency = self.document_frequency
        return np.array(scorer.compute_cider())


class Timed:
    """A reward that adds the seconds each call takes to `seconds`."""

    def __init__(self, reward: CiderReward) -> None:
        self.reward, self.seconds = reward, 0.0

    def __call__(self, captions, rows) -> np.ndarray:
        started = time.perf_counter()
        rewards = self.reward(captions, rows)
        self.seconds += time.perf_counter() - started
        return rewards


def cache_bytes_per_image(reward: CiderReward, rows: list[int]) -> float:
    """The memory the CIDEr-D scorer keeps per image once it has scored a caption of every image
    (its reference n-gram ids, counts, norms and lengths), measured with tracemalloc."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    reward.cider.scores([["a"]] * len(rows), rows)  # builds and keeps every image's vectors
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return kept / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(describe_machine())
    device = torch.device(args.device)
    torch.manual_seed(0)

    corpus = read_corpus([FIXTURES / "captions.txt"], splits_dir=FIXTURES)
    train_rows = [i for i, image in enumerate(corpus.images) if image.split == "train"]
    vocabulary = Vocabulary.build(corpus.tokens_of_split("train"), min_count=5)
    started = time.perf_counter()
    ours = CiderReward(corpus, train_rows, vocabulary)
    setup = time.perf_counter() - started
    baseline = CocoCaptionReward(corpus, train_rows, vocabulary)
    print(
        f"Flickr8k train: {len(train_rows)} images, vocabulary {len(vocabulary)};"
        f" document frequencies in {setup:.2f} s; {IMAGES} images x 5 samples a step on {device}"
    )
    print(f"reference cache: {cache_bytes_per_image(ours, train_rows):.0f} bytes an image")

    rng = np.random.default_rng(0)
    for model in ("show-tell", "show-attend-tell"):
        decoder = build_decoder(DecoderConfig(model, len(vocabulary), CHANNELS, dropout=0.0))
        decoder = decoder.to(device)
        optimizer = torch.optim.Adam(decoder.parameters(), lr=5e-5)
        print(f"\n{model}")
        spent_by = {}
        for name, reward in (("ours", ours), ("coco-caption", baseline)):
            timed = Timed(reward)
            objective = SelfCritical(decoder, timed, 5, "mean", 20)
            steps, rewards = [], []
            for repeat in range(args.repeats + 1):  # the first is a warm-up
                rows = rng.choice(train_rows, IMAGES, replace=False)
                shape = (
                    (IMAGES, GRID, CHANNELS)
                    if decoder.feature_kind == "spatial"
                    else (IMAGES, CHANNELS)
                )
                features = torch.relu(torch.randn(shape)).to(device)
                batch = Batch(rows, features, *[torch.empty(0, dtype=torch.long)] * 3)
                timed.seconds = 0.0
                started = time.perf_counter()
                output = objective(batch)
                optimizer.zero_grad(set_to_none=True)
                output.loss.backward()
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if repeat:
                    steps.append(time.perf_counter() - started)
                    rewards.append(timed.seconds)
            step, spent = statistics.median(steps), statistics.median(rewards)
            spent_by[name] = spent
            print(
                f"  reward {name:<13} {1000 * spent:8.1f} ms of a {1000 * step:7.1f} ms step"
                f" = {100 * spent / step:5.1f}%   (steps: "
                + ", ".join(f"{1000 * s:.0f}" for s in steps)
                + " ms)"
            )
        print(f"  ours / coco-caption: {spent_by['coco-caption'] / spent_by['ours']:.1f}x faster")


if __name__ == "__main__":
    main()
