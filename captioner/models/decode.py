"""Turning a decoder's next-word distributions into captions: greedy, batched beam search, sampling.

Every strategy runs a whole batch of images at once through the decoders' step API
(`encode` once per image, then `step` once per word for all rows together). State and memory are
tuples of batch-first tensors, so beam search keeps ``images x beams`` rows of state in one batch
(the beams of an image share its one row of memory), follows the surviving beams with
``index_select(0, ...)`` and drops the rows of images that are done.

Lengths count words: `max_length` is the most words a caption gets (a caption cut there has no
end token and its log-probability no end term); `min_length` is the fewest before the end token.
A caption may have no word at all (the end token first): it is a caption like any other, with
attention weights of shape (0, L) for the attention model. Where the options forbid every word
(`min_length` and `no_repeat_ngram_size` together can), the caption ends there. Next-word
log-probabilities that are NaN (weights or features that are not finite) stop the decoding with a
CaptionerError instead of turning into empty or arbitrary captions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from captioner.errors import CaptionerError
from captioner.text import END_ID, NEVER_GENERATED, START_ID, Vocabulary

STRATEGIES = ("beam", "greedy", "sample")


@dataclass(frozen=True)
class DecodingConfig:
    strategy: str = "beam"  # "beam" | "greedy" | "sample"
    beam_size: int = 3
    max_length: int = 20
    min_length: int = 0
    # HuggingFace meaning: score = sum_logprob / length ** length_penalty
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown decoding strategy {self.strategy!r} (use {STRATEGIES})")
        rules = {
            "beam_size >= 1": self.beam_size >= 1,
            "max_length >= 1": self.max_length >= 1,
            "0 <= min_length <= max_length": 0 <= self.min_length <= self.max_length,
            "no_repeat_ngram_size >= 0": self.no_repeat_ngram_size >= 0,
            "temperature > 0": self.temperature > 0,
            "top_k >= 0": self.top_k >= 0,
        }
        broken = [rule for rule, holds in rules.items() if not holds]
        if broken:
            raise ValueError(f"decoding options must satisfy {', '.join(broken)}")

    def used_options(self) -> dict:
        """The options that decide the captions under this strategy (a beam search ignores the
        sampling options, say): what tells two decodings apart."""
        names = ["strategy", "max_length", "min_length", "no_repeat_ngram_size"]
        if self.strategy == "beam":
            names += ["beam_size", "length_penalty"]
        elif self.strategy == "sample":
            names += ["temperature", "top_k", "seed"]
        return {name: getattr(self, name) for name in names}


@dataclass
class GeneratedCaption:
    tokens: list[int]  # word ids without <start>/<end>
    log_prob: float  # summed log-probability of the words (and of <end> when the caption ended)
    attention: np.ndarray | None  # (len(tokens), L) for the attention model
    ended: bool  # False when it reached the length limit without the end token

    def words(self, vocabulary: Vocabulary) -> list[str]:
        return [vocabulary.words[token] for token in self.tokens]


def generate(decoder, features: Tensor, config: DecodingConfig) -> list[GeneratedCaption]:
    """Captions for a batch of images with the strategy `config` names."""
    if decoder.max_words is not None and config.max_length > decoder.max_words:
        raise CaptionerError(
            f"--max-length {config.max_length}: this {decoder.config.model} decoder has positions"
            f" for at most {decoder.max_words} words"
        )
    if config.strategy == "greedy":
        return greedy_decode(
            decoder,
            features,
            config.max_length,
            min_length=config.min_length,
            no_repeat_ngram_size=config.no_repeat_ngram_size,
        )
    if config.strategy == "sample":
        return sample(decoder, features, config)
    return beam_search(decoder, features, config)


def greedy_decode(
    decoder,
    features: Tensor,
    max_length: int = 20,
    *,
    min_length: int = 0,
    no_repeat_ngram_size: int = 0,
) -> list[GeneratedCaption]:
    """The most likely next word at every step, for all images of the batch at once."""

    def most_likely(log_probs: Tensor) -> Tensor:
        return log_probs.argmax(dim=1)

    return _decode_word_by_word(
        decoder, features, most_likely, max_length, min_length, no_repeat_ngram_size
    )


def sample(
    decoder, features: Tensor, config: DecodingConfig, samples_per_image: int = 1
) -> list[GeneratedCaption]:
    """Draw each next word from the (tempered, top-k truncated) distribution; seeded, so repeatable.

    With `samples_per_image` k, the k captions of image i are items i*k .. i*k+k-1 (sharing the
    image's memory). The reported log-probability is the model's own (temperature 1, no top-k)
    of the drawn words.
    """
    generator = torch.Generator(device=features.device).manual_seed(config.seed)

    def draw(log_probs: Tensor) -> Tensor:
        logits = log_probs / config.temperature
        if 0 < config.top_k < logits.shape[1]:
            kth_best = logits.topk(config.top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        probs = torch.softmax(logits, dim=1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _decode_word_by_word(
        decoder,
        features,
        draw,
        config.max_length,
        config.min_length,
        config.no_repeat_ngram_size,
        samples_per_image,
    )


@torch.inference_mode()
def _decode_word_by_word(
    decoder,
    features: Tensor,
    choose: Callable[[Tensor], Tensor],
    max_length: int,
    min_length: int,
    no_repeat_ngram_size: int,
    rows_per_image: int = 1,
) -> list[GeneratedCaption]:
    """`rows_per_image` running sequences per image; `choose` picks each next word from the
    allowed log-probs.

    Rows that have ended keep stepping with the batch (their later words are ignored), so the loop
    is over words, never over images.
    """
    memory = decoder.encode(features)
    state = decoder.init_state(memory)
    if rows_per_image > 1:
        state = tuple(s.repeat_interleave(rows_per_image, 0) for s in state)
    batch = features.shape[0] * rows_per_image
    tokens = torch.full((batch,), START_ID, dtype=torch.long, device=features.device)
    words = tokens.new_empty((batch, 0))
    log_prob = torch.zeros(batch, device=features.device)
    ended = torch.zeros(batch, dtype=torch.bool, device=features.device)
    alphas: list[Tensor] = []
    for _ in range(max_length):
        log_probs, state, alpha = decoder.step(tokens, state, memory)
        log_probs = _forbid(log_probs, words, min_length, no_repeat_ngram_size)
        tokens = choose(log_probs)
        step_log_prob = log_probs.gather(1, tokens[:, None]).squeeze(1)
        log_prob += torch.where(ended, torch.zeros_like(step_log_prob), step_log_prob)
        words = torch.cat([words, tokens[:, None]], dim=1)
        if alpha is not None:
            alphas.append(alpha)
        ended |= tokens == END_ID
        if bool(ended.all()):
            break
    attention = torch.stack(alphas, dim=1).float().cpu().numpy() if alphas else None
    captions = []
    for row, (sequence, score) in enumerate(zip(words.tolist(), log_prob.tolist(), strict=True)):
        length = sequence.index(END_ID) if END_ID in sequence else len(sequence)
        captions.append(
            GeneratedCaption(
                tokens=sequence[:length],
                log_prob=score,
                attention=None if attention is None else attention[row, :length],
                ended=length < len(sequence),
            )
        )
    return captions


@dataclass
class _Hypothesis:
    score: float  # length-penalized
    caption: GeneratedCaption


@torch.inference_mode()
def beam_search(decoder, features: Tensor, config: DecodingConfig) -> list[GeneratedCaption]:
    """Beam search over all ``images x beams`` rows as one batch.

    Per step each image keeps the `beam_size` best continuations that do not end; continuations
    that end (ranked within the best `beam_size`) become finished hypotheses, scored
    ``log_prob / (words + 1) ** length_penalty`` (the +1 counts the end token). An image is done
    once it has `beam_size` finished hypotheses (HuggingFace's ``early_stopping=True``) and then
    leaves the batch, so the work per step follows the images still searching. At `max_length`
    the running beams join the finished ones, so a beam that never ends still returns its best
    hypothesis. With ``beam_size == 1`` this is exactly greedy decoding.
    """
    device = features.device
    beams = config.beam_size
    search = _BeamBatch.start(decoder, features, beams)
    finished: list[list[_Hypothesis]] = [[] for _ in range(features.shape[0])]

    for _ in range(config.max_length):
        log_probs, state, alpha = decoder.step(search.tokens, search.state, search.memory)
        if alpha is not None and search.attention is None:  # no word attended to yet: (rows, 0, L)
            search.attention = alpha.float().new_zeros((alpha.shape[0], 0, alpha.shape[1]))
        log_probs = _forbid(log_probs, search.words, config.min_length, config.no_repeat_ngram_size)
        searching_now, vocab = search.scores.shape[0], log_probs.shape[1]
        candidates = (search.scores.reshape(-1, 1) + log_probs).reshape(
            searching_now, beams * vocab
        )
        top_scores, top_index = candidates.topk(min(2 * beams, beams * vocab), dim=1)
        top_beam, top_token = top_index // vocab, top_index % vocab
        source_row = top_beam + torch.arange(searching_now, device=device)[:, None] * beams
        ends = top_token == END_ID
        search.collect_finished(
            finished,
            ends[:, :beams],
            top_scores[:, :beams],
            source_row[:, :beams],
            config.length_penalty,
        )
        searching = [i for i, image in enumerate(search.images) if len(finished[image]) < beams]
        if not searching:
            break
        # Each beam has one end token, so the 2k best hold at least k that go on; keep the first k.
        keep = torch.sort(ends.to(torch.uint8), dim=1, stable=True).indices[:, :beams]
        search.advance(
            top_scores.gather(1, keep),
            top_token.gather(1, keep).reshape(-1),
            source_row.gather(1, keep).reshape(-1),
            state,
            alpha,
        )
        if len(searching) < searching_now:
            search.keep_positions(searching)
    else:
        search.collect_running(finished, config.length_penalty)
    return [max(hypotheses, key=lambda h: h.score).caption for hypotheses in finished]


@dataclass
class _BeamBatch:
    """The rows of the images still searching: ``beams`` consecutive rows per image."""

    images: list[int]  # the original index of each image in the batch
    beams: int
    scores: Tensor  # (images, beams) summed log-probs; -inf for a beam not (yet) alive
    tokens: Tensor  # (rows,) the last word of each row
    words: Tensor  # (rows, t) the words so far
    attention: Tensor | None  # (rows, t, L) for the attention model
    state: tuple[Tensor, ...]
    memory: tuple[Tensor, ...]  # one row per image

    @classmethod
    def start(cls, decoder, features: Tensor, beams: int) -> _BeamBatch:
        device, batch = features.device, features.shape[0]
        rows = torch.arange(batch, device=device).repeat_interleave(beams)
        memory = decoder.encode(features)  # one row per image, shared by its beams
        state = tuple(s.index_select(0, rows) for s in decoder.init_state(memory))
        tokens = torch.full((batch * beams,), START_ID, dtype=torch.long, device=device)
        # Only the first beam of each image is alive at the start, so the first step does not
        # pick the same word k times.
        scores = torch.full((batch, beams), float("-inf"), device=device)
        scores[:, 0] = 0.0
        return cls(
            list(range(batch)),
            beams,
            scores,
            tokens,
            tokens.new_empty((len(rows), 0)),
            None,
            state,
            memory,
        )

    def advance(
        self, scores: Tensor, tokens: Tensor, parents: Tensor, state: tuple, alpha: Tensor | None
    ) -> None:
        """Each row continues row `parents[row]` with `tokens[row]`."""
        self.scores, self.tokens = scores, tokens
        self.words = torch.cat([self.words.index_select(0, parents), tokens[:, None]], dim=1)
        if alpha is not None:
            history = alpha.float().index_select(0, parents)[:, None]
            self.attention = torch.cat([self.attention.index_select(0, parents), history], dim=1)
        self.state = tuple(s.index_select(0, parents) for s in state)

    def keep_positions(self, positions: list[int]) -> None:
        """Keep only the images at batch `positions` (indices into `images`, in order); the
        rows of the others leave every tensor."""
        device = self.scores.device
        kept = torch.tensor(positions, device=device)
        rows = (kept[:, None] * self.beams + torch.arange(self.beams, device=device)).reshape(-1)
        self.images = [self.images[i] for i in positions]
        self.scores = self.scores.index_select(0, kept)
        self.tokens = self.tokens.index_select(0, rows)
        self.words = self.words.index_select(0, rows)
        if self.attention is not None:
            self.attention = self.attention.index_select(0, rows)
        self.state = tuple(s.index_select(0, rows) for s in self.state)
        self.memory = tuple(m.index_select(0, kept) for m in self.memory)

    def collect_finished(
        self,
        finished: list[list[_Hypothesis]],
        ends: Tensor,
        scores: Tensor,
        source_row: Tensor,
        length_penalty: float,
    ) -> None:
        """Record the candidates that end now as hypotheses of their images. `scores` are the
        candidates' (not the running beams'); `source_row` is a row of the current batch."""
        for position, rank in torch.nonzero(ends & torch.isfinite(scores)).tolist():
            row = int(source_row[position, rank])
            finished[self.images[position]].append(
                _hypothesis(
                    self.words[row],
                    float(scores[position, rank]),
                    self.attention,
                    row,
                    length_penalty,
                    1,
                )
            )

    def collect_running(self, finished: list[list[_Hypothesis]], length_penalty: float) -> None:
        """At the length limit, the running beams of the images still searching become
        hypotheses too."""
        for position, beam in torch.nonzero(torch.isfinite(self.scores)).tolist():
            row = position * self.beams + beam
            finished[self.images[position]].append(
                _hypothesis(
                    self.words[row],
                    float(self.scores[position, beam]),
                    self.attention,
                    row,
                    length_penalty,
                    0,
                )
            )


def _hypothesis(
    words: Tensor,
    log_prob: float,
    attention: Tensor | None,
    row: int,
    length_penalty: float,
    end_tokens: int,
) -> _Hypothesis:
    tokens = words.tolist()
    length = len(tokens) + end_tokens
    caption = GeneratedCaption(
        tokens=tokens,
        log_prob=log_prob,
        attention=None if attention is None else attention[row].cpu().numpy(),
        ended=end_tokens == 1,
    )
    return _Hypothesis(log_prob / max(length, 1) ** length_penalty, caption)


def _forbid(log_probs: Tensor, words: Tensor, min_length: int, no_repeat_ngram_size: int) -> Tensor:
    """The log-probs with impossible next words set to -inf.

    Never <pad> or <start>; not <end> before `min_length` words; no word that would repeat an
    n-gram of size `no_repeat_ngram_size` already in the row's `words` (N, t). A row left with no
    possible word may end (its <end> keeps its log-prob). CaptionerError for NaN log-probs.
    """
    if bool(torch.isnan(log_probs).any()):
        raise CaptionerError(
            "the decoder's next-word probabilities are NaN: its weights, or the features it was"
            " given, hold NaN or inf"
        )
    given = log_probs.float()
    log_probs = given.clone()
    log_probs[:, list(NEVER_GENERATED)] = float("-inf")
    length = words.shape[1]
    if length < min_length:
        log_probs[:, END_ID] = float("-inf")
    n = no_repeat_ngram_size
    if n > 0 and length >= n:
        ngrams = words.unfold(1, n, 1)  # (N, t - n + 1, n)
        prefix = words[:, length - n + 1 :]  # the last n - 1 words
        repeats = (ngrams[:, :, :-1] == prefix[:, None, :]).all(dim=2)
        banned = torch.zeros_like(log_probs).scatter_add_(1, ngrams[:, :, -1], repeats.float())
        log_probs = log_probs.masked_fill(banned > 0, float("-inf"))
    if length < min_length or n > 0:  # the options that can forbid every word
        stuck = torch.isneginf(log_probs).all(dim=1)
        log_probs[:, END_ID] = torch.where(stuck, given[:, END_ID], log_probs[:, END_ID])
    return log_probs
