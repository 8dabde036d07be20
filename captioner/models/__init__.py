"""Caption decoders: Show-and-Tell (pooled features) and Show-Attend-and-Tell (spatial features).

Every decoder has `feature_kind`, `training_loss(...) -> LossOutput`, and the step API
(`encode`, `init_state`, `step`) that greedy decoding, beam search and sampling all use.
See `captioner.models.base.CaptionDecoder`.
"""

from captioner.errors import CaptionerError
from captioner.models.base import CaptionDecoder, DecoderConfig, LossOutput
from captioner.models.show_attend_tell import ShowAttendTell
from captioner.models.show_tell import ShowTell

DECODERS: dict[str, type[CaptionDecoder]] = {
    "show-tell": ShowTell,
    "show-attend-tell": ShowAttendTell,
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


__all__ = [
    "DECODERS",
    "CaptionDecoder",
    "DecoderConfig",
    "LossOutput",
    "ShowAttendTell",
    "ShowTell",
    "build_decoder",
]
