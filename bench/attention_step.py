"""One training step of our Show-Attend-and-Tell decoder against two baselines.

Ours (captioner.models.ShowAttendTell.training_loss, fused Adam): the attention projection once
per image, the captions of an image sharing its memory, masked full-length decoding, and only what
depends on the previous step inside the step loop (see the model's docstring).

The layer-by-layer reference (tests/plain_decoders.PlainShowAttendTell, foreach Adam): the same
model written layer by layer: per-caption copies of the image memory, every module called at every
step, the output layer over every padded position.

Tutorial (the popular sgrvinod "a-PyTorch-Tutorial-to-Image-Captioning"): one feature map per
caption, the batch sorted by length, and at every step t the batch shrunk to the captions still
running and the feature projection recomputed for them; loss on the packed scores.

All three run the same weights and math (tanh attention, gate, LSTMCell, dropout, label
smoothing, doubly stochastic penalty) on the same batch, on the same device, alternating, with
forward + backward + Adam step timed. Before timing, the three losses are checked to agree.
Caption lengths and vocabulary size come from the real Flickr8k captions when
../shared/fixtures/flickr8k is present. The default batch is 6 images x 5 captions (the
reference's batch in bench/train.py); --images 16 is train_decoder.py's default batch.

    python bench/attention_step.py [--device cpu|cuda] [--repeats 3] [--images 6] [--no-tutorial]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from machine import describe_machine  # noqa: E402  (bench/machine.py)
from plain_decoders import PlainShowAttendTell  # noqa: E402

from captioner.models import DecoderConfig, build_decoder, load_native_attention  # noqa: E402
from captioner.text import END_ID, START_ID, Vocabulary, tokenize  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "flickr8k" / "captions.txt"
MAX_WORDS = 20  # the vocabulary's --max-length: longer captions are cut


def caption_shapes(count: int, seed: int) -> tuple[list[int], int, str]:
    """`count` caption lengths (with start and end), a vocabulary size, and where they came from."""
    rng = np.random.default_rng(seed)
    if FIXTURE.is_file():
        with open(FIXTURE, encoding="utf-8") as file:
            token_lists = [tokenize(row["caption"]) for row in csv.DictReader(file)]
        words = [min(len(tokens), MAX_WORDS) for tokens in token_lists]
        vocab_size = len(Vocabulary.build(token_lists, min_count=5))
        source = f"Flickr8k captions ({len(words)}), vocabulary min_count=5"
    else:
        words = np.clip(rng.normal(11.8, 3.8, 40000).round().astype(int), 1, MAX_WORDS).tolist()
        vocab_size, source = 3000, "Flickr8k-like normal(11.8, 3.8) lengths (fixture absent)"
    lengths = [int(n) + 2 for n in rng.choice(words, size=count)]
    return lengths, vocab_size, source


def random_captions(lengths: list[int], vocab_size: int, generator: torch.Generator):
    captions = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        captions[row, 0] = START_ID
        captions[row, 1 : length - 1] = torch.randint(
            4, vocab_size, (length - 2,), generator=generator
        )
        captions[row, length - 1] = END_ID
    return captions, torch.tensor(lengths)


def baseline_loss(
    decoder: PlainShowAttendTell,
    caption_features: torch.Tensor,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    label_smoothing: float,
    alpha_c: float,
) -> torch.Tensor:
    """The tutorial's forward + loss, on the plain model's step: features per caption, sorted
    batch, shrinking per step, feature projection recomputed at every step for the running
    captions."""
    lengths, order = lengths.sort(descending=True)
    features, captions = caption_features[order], captions[order]
    embeddings = decoder.embedding(captions)
    mean = features.mean(1)
    h, c = decoder.init_h(mean), decoder.init_c(mean)
    decode_lengths = (lengths - 1).tolist()
    steps = max(decode_lengths)
    predictions = features.new_zeros(len(lengths), steps, decoder.config.vocab_size)
    alphas = features.new_zeros(len(lengths), steps, features.size(1))
    for t in range(steps):
        running = sum(length > t for length in decode_lengths)
        projection = decoder.attention.project(features[:running])  # recomputed every step
        logits, (h, c), alpha = decoder.advance(
            embeddings[:running, t], (h[:running], c[:running]), (features[:running], projection)
        )
        predictions[:running, t] = logits
        alphas[:running, t] = alpha
    scores = pack_padded_sequence(predictions, decode_lengths, batch_first=True).data
    targets = pack_padded_sequence(captions[:, 1:], decode_lengths, batch_first=True).data
    loss = F.cross_entropy(scores, targets, label_smoothing=label_smoothing)
    return loss + alpha_c * ((1.0 - alphas.sum(1)) ** 2).mean()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--grid", type=int, default=14, help="H = W of the region grid")
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--size", type=int, default=512, help="embed = hidden = attention size")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per path (+1 warm-up)")
    parser.add_argument("--no-tutorial", action="store_true", help="skip the slowest baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(describe_machine())
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    captions_count = args.images * args.captions_per_image
    lengths, vocab_size, source = caption_shapes(captions_count, args.seed)
    regions = args.grid * args.grid
    config = DecoderConfig(
        "show-attend-tell", vocab_size, args.channels, args.size, args.size, args.size, dropout=0.5
    )
    decoder = build_decoder(config).to(device)
    native_note = load_native_attention(decoder, regions, device)  # as train_decoder.py does
    plain = PlainShowAttendTell(config).to(device)
    plain.load_state_dict(decoder.state_dict())
    fused = device.type in ("cpu", "cuda")  # as captioner.training.run
    optimizers = {
        "ours": torch.optim.Adam(decoder.parameters(), lr=4e-4, fused=fused),
        "reference": torch.optim.Adam(plain.parameters(), lr=4e-4),
    }
    features = torch.randn(args.images, regions, args.channels, generator=generator).to(device)
    image_index = torch.arange(args.images).repeat_interleave(args.captions_per_image).to(device)
    caption_features = features[image_index]  # the tutorial's per-caption input, built untimed
    captions, lengths_tensor = random_captions(lengths, vocab_size, generator)
    captions = captions.to(device)
    smoothing, alpha_c = 0.1, 1.0

    paths = {
        "ours": lambda: (
            decoder.training_loss(
                features, image_index, captions, lengths_tensor, smoothing, alpha_c
            ).loss
        ),
        "reference": lambda: (
            plain.training_loss(
                features, image_index, captions, lengths_tensor, smoothing, alpha_c
            ).loss
        ),
        "tutorial": lambda: baseline_loss(
            plain, caption_features, captions, lengths_tensor, smoothing, alpha_c
        ),
    }
    if args.no_tutorial:
        del paths["tutorial"]
    optimizers["tutorial"] = optimizers["reference"]

    decoder.eval(), plain.eval()  # the same function of the weights when dropout is off
    with torch.no_grad():
        values = {name: loss_of().item() for name, loss_of in paths.items()}
    decoder.train(), plain.train()
    for value in values.values():
        assert abs(value - values["ours"]) < 1e-4 * max(1.0, abs(value)), values

    def train_step(name: str) -> float:
        synchronize(device)
        start = time.perf_counter()
        optimizers[name].zero_grad(set_to_none=True)
        paths[name]().backward()
        optimizers[name].step()
        synchronize(device)
        return time.perf_counter() - start

    timings: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(args.repeats + 1):  # alternate, so drift on a shared machine hits all
        for name in paths:
            seconds = train_step(name)
            if repeat > 0:  # the first round is warm-up
                timings[name].append(seconds)

    medians = {name: statistics.median(times) for name, times in timings.items()}
    print(f"device {device}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(
        f"batch: {args.images} images x {args.captions_per_image} captions, L={regions}, "
        f"C={args.channels}, embed=hidden=attention={args.size}, vocabulary {vocab_size}"
    )
    print(
        f"caption lengths from {source}: mean {np.mean(lengths):.1f}, max {max(lengths)} "
        f"(with <start>/<end>); losses agree: "
        + ", ".join(f"{name} {value:.5f}" for name, value in values.items())
    )
    print(f"ours: {native_note or 'attention scores: PyTorch ops'}")
    print(f"median over {args.repeats} steps (forward + backward + Adam):")
    labels = {
        "ours": "ours (the loop holds only the recurrence)",
        "reference": "reference (layer by layer, per-caption copies)",
        "tutorial": "tutorial (projection every step, sorted + shrinking)",
    }
    for name, median in medians.items():
        each = ", ".join(f"{1000 * seconds:.0f}" for seconds in timings[name])
        print(
            f"  {labels[name]:<54} {1000 * median:9.1f} ms/step"
            f" = {captions_count / median:7.1f} captions/s  (each: {each})"
        )
    for name in paths:
        if name != "ours":
            print(f"  ours vs {name}: {medians[name] / medians['ours']:.2f}x")


if __name__ == "__main__":
    main()
