"""Checkpoints round-trip through torch.load(weights_only=True), write atomically, and refuse
missing, damaged and foreign files with one clear line."""

import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from captioner.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from captioner.encoder import EncoderConfig
from captioner.errors import CaptionerError
from captioner.models import DecoderConfig, build_decoder
from captioner.text import SPECIAL_TOKENS, START_ID, Vocabulary

WORDS = [*SPECIAL_TOKENS, "a", "dog", "runs", "on", "grass", "red", "ball"]


def make_checkpoint(model: str = "show-attend-tell") -> Checkpoint:
    torch.manual_seed(0)
    config = DecoderConfig(model, len(WORDS), 8, embed_size=6, hidden_size=10, attention_size=5)
    decoder = build_decoder(config)
    return Checkpoint(
        decoder_config=config,
        state_dict=decoder.state_dict(),
        vocabulary=Vocabulary(WORDS),
        encoder_config=EncoderConfig(name="tiny", weights="none", image_size=32),
        store_fingerprint="f1ngerprint",
        training={"epoch": 3, "metrics": {"val_bleu4": 0.25}, "options": {"lr": 4e-4, "seed": 1}},
    )


@pytest.mark.parametrize("model", ["show-tell", "show-attend-tell"])
def test_loading_a_checkpoint_draws_no_random_numbers(tmp_path, model):
    """Runs load checkpoints between seeding and sampling (SCST's --init, a resume): the check
    that the weights fit their config must leave the random stream where it was."""
    path = tmp_path / "best.pt"
    save_checkpoint(path, make_checkpoint(model))
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    load_checkpoint(path)
    assert torch.equal(torch.rand(4), expected)


def test_round_trip_gives_identical_outputs(tmp_path):
    checkpoint = make_checkpoint()
    original = build_decoder(checkpoint.decoder_config)
    original.load_state_dict(checkpoint.state_dict)
    original.eval()
    optimizer = torch.optim.Adam(original.parameters())
    features = torch.randn(3, 4, 8)
    original.training_loss(
        features, torch.arange(3), torch.tensor([[1, 4, 5, 2]] * 3), torch.tensor([4, 4, 4])
    ).loss.backward()
    optimizer.step()
    extra = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
    path = tmp_path / "runs" / "best.pt"  # the parent directory does not exist yet
    save_checkpoint(path, make_checkpoint_from(original, checkpoint), extra)

    torch.load(path, weights_only=True)  # opens without any unpickling of code
    loaded, loaded_extra = load_checkpoint(path)
    assert loaded.decoder_config == checkpoint.decoder_config
    assert loaded.vocabulary.words == WORDS
    assert loaded.encoder_config == checkpoint.encoder_config
    assert loaded.store_fingerprint == "f1ngerprint"
    assert loaded.training == checkpoint.training
    torch.testing.assert_close(loaded_extra["torch_rng"], extra["torch_rng"])
    resumed = torch.optim.Adam(original.parameters())
    resumed.load_state_dict(loaded_extra["optimizer"])

    decoder = loaded.build_decoder("cpu")
    assert not decoder.training
    for got, expected in zip(
        first_step(decoder, features), first_step(original, features), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def make_checkpoint_from(decoder, template: Checkpoint) -> Checkpoint:
    return Checkpoint(**{**template.__dict__, "state_dict": decoder.state_dict()})


@torch.no_grad()
def first_step(decoder, features):
    """Log-probs and attention of the first decoding step."""
    memory = decoder.encode(features)
    log_probs, _, alpha = decoder.step(
        torch.full((features.size(0),), START_ID), decoder.init_state(memory), memory
    )
    return log_probs, alpha


def test_save_is_atomic_and_refuses_non_plain_values(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, make_checkpoint("show-tell"))
    save_checkpoint(path, make_checkpoint("show-tell"), {"epoch": 2})  # overwrite in place
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\['numpy_rng'\]"):
        save_checkpoint(path, make_checkpoint("show-tell"), {"numpy_rng": np.zeros(3)})
    with pytest.raises(TypeError, match="float64"):
        save_checkpoint(path, make_checkpoint("show-tell"), {"best": np.float64(0.5)})
    assert path.read_bytes() == before  # a failed save never damages the previous checkpoint
    assert os.listdir(tmp_path) == ["last.pt"]  # and leaves no temporary file behind
    assert load_checkpoint(path)[1] == {"epoch": 2}


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such checkpoint file"),
        ("folder", "is a folder, not a checkpoint file"),
        (b"", "an empty file, not a checkpoint"),
        (b"\x00garbage" * 10, r"not a checkpoint \(not a file that torch.save writes\)"),
        ("truncated", r"a truncated checkpoint \(it ends early, at 300 bytes\); copy it again"),
        ("cut at the end", "a truncated checkpoint"),
        ("evil", "refused by safe loading .*posix.system"),
        ("foreign", "not a captioner checkpoint"),
        ("future", "version 99 is not supported"),
        ("mismatch", "damaged checkpoint"),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "folder":
        path.mkdir()
    elif content in ("truncated", "cut at the end"):
        save_checkpoint(path, make_checkpoint())
        data = path.read_bytes()
        path.write_bytes(data[:300] if content == "truncated" else data[:-10])
    elif content == "evil":
        with open(path, "wb") as file:
            pickle.dump({"format": "captioner-checkpoint", "x": _Evil()}, file, protocol=2)
    elif content == "foreign":
        torch.save(build_decoder(make_checkpoint().decoder_config).state_dict(), path)
    elif content == "future":
        torch.save({"format": "captioner-checkpoint", "version": 99}, path)
    elif content == "mismatch":
        checkpoint = make_checkpoint()
        checkpoint.decoder_config.hidden_size = 12  # weights were made for hidden_size=10
        save_checkpoint(path, checkpoint)
    with pytest.raises(CaptionerError, match=message) as caught:
        load_checkpoint(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "pwned").exists()


def test_a_version_1_checkpoint_loads_with_identity_feature_statistics(tmp_path):
    """Version 1 predates feature statistics: its decoder read raw features, as zeros/ones do."""
    checkpoint = make_checkpoint()
    path = tmp_path / "v1.pt"
    save_checkpoint(path, checkpoint)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 1
    for name in ("feature_mean", "feature_std"):
        del payload["state_dict"][name]
    torch.save(payload, path)
    decoder = load_checkpoint(path)[0].build_decoder()
    torch.testing.assert_close(decoder.feature_mean, torch.zeros(8))
    torch.testing.assert_close(decoder.feature_std, torch.ones(8))


def test_provenance_round_trips_and_a_version_2_checkpoint_has_none(tmp_path):
    """Version 3 records the encoder weights and the corpus digest; version 2 did not, and loads
    with them empty (which evaluate and caption take as "not recorded", checking nothing)."""
    recorded = replace(
        make_checkpoint(),
        weights_id="ResNet152_Weights.IMAGENET1K_V2",
        weights_checksum="ab" * 32,
        corpus_sha256="cd" * 32,
    )
    path = tmp_path / "v3.pt"
    save_checkpoint(path, recorded)
    loaded = load_checkpoint(path)[0]
    assert (loaded.weights_id, loaded.weights_checksum, loaded.corpus_sha256) == (
        recorded.weights_id,
        recorded.weights_checksum,
        recorded.corpus_sha256,
    )
    payload = torch.load(path, weights_only=True)
    payload["version"] = 2
    for name in ("weights_id", "weights_checksum", "corpus_sha256"):
        del payload[name]
    torch.save(payload, path)
    old = load_checkpoint(path)[0]
    assert (old.weights_id, old.weights_checksum, old.corpus_sha256) == ("", "", "")
