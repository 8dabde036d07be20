"""The frozen encoder: shapes, seeded random weights, local weight files and refusals."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

from captioner.encoder import (
    ENCODER_NAMES,
    EncoderConfig,
    RandomWeightsWarning,
    build_encoder,
    image_transform,
    pretrained_weights,
)
from captioner.errors import CaptionerError


def test_tiny_encoder_is_frozen_seeded_and_shaped_like_a_resnet():
    config = EncoderConfig("tiny", "none", 128)
    encoder = build_encoder(config)
    assert encoder.grid == (4, 4) and encoder.channels == 128
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    images = torch.randn(3, 3, 128, 128)
    features = encoder(images)
    assert features.shape == (3, 16, 128) and features.dtype == torch.float32
    encoder.train()
    assert not encoder.training  # stays frozen
    again = build_encoder(config)
    assert again.weights_checksum == encoder.weights_checksum
    assert torch.equal(again(images), features)
    # row r of the regions is grid cell (r // W, r % W) of the CNN's map
    maps = encoder.backbone(images)
    assert torch.equal(features[:, 5], maps[:, :, 1, 1])


def test_config_round_trips_through_a_dict():
    config = EncoderConfig("resnet50", "/tmp/w.pt", 224)
    assert EncoderConfig.from_dict(config.to_dict()) == config


def test_resnet152_at_448_px_gives_14x14x2048(tmp_path):
    Image.new("RGB", (500, 375), (90, 120, 200)).save(tmp_path / "one.jpg")
    config = EncoderConfig("resnet152", "none", 448)
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
        encoder = build_encoder(config)
    image = image_transform(config)(Image.open(tmp_path / "one.jpg").convert("RGB"))
    with torch.inference_mode():
        features = encoder(image[None])
    assert (encoder.grid, encoder.channels) == ((14, 14), 2048)
    assert features.shape == (1, 14 * 14, 2048)
    stored = features.half().float()  # the store's default dtype: random weights fit it
    assert torch.isfinite(stored).all() and float(stored.abs().max()) < 1000
    assert float((stored[0].std(0) > 1e-4).float().mean()) > 0.5  # most channels vary


def varied_pictures(config: EncoderConfig) -> torch.Tensor:
    """Two unlike pictures (a colour ramp, and a bright square on a dark ground), transformed."""
    ramp = Image.linear_gradient("L").convert("RGB").resize((80, 60))
    square = Image.new("RGB", (80, 60), (20, 30, 40))
    square.paste((250, 200, 10), (20, 10, 60, 50))
    transform = image_transform(config)
    return torch.stack([transform(ramp), transform(square)])


# (ResNet-152 is checked at its default size, 448 px, by the test above)
@pytest.mark.parametrize("name", [name for name in ENCODER_NAMES if name != "resnet152"])
def test_random_weights_give_finite_varied_maps_in_float16(name):
    config = EncoderConfig(name, "none", 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        encoder = build_encoder(config)
    with torch.inference_mode():
        maps = encoder(varied_pictures(config)).half().float()
    assert torch.isfinite(maps).all()
    # Far below float16's largest number (65504), so bigger pictures stay in range too.
    assert float(maps.abs().max()) < 1000
    per_channel_std = maps.reshape(-1, encoder.channels).std(0)
    assert float((per_channel_std > 1e-4).float().mean()) > 0.5  # most channels vary


def test_local_weights_file_is_loaded_and_identified(tmp_path):
    source = build_encoder(EncoderConfig("tiny", "none", 64))
    state = {key: value + 1 for key, value in source.backbone.state_dict().items()}
    torch.save(state, tmp_path / "tiny.pt")
    loaded = build_encoder(EncoderConfig("tiny", str(tmp_path / "tiny.pt"), 64))
    assert torch.equal(loaded.backbone[0].weight, state["0.weight"])
    assert loaded.weights_checksum != source.weights_checksum
    assert loaded.weights_id.startswith("file:tiny.pt:")


def test_bad_requests_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(CaptionerError, match="unknown encoder"):
        build_encoder(EncoderConfig("vgg", "none", 64))
    with pytest.raises(CaptionerError, match="no ImageNet weights"):
        build_encoder(EncoderConfig("tiny", "imagenet", 64))
    with pytest.raises(CaptionerError, match="weights file not found"):
        build_encoder(EncoderConfig("tiny", str(tmp_path / "nope.pt"), 64))
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(CaptionerError, match="not a PyTorch state dict"):
        build_encoder(EncoderConfig("tiny", str(tmp_path / "junk.pt"), 64))
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CaptionerError, match="does not fit encoder tiny"):
        build_encoder(EncoderConfig("tiny", str(tmp_path / "other.pt"), 64))


def test_the_command_line_and_the_tiny_encoder_start_without_torchvision_or_matplotlib():
    """Both take seconds to import: every command and every torchrun rank would pay them."""
    code = (
        "import sys, captioner.cli\n"
        "from captioner.encoder import EncoderConfig, build_encoder\n"
        "build_encoder(EncoderConfig('tiny', 'none', 64))\n"
        "print(sorted({'torchvision', 'matplotlib'} & sys.modules.keys()))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert completed.stdout.strip() == "[]"


def test_imagenet_is_torchvisions_default_and_a_recorded_name_pins_those_weights():
    from torchvision.models import ResNet50_Weights

    assert pretrained_weights("resnet50", "imagenet") is ResNet50_Weights.DEFAULT
    assert pretrained_weights("resnet50", "IMAGENET1K_V1") is ResNet50_Weights.IMAGENET1K_V1
    assert pretrained_weights("resnet50", "none") is None
    assert pretrained_weights("resnet50", "weights/resnet50.pt") is None  # a local file
    with pytest.raises(CaptionerError, match="no ImageNet weights"):
        pretrained_weights("tiny", "imagenet")


def test_the_smallest_image_size_gives_a_one_cell_grid():
    """At 32 px a ResNet's last map is 1x1; finding its shape must not trip batch norm, which
    refuses one value per channel in training mode."""
    with pytest.warns(RandomWeightsWarning):
        encoder = build_encoder(EncoderConfig("resnet18", "none", 32))
    assert (encoder.grid, encoder.channels) == ((1, 1), 512)
