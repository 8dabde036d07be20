"""Checkpoints: one file with everything needed to caption raw images with a trained decoder.

The file holds only tensors and plain Python values, so it opens with
``torch.load(path, weights_only=True)``: loading a checkpoint from a stranger cannot run code.
Writes are atomic (a temporary file in the same directory, then ``os.replace``), so a run
killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from captioner.encoder import EncoderConfig
from captioner.errors import CaptionerError
from captioner.files import atomic_file
from captioner.models import CaptionDecoder, DecoderConfig, build_decoder
from captioner.text import Vocabulary

FORMAT = "captioner-checkpoint"
# 2: decoders carry the training features' statistics (feature_mean, feature_std)
# 3: the exact encoder weights (id and checksum) and the training corpus's digest
VERSION = 3


@dataclass
class Checkpoint:
    decoder_config: DecoderConfig
    state_dict: dict[str, Tensor]
    vocabulary: Vocabulary
    encoder_config: EncoderConfig
    store_fingerprint: str
    training: dict  # epoch, metrics, options: plain types only
    # Provenance ("" in checkpoints older than version 3, where it was not recorded): the exact
    # weights the training features came from (e.g. "ResNet152_Weights.IMAGENET1K_V2" and the
    # sha256 of their tensors), and the digest of the corpus and splits it was trained with.
    weights_id: str = ""
    weights_checksum: str = ""
    corpus_sha256: str = ""

    def build_decoder(self, device: str | torch.device = "cpu") -> CaptionDecoder:
        """The decoder with these weights, in eval mode, on `device`."""
        decoder = build_decoder(self.decoder_config)
        decoder.load_state_dict(self.state_dict)
        return decoder.to(device).eval()


def non_finite_weights(state_dict: dict[str, Tensor]) -> list[str]:
    """The names of the floating-point weights that hold NaN or inf. Each tensor's sum screens
    it (NaN and inf carry through a sum, which is ten times faster than torch.isfinite on a CPU);
    one whose sum is not finite is then checked value by value (a sum may overflow alone)."""
    return [
        name
        for name, tensor in state_dict.items()
        if tensor.is_floating_point()
        and not torch.isfinite(tensor.sum())
        and not bool(torch.isfinite(tensor).all())
    ]


def require_finite_weights(checkpoint: Checkpoint, path: Path) -> None:
    """A one-line refusal of a checkpoint whose weights hold NaN or inf: they would caption every
    image with nothing or crash the decoding. Training never writes one (it stops first); an older
    captioner could, from a run that diverged."""
    names = non_finite_weights(checkpoint.state_dict)
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise CaptionerError(
            f"{path}: its weights are not finite (NaN or inf in {', '.join(names[:3])}{more}):"
            " it was saved by a training run that diverged; train again with a lower --lr"
        )


def save_checkpoint(path: Path, checkpoint: Checkpoint, extra: dict | None = None) -> None:
    """Write `checkpoint` (and `extra`, e.g. optimizer and RNG state for resume) atomically.

    Raises TypeError before touching the disk if anything is not a tensor or a plain value
    (a NumPy array, say), because such a file could not be opened with weights_only=True.
    """
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "decoder_config": checkpoint.decoder_config.to_dict(),
        "state_dict": {name: t.detach().cpu() for name, t in checkpoint.state_dict.items()},
        "vocabulary": list(checkpoint.vocabulary.words),
        "encoder_config": checkpoint.encoder_config.to_dict(),
        "store_fingerprint": checkpoint.store_fingerprint,
        "training": checkpoint.training,
        "weights_id": checkpoint.weights_id,
        "weights_checksum": checkpoint.weights_checksum,
        "corpus_sha256": checkpoint.corpus_sha256,
        "extra": extra or {},
    }
    _require_plain(payload, "checkpoint")
    with atomic_file(path, durable=True) as file:
        try:
            torch.save(payload, file)
        except RuntimeError as error:  # torch's writer wraps a failed write (a full disk)
            if isinstance(error.__context__, OSError):
                raise error.__context__ from None
            raise


def load_checkpoint(path: Path) -> tuple[Checkpoint, dict]:
    """The checkpoint at `path` and its `extra` dict; CaptionerError if it is missing, damaged
    or not a captioner checkpoint. Tensors are loaded onto the CPU."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "no such checkpoint file"
        raise CaptionerError(f"{path}: {what}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if _file_kind(path) not in ("torch archive", "pickle"):
            raise CaptionerError(_unreadable(path)) from None
        raise CaptionerError(
            f"{path}: not a captioner checkpoint, refused by safe loading ({_reason(error)})"
        ) from None
    except Exception:  # whatever a damaged or foreign file triggers means "unreadable"
        raise CaptionerError(_unreadable(path)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CaptionerError(f"{path}: not a captioner checkpoint (a torch file of another kind)")
    if payload.get("version") not in range(1, VERSION + 1):
        raise CaptionerError(
            f"{path}: checkpoint format version {payload.get('version')!r} is not supported "
            f"(this captioner reads versions 1 to {VERSION})"
        )
    try:
        decoder_config = DecoderConfig.from_dict(payload["decoder_config"])
        state_dict = dict(payload["state_dict"])
        if payload["version"] == 1:  # trained on raw features: identity statistics
            state_dict["feature_mean"] = torch.zeros(decoder_config.feature_size)
            state_dict["feature_std"] = torch.ones(decoder_config.feature_size)
        checkpoint = Checkpoint(
            decoder_config=decoder_config,
            state_dict=state_dict,
            vocabulary=Vocabulary(list(payload["vocabulary"])),
            encoder_config=EncoderConfig.from_dict(payload["encoder_config"]),
            store_fingerprint=str(payload["store_fingerprint"]),
            training=dict(payload["training"]),
            weights_id=str(payload.get("weights_id", "")),
            weights_checksum=str(payload.get("weights_checksum", "")),
            corpus_sha256=str(payload.get("corpus_sha256", "")),
        )
        _check_weights_fit_config(checkpoint)
    except (KeyError, TypeError, ValueError, IndexError, CaptionerError) as error:
        raise CaptionerError(f"{path}: damaged checkpoint ({_reason(error)})") from None
    return checkpoint, dict(payload.get("extra", {}))


def _unreadable(path: Path) -> str:
    """Why torch cannot read `path`, in our words rather than its reader's."""
    kind = _file_kind(path)
    if kind == "empty":
        return f"{path}: an empty file, not a checkpoint"
    if kind == "cut-short archive":
        size = path.stat().st_size
        return f"{path}: a truncated checkpoint (it ends early, at {size:,} bytes); copy it again"
    if kind in ("torch archive", "pickle"):
        return f"{path}: a damaged checkpoint (its contents do not read); copy it again"
    return f"{path}: not a checkpoint (not a file that torch.save writes)"


def _file_kind(path: Path) -> str:
    """What `path` holds: a "torch archive" (the zip archive torch.save writes), a "cut-short
    archive" (one that ends early: a copy cut short), a "pickle" (torch.save's older format),
    nothing ("empty") or "other"."""
    with open(path, "rb") as file:
        start = file.read(4)
    if not start:
        return "empty"
    if start == b"PK\x03\x04":
        return "torch archive" if zipfile.is_zipfile(path) else "cut-short archive"
    return "pickle" if start.startswith(b"\x80") else "other"


def _check_weights_fit_config(checkpoint: Checkpoint) -> None:
    """Every weight has the name and shape its decoder config implies (built on the CPU: a
    decoder built on the meta device has no memory, but initialising it there imports
    torch._dynamo, 2.8 s on a 2-core AMD EPYC against 0.26 s for building a COCO-size decoder;
    the CPU's random numbers are restored after, so loading a checkpoint draws none)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        expected = build_decoder(checkpoint.decoder_config).state_dict()
    got = checkpoint.state_dict
    if expected.keys() != got.keys():
        missing, unexpected = (
            sorted(expected.keys() - got.keys()),
            sorted(got.keys() - expected.keys()),
        )
        raise ValueError(
            f"weights do not fit the decoder: missing {missing}, unexpected {unexpected}"
        )
    for name, tensor in expected.items():
        if not isinstance(got[name], Tensor) or got[name].shape != tensor.shape:
            raise ValueError(f"weight {name} has the wrong shape for the decoder config")
    if len(checkpoint.vocabulary) != checkpoint.decoder_config.vocab_size:
        raise ValueError("the vocabulary size differs from the decoder's")


_PLAIN_SCALARS = (str, int, float, bool, type(None))
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple, torch.Size)


def _require_plain(value: object, where: str) -> None:
    """Tensors and plain values only. Exact types: a NumPy float64 *is* a float subclass, but
    pickles as a NumPy object that weights_only loading refuses."""
    if isinstance(value, Tensor) or type(value) in _PLAIN_SCALARS:
        return
    if type(value) not in _PLAIN_CONTAINERS:
        raise TypeError(f"{where}: {type(value).__name__} cannot go into a checkpoint")
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} is neither str nor int")
            _require_plain(item, f"{where}[{key!r}]")
    else:
        for i, item in enumerate(value):
            _require_plain(item, f"{where}[{i}]")


def _reason(error: BaseException) -> str:
    """The informative line of an error. torch's weights_only refusal wraps its reason in advice
    (including to load with weights_only=False, which we never do); keep only the reason."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(boilerplate)]
    reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."
