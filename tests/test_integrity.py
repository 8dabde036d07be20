"""Damaged stores: chunk checksums, `captioner features verify`, and one-line errors where
training and evaluation meet a damaged chunk (`extract --repair` is tested in test_extract.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from factories import damage, make_store
from zarr.codecs import ZstdCodec

from captioner import progress
from captioner import store as store_module
from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.extraction.integrity import damaged_shards, has_checksums
from captioner.store import FeatureStore


def verify(path: Path) -> tuple[int, list[str]]:
    code, lines, _ = verify_with_progress(path)
    return code, lines


def verify_with_progress(path: Path) -> tuple[int, list[str], str]:
    """The exit status, the lines on stdout, and stderr (where the progress bar goes)."""
    result = CliRunner().invoke(main, ["features", "verify", str(path)])
    return result.exit_code, result.stdout.strip().splitlines(), result.stderr


def test_a_sound_store_verifies_with_its_checksums(tmp_path, monkeypatch):
    path = make_store(tmp_path / "s.zarr", images=10, images_per_shard=4)
    monkeypatch.setattr(progress, "_now", itertools.count(0, 5).__next__)  # a long check
    assert has_checksums(FeatureStore.open(path))
    code, lines, shown = verify_with_progress(path)
    assert code == 0 and len(lines) == 1
    assert "3 shards" in lines[0] and "crc32c checksum matches" in lines[0]
    # Off a terminal (here) the bar is plain lines, counting what the summary says
    assert "verifying: 3/3 shard in " in shown and "shard/s" in shown


@pytest.mark.parametrize("array", ["spatial", "pooled"])
def test_a_flipped_byte_is_named_by_shard_rows_and_images(tmp_path, array):
    path = make_store(tmp_path / "s.zarr", images=10, images_per_shard=4)
    damage(path, array, 1)
    code, lines = verify(path)
    assert code == 1 and len(lines) == 1, lines
    assert f"{array} shard 1, rows 4-7, is damaged" in lines[0]
    assert "img_004.jpg, img_005.jpg, img_006.jpg, img_007.jpg" in lines[0]

    store = FeatureStore.open(path)
    read = store.read_spatial if array == "spatial" else store.read_pooled
    assert read(np.arange(0, 4)).shape[0] == 4  # the other shards still read
    with pytest.raises(CaptionerError) as error:
        read(np.array([2, 5]))
    message = str(error.value)
    assert "\n" not in message and f"{array} shard 1 (rows 4-7) is damaged" in message
    assert "captioner features verify" in message and "--repair" in message


def test_training_that_meets_a_damaged_chunk_stops_in_one_line(tmp_path):
    path = make_store(tmp_path / "s.zarr", images=12, images_per_shard=4)
    damage(path, "spatial", 0)
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--features",
            str(path),
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--min-count",
            "1",
            "--embed-size",
            "8",
            "--hidden-size",
            "8",
            "--attention-size",
            "4",
        ],
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith("Error: "), result.output
    assert "spatial shard 0 (rows 0-3) is damaged" in lines[-1]
    assert "Traceback" not in result.output


def test_a_store_from_before_checksums_still_reads_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_compressors", lambda name: (ZstdCodec(level=1),))
    path = make_store(tmp_path / "old.zarr", images=8, images_per_shard=4)
    monkeypatch.undo()
    store = FeatureStore.open(path)
    assert not has_checksums(store)
    assert store.read_spatial(np.arange(8)).shape[0] == 8
    assert list(damaged_shards(store)) == []
    code, lines = verify(path)
    assert code == 0 and "predates chunk checksums" in lines[-1]


def test_a_lost_shard_file_is_found_too(tmp_path):
    """A missing chunk file reads back as the fill value: verify flags finished rows that are
    empty, so a half-copied store is not taken for a sound one."""
    path = make_store(tmp_path / "s.zarr", images=12, images_per_shard=4)
    (path / "spatial" / "c" / "2" / "0" / "0").unlink()
    code, lines = verify(path)
    assert code == 1 and len(lines) == 1
    assert "spatial shard 2, rows 8-11" in lines[0] and "a chunk file is missing" in lines[0]
