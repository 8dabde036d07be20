"""Caption decoders: Show-and-Tell (pooled features), Show-Attend-and-Tell and a Transformer
(spatial features).

Every decoder has `feature_kind`, `training_loss(...) -> LossOutput`, and the step API
(`encode`, `init_state`, `step`) that greedy decoding, beam search and sampling all use.
See `captioner.models.base.CaptionDecoder`; `captioner.models.decode` is those strategies.
"""

import torch

from captioner.errors import CaptionerError
from captioner.models.base import CaptionDecoder, DecoderConfig, LossOutput
from captioner.models.native_attention import load_native_scores, worth_compiling
from captioner.models.show_attend_tell import ShowAttendTell
from captioner.models.show_tell import ShowTell
from captioner.models.transformer import TransformerDecoder

DECODERS: dict[str, type[CaptionDecoder]] = {
    "show-tell": ShowTell,
    "show-attend-tell": ShowAttendTell,
    "transformer": TransformerDecoder,
}


def build_decoder(config: DecoderConfig) -> CaptionDecoder:
    """A freshly initialised decoder (training mode) for `config`."""
    try:
        decoder_class = DECODERS[config.model]
    except KeyError:
        raise CaptionerError(
            f"unknown model {config.model!r}; choose one of: {', '.join(DECODERS)}"
        ) from None
    return decoder_class(config)


def load_native_attention(decoder: CaptionDecoder, regions: int, device: torch.device) -> str:
    """Gives an attention decoder on a CPU over maps of `regions` regions the compiled attention
    scores (captioner.models.native_attention), at sizes where they pay (`worth_compiling`), for
    training and batched decoding alike; returns what to tell the user ("" where they do not
    apply)."""
    if not isinstance(decoder, ShowAttendTell) or device.type != "cpu":
        return ""
    if not worth_compiling(regions, decoder.config.attention_size):
        return ""
    native, note = load_native_scores()
    decoder.attention.native = native
    if native is None:
        return f"attention scores: PyTorch ops (the compiled loop is unavailable: {note})"
    return f"attention scores: the compiled loop, {note}"


__all__ = [
    "DECODERS",
    "CaptionDecoder",
    "DecoderConfig",
    "LossOutput",
    "ShowAttendTell",
    "ShowTell",
    "TransformerDecoder",
    "build_decoder",
    "load_native_attention",
]
