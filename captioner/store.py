"""The feature store: one self-contained Zarr v3 group per (dataset, encoder settings).

Row i of every per-image array belongs to ``corpus.images[i]`` of the corpus stored inside, so a
laptop needs only the store to train and evaluate.

| node              | shape      | dtype           | chunking                                  |
|-------------------|------------|-----------------|-------------------------------------------|
| spatial           | (N, L, C)  | float16/float32 | inner chunk 1 image, shard S images       |
| pooled            | (N, C)     | float32         | chunk S images (mean over the L regions)  |
| status            | (N,)       | uint8           | chunk S: pending / done / failed          |
| failure           | (N,)       | string          | chunk S: why an image failed, else ""     |
| image_id, image_path, split | (N,) | string, string, uint8 (names in attrs) |            |
| captions/text, captions/tokens, captions/image | (M,) | string, string, int32 |           |

Safety rules: a writer owns whole shards (zarr rewrites a shard as a whole, so two writers on
one shard would lose data); a shard's `status` chunk is written only after its features, so a
killed run leaves every shard either fully done or pending; zarr writes each chunk file to a
temporary name and renames it, so no file is ever half-written. Rows that are not done hold NaN,
never zeros that could pass for features. A store may also live in object storage (a
RemoteStore, ``s3://bucket/name.zarr``), where atomic PUTs in a fixed order take the place of
the renames: captioner.object_store says how.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from captioner import __version__
from captioner.corpus import (
    RESTVAL,
    SPLITS,
    UNASSIGNED,
    CaptionRecord,
    Corpus,
    ImageRecord,
    SkippedLine,
)
from captioner.encoder import EncoderConfig
from captioner.errors import CaptionerError
from captioner.files import named_after
from captioner.object_store import RemoteStore, remote_errors
from captioner.progress import ShowProgress, tracked
from captioner.readers import read_corpus
from captioner.zarr_rows import ShardDecoder, read_array_rows

SCHEMA_VERSION = 1
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
STATUS_NAMES = {STATUS_PENDING: "pending", STATUS_DONE: "done", STATUS_FAILED: "failed"}
SPLIT_NAMES = (*SPLITS, RESTVAL, UNASSIGNED)
DTYPES = ("float16", "float32")
# Chosen by measurement (bench/extract.py, bench/RESULTS.md "extract" section).
DEFAULT_IMAGES_PER_SHARD = 64
DEFAULT_COMPRESSION = "zstd"
# Where a store lives: a folder on a disk, or a prefix in object storage.
StoreLocation = Path | RemoteStore
COMPRESSIONS = ("none", "zstd", "blosc-lz4")
COMPUTED_PRECISIONS = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class StoreSettings:
    """Everything that decides the stored numbers; a resumed run must match them exactly."""

    encoder: EncoderConfig
    weights_id: str
    weights_checksum: str
    grid: tuple[int, int]
    channels: int
    dtype: str = "float16"
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD
    compression: str = DEFAULT_COMPRESSION
    # What the encoder computed in: "float32", or under autocast "bfloat16" (or "float16", on a
    # CUDA GPU without bf16). None: not recorded, in stores made before it was (those computed
    # in float32 on a CPU and under bfloat16 autocast on CUDA).
    precision: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CaptionerError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if self.precision not in (None, *COMPUTED_PRECISIONS):
            raise CaptionerError(
                f"precision {self.precision!r} is not one of {COMPUTED_PRECISIONS}"
            )
        if self.compression not in COMPRESSIONS:
            raise CaptionerError(f"compression {self.compression!r} is not one of {COMPRESSIONS}")
        if self.images_per_shard < 1:
            raise CaptionerError(
                f"images per shard must be at least 1, not {self.images_per_shard}"
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["encoder"] = self.encoder.to_dict()
        data["grid"] = list(self.grid)
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> StoreSettings:
        fields = dict(data)
        fields["encoder"] = EncoderConfig.from_dict(fields["encoder"])
        fields["grid"] = tuple(int(n) for n in fields["grid"])
        return cls(**fields)


def corpus_digest(corpus: Corpus) -> str:
    """sha256 of the images (id, path, split) and captions: equal digests, equal corpora."""
    digest = hashlib.sha256()
    for image in corpus.images:
        digest.update(json.dumps([image.id, image.path, image.split]).encode())
    for caption in corpus.captions:
        digest.update(json.dumps([caption.image, caption.raw, list(caption.tokens)]).encode())
    return digest.hexdigest()


def store_fingerprint(settings: StoreSettings, image_ids: list[str]) -> str:
    """Stable hash of the encoder config, its weights checksum and the image ids (in row order):
    a checkpoint trained on one store can tell whether another store holds the same features."""
    payload = json.dumps(
        [settings.encoder.to_dict(), settings.weights_checksum, image_ids], sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class FeatureStore:
    """Read access to a feature store (see the module docstring for the schema)."""

    def __init__(self, path: StoreLocation, group: zarr.Group):
        self.path = _location(path)
        self._group = group
        self.attrs: dict = dict(group.attrs)
        self.settings = StoreSettings.from_dict(self.attrs["settings"])
        self.num_images: int = int(group["status"].shape[0])
        self.grid: tuple[int, int] = self.settings.grid
        self.channels: int = self.settings.channels
        self.dtype: str = self.settings.dtype
        self.images_per_shard: int = self.settings.images_per_shard
        self.encoder_config: EncoderConfig = self.settings.encoder
        self.fingerprint: str = self.attrs["fingerprint"]
        # Whole shards of maps decoded in one pass, where the layout is the one written today.
        self._spatial_shards = ShardDecoder.for_array(group["spatial"])

    @classmethod
    def open(cls, path: StoreLocation) -> FeatureStore:
        """Open read-only; CaptionerError, in our words, if `path` is not a complete store."""
        path = _location(path)
        _check_store_metadata(path)
        try:
            return cls(path, open_group(path, mode="r"))
        except (OSError, KeyError, ValueError, TypeError) as error:
            missing = f"no {error.args[0]!r}" if isinstance(error, KeyError) else "unreadable"
            raise CaptionerError(
                f"{path}: an incomplete or damaged feature store ({missing}); extract it again"
            ) from None

    def __reduce__(self):
        # DataLoader workers may receive a store: send the path, not the open zarr handles.
        return FeatureStore.open, (self.path,)

    def image_ids(self) -> list[str]:
        return self._group["image_id"][:].tolist()

    def status(self) -> np.ndarray:
        """(N,) uint8: STATUS_PENDING, STATUS_DONE or STATUS_FAILED per row."""
        return np.asarray(self._group["status"][:], dtype=np.uint8)

    def split_indices(self, split: str) -> np.ndarray:
        """Rows of that split whose features are done, ascending (empty for an unknown split)."""
        names = self.attrs["split_names"]
        if split not in names:
            return np.zeros(0, dtype=np.int64)
        codes = self._group["split"][:]
        return np.flatnonzero((codes == names.index(split)) & (self.status() == STATUS_DONE))

    def read_pooled(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(n, C) float32 mean features of `rows` (all rows when None), in the order given."""
        if rows is None:
            rows = np.arange(self.num_images)
        return self._read("pooled", rows)

    def read_spatial(self, rows: np.ndarray) -> np.ndarray:
        """(n, L, C) region features of `rows` in the stored dtype, in the order given.
        Rows from few shards read fastest: reading whole shards is the efficient unit."""
        return self._read("spatial", rows)

    def array_codecs(self, name: str) -> tuple:
        """The codecs of the array `name` as its metadata lists them."""
        return tuple(self._group[name].metadata.codecs)

    def read(self, kind: str, rows: np.ndarray) -> np.ndarray:
        """What a decoder of feature kind `kind` reads for `rows`: "pooled" (n, C) float32 or
        "spatial" (n, L, C) in the stored dtype. Refused in one line (CaptionerError naming the
        rows and their images) where a row holds NaN or inf: a decoder would train on it, or
        caption it, without a sign that anything is wrong."""
        if kind not in ("pooled", "spatial"):
            raise ValueError(f"unknown feature kind {kind!r}")
        values = self._read(kind, rows)
        bad = non_finite_rows(values)
        if len(bad):
            raise CaptionerError(self._describe_non_finite(kind, np.asarray(rows)[bad]))
        return values

    def _describe_non_finite(self, kind: str, rows: np.ndarray, shown: int = 5) -> str:
        ids = self.image_ids()
        named = ", ".join(f"row {row} ({ids[row]})" for row in rows[:shown].tolist())
        more = f" and {len(rows) - shown} more" if len(rows) > shown else ""
        return (
            f"{self.path}: NaN or inf in the {kind} features of {named}{more}; `captioner"
            f" features verify {self.path}` lists every such image: extract the store again"
            " (--dtype float32 where float16 overflowed, or other --weights)"
        )

    def read_shard(self, name: str, shard: int) -> np.ndarray:
        """All rows of one shard of the array `name` ("spatial" or "pooled"), as stored; raises
        what the codecs raise for a damaged chunk (ValueError, RuntimeError)."""
        with _faults_named(self.path):
            if name == "spatial" and self._spatial_shards is not None:
                return self._spatial_shards.read_shard(shard)
            start = shard * self.images_per_shard
            return np.asarray(self._group[name][start : start + self.images_per_shard])

    def _read(self, name: str, rows: np.ndarray) -> np.ndarray:
        try:
            with _faults_named(self.path):
                if name == "spatial" and self._spatial_shards is not None:
                    return self._spatial_shards.read_rows(rows)
                return read_array_rows(self._group[name], rows)
        except CHUNK_ERRORS as error:
            failure = error
        for shard in np.unique(np.asarray(rows) // self.images_per_shard).tolist():
            try:
                self.read_shard(name, shard)
            except CHUNK_ERRORS as error:
                start = shard * self.images_per_shard
                stop = min(start + self.images_per_shard, self.num_images)
                raise CaptionerError(
                    f"{self.path}: {name} shard {shard} (rows {start}-{stop - 1}) is damaged"
                    f" ({error}); list every damaged shard with `captioner features verify"
                    f" {self.path}`, then re-extract them: the extraction command plus --repair"
                ) from None
        raise failure  # no shard is damaged: not the store's fault

    def corpus(self, progress: ShowProgress = False) -> Corpus:
        """The caption corpus the store carries (at MS-COCO's size, 616k captions to rebuild)."""
        ids = self.image_ids()
        paths = self._group["image_path"][:].tolist()
        names = self.attrs["split_names"]
        splits = [names[code] for code in self._group["split"][:].tolist()]
        images = [ImageRecord(i, p, s) for i, p, s in zip(ids, paths, splits, strict=True)]
        columns = zip(
            self._group["captions/image"][:].tolist(),
            self._group["captions/text"][:].tolist(),
            self._group["captions/tokens"][:].tolist(),
            strict=True,
        )
        total = self._group["captions/image"].shape[0]
        captions = [
            CaptionRecord(int(image), text, tuple(tokens.split()))
            for image, text, tokens in tracked(
                columns, progress, "store's captions", total=total, unit="cap"
            )
        ]
        stored = self.attrs["corpus"]
        skipped = [SkippedLine(*entry) for entry in stored["skipped"]]
        return Corpus(
            stored["format"],
            list(stored["sources"]),
            images,
            captions,
            skipped,
            stored["split_rule"],
        )

    def failures(self) -> list[tuple[str, str]]:
        """(image id, reason) of every failed row, in row order."""
        rows = np.flatnonzero(self.status() == STATUS_FAILED)
        if len(rows) == 0:
            return []
        ids = self._group["image_id"][:]
        reasons = read_array_rows(self._group["failure"], rows)
        return [(str(ids[row]), str(reason)) for row, reason in zip(rows, reasons, strict=True)]

    def size_on_disk(self) -> int:
        if isinstance(self.path, RemoteStore):
            return self.path.size()
        return directory_size(self.path)

    def describe(self, max_failures: int = 20) -> str:
        """A human-readable summary: shape, dtype, counts by status and split, size, provenance."""
        status = self.status()
        codes = self._group["split"][:]
        names = self.attrs["split_names"]
        height, width = self.grid
        lines = [
            f"store        {self.path}",
            f"spatial      ({self.num_images}, {height * width}, {self.channels}) {self.dtype}"
            f"  grid {height}x{width}, {self.images_per_shard} images per shard,"
            f" {self.settings.compression}",
            f"precision    {self._describe_precision()}",
            f"size on disk {format_bytes(self.size_on_disk())}",
            "status       "
            + ", ".join(
                f"{name} {int((status == code).sum())}" for code, name in STATUS_NAMES.items()
            ),
            "splits       "
            + ", ".join(
                f"{name} {int((codes == code).sum())}"
                f" ({int(((codes == code) & (status == STATUS_DONE)).sum())} done)"
                for code, name in enumerate(names)
                if (codes == code).any()
            ),
            f"captions     {self._group['captions/text'].shape[0]}",
            f"encoder      {self.encoder_config.name} at {self.encoder_config.image_size} px,"
            f" weights {self.settings.weights_id}"
            f" (sha256 {self.settings.weights_checksum[:16]}...)",
            f"fingerprint  {self.fingerprint}",
            f"sources      {', '.join(self.attrs['corpus']['sources']) or '-'}",
            f"created      {self.attrs['created_at']} with "
            + ", ".join(f"{k} {v}" for k, v in self.attrs["versions"].items()),
        ]
        return "\n".join(lines + describe_failures(self.failures(), max_failures))

    def _describe_precision(self) -> str:
        precision = self.settings.precision
        if precision is None:
            return (
                "not recorded (a store made before stores recorded it: float32 if extracted on"
                " a CPU, bfloat16 autocast on CUDA)"
            )
        how = "float32" if precision == "float32" else f"{precision} autocast"
        return f"{how}: the encoder computed these features in it"


class StoreWriter:
    """Writes features shard by shard into a store made by `create_store`."""

    def __init__(self, path: StoreLocation):
        self.path = _location(path)
        group = open_group(self.path, mode="r+")
        self.settings = StoreSettings.from_dict(group.attrs["settings"])
        self._spatial = group["spatial"]
        self._pooled = group["pooled"]
        self._failure = group["failure"]
        self._status = group["status"]
        self.num_images = int(self._status.shape[0])
        self.images_per_shard = self.settings.images_per_shard
        self.num_shards = -(-self.num_images // self.images_per_shard)

    def shard_rows(self, shard: int) -> range:
        start = shard * self.images_per_shard
        return range(start, min(start + self.images_per_shard, self.num_images))

    def mark_pending(self, shard: int) -> None:
        """Make `shard` pending again, so that extraction redoes it (a repair)."""
        self._status[self._slice(shard)] = STATUS_PENDING

    def pending_shards(self) -> list[int]:
        """Shards with any pending row. Status flips per shard, so these are the unwritten ones."""
        status = np.asarray(self._status[:])
        return [
            s for s in range(self.num_shards) if (status[self._slice(s)] == STATUS_PENDING).any()
        ]

    def write_shard(
        self, shard: int, spatial: np.ndarray, pooled: np.ndarray, failures: Mapping[int, str]
    ) -> None:
        """Store one whole shard: `spatial` (n, L, C), `pooled` (n, C) and the failed rows' reasons
        keyed by row number. Failed rows are stored as NaN whatever `spatial` holds for them."""
        rows = self.shard_rows(shard)
        spatial = np.array(spatial, dtype=self.settings.dtype)
        pooled = np.array(pooled, dtype=np.float32)
        reasons = np.full(len(rows), "", dtype=object)
        status = np.full(len(rows), STATUS_DONE, dtype=np.uint8)
        for row, reason in failures.items():
            offset = rows.index(row)
            spatial[offset] = np.nan
            pooled[offset] = np.nan
            reasons[offset] = reason
            status[offset] = STATUS_FAILED
        where = self._slice(shard)
        with _faults_named(self.path):  # a full disk's or the network's error names the store
            self._spatial[where] = spatial
            self._pooled[where] = pooled
            self._failure[where] = reasons.astype(str)
            self._status[where] = status  # last: marks the shard durable

    def _slice(self, shard: int) -> slice:
        rows = self.shard_rows(shard)
        return slice(rows.start, rows.stop)


def create_store(
    path: StoreLocation,
    corpus: Corpus,
    settings: StoreSettings,
    provenance: Mapping | None = None,
    overwrite: bool = False,
) -> StoreWriter:
    """Create an empty store (every row pending) holding `corpus`, and return its writer.

    The store is built under a temporary name and renamed into place (in object storage:
    uploaded with its marker last), so a crash never leaves a half-made store at `path`. An
    existing `path` is replaced only with `overwrite`.
    """
    path = _location(path)
    if not corpus.images:
        raise CaptionerError(f"{path}: the corpus has no images to store")
    if path.exists() and not overwrite:
        raise CaptionerError(f"{path}: already exists (pass --overwrite to replace it)")
    if isinstance(path, RemoteStore):
        _create_remote_store(path, corpus, settings, dict(provenance or {}), overwrite)
        return StoreWriter(path)
    building = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with named_after(path, building):
            _write_empty_store(building, corpus, settings, dict(provenance or {}))
        if path.exists():
            old = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            os.rename(building, path)
            shutil.rmtree(old)
        else:
            os.rename(building, path)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return StoreWriter(path)


def _create_remote_store(
    location: RemoteStore,
    corpus: Corpus,
    settings: StoreSettings,
    provenance: dict,
    overwrite: bool,
) -> None:
    """Build the empty store on the local disk, then upload it marker last: a prefix left by a
    making that stopped is made again, anything else there is refused unless `overwrite`."""
    location.require_bucket()
    if not overwrite and not location.leftovers_are_a_store():
        raise CaptionerError(
            f"{location}: holds objects that are not a feature store (no zarr.json there);"
            " choose another --out, or pass --overwrite to delete them"
        )
    with tempfile.TemporaryDirectory(prefix="captioner-store-") as folder:
        building = Path(folder) / location.name
        _write_empty_store(building, corpus, settings, provenance)
        location.replace_with(building)


def open_group(location: StoreLocation, mode: str) -> zarr.Group:
    """The store's Zarr group, on a disk or in object storage."""
    if isinstance(location, RemoteStore):
        with remote_errors(location):
            return zarr.open_group(store=location.zarr_store(read_only=mode == "r"), mode=mode)
    return zarr.open_group(str(location), mode=mode)


def _location(path: StoreLocation | str) -> StoreLocation:
    return path if isinstance(path, RemoteStore) else Path(path)


def _faults_named(location: StoreLocation) -> contextlib.AbstractContextManager:
    """Errors of the block in one line naming the store: a disk's OSErrors, or object
    storage's denied access, missing bucket and unreachable endpoint."""
    if isinstance(location, RemoteStore):
        return remote_errors(location)
    return named_after(location, location)


def _write_empty_store(
    path: Path, corpus: Corpus, settings: StoreSettings, provenance: dict
) -> None:
    num_images, per_shard = len(corpus.images), settings.images_per_shard
    regions = settings.grid[0] * settings.grid[1]
    compressors = _compressors(settings.compression)
    group = zarr.open_group(str(path), mode="w")

    def array(name: str, shape: tuple, chunks: tuple, dtype, fill_value, **options) -> zarr.Array:
        return group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value, **options
        )

    array(
        "spatial",
        (num_images, regions, settings.channels),
        (1, regions, settings.channels),
        settings.dtype,
        np.nan,
        shards=(per_shard, regions, settings.channels),
        compressors=compressors,
    )
    array(
        "pooled",
        (num_images, settings.channels),
        (per_shard, settings.channels),
        "float32",
        np.nan,
        compressors=compressors,
    )
    array("status", (num_images,), (per_shard,), "uint8", STATUS_PENDING)
    array("failure", (num_images,), (per_shard,), str, "")

    split_names = list(SPLIT_NAMES) + sorted({i.split for i in corpus.images} - set(SPLIT_NAMES))
    per_image = {
        "image_id": (str, [image.id for image in corpus.images]),
        "image_path": (str, [image.path for image in corpus.images]),
        "split": ("uint8", [split_names.index(image.split) for image in corpus.images]),
    }
    captions = corpus.captions
    per_caption = {
        "captions/text": (str, [c.raw for c in captions]),
        "captions/tokens": (str, [" ".join(c.tokens) for c in captions]),
        "captions/image": ("int32", [c.image for c in captions]),
    }
    for name, (dtype, values) in {**per_image, **per_caption}.items():
        length = len(values)
        stored = array(name, (length,), (max(length, 1),), dtype, "" if dtype is str else 0)
        if length:
            stored[:] = np.array(values, dtype=str if dtype is str else dtype)

    image_ids = [image.id for image in corpus.images]
    group.attrs.update(
        {
            "schema_version": SCHEMA_VERSION,
            "settings": settings.to_dict(),
            "fingerprint": store_fingerprint(settings, image_ids),
            "split_names": split_names,
            "corpus": {
                "format": corpus.format,
                "sources": [str(source) for source in corpus.sources],
                "sha256": corpus_digest(corpus),
                "skipped": [[s.source, s.line, s.reason, s.item] for s in corpus.skipped],
                "split_rule": corpus.split_rule,
            },
            "versions": _library_versions(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **provenance,
        }
    )


def _compressors(name: str) -> tuple:
    """The chunk codecs after serialization: the compression, then a crc32c checksum of every
    (compressed) chunk, so that a damaged copy is found instead of read as other numbers."""
    if name == "zstd":
        return (ZstdCodec(level=1), Crc32cCodec())
    if name == "blosc-lz4":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec())
    return (Crc32cCodec(),)


def _library_versions() -> dict:
    import torch
    import torchvision

    return {
        "captioner": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
    }


# What zarr's codecs raise for a damaged chunk: a checksum mismatch, or data that does not
# decompress.
CHUNK_ERRORS = (ValueError, RuntimeError)


def non_finite_rows(values: np.ndarray) -> np.ndarray:
    """Positions along the first axis of `values` (floats) of the rows holding a NaN or an
    infinity, ascending.

    It runs on every batch a decoder reads, so it tests bits: a float is NaN or infinite exactly
    when its exponent bits are all ones, i.e. when its bits without the sign, read as an unsigned
    integer, reach the exponent mask. On a training step's float16 maps that is about ten times
    faster than np.isfinite, which numpy computes through float32 (bench/finite_check.py).
    """
    values = np.ascontiguousarray(values)
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    bits = 8 * values.dtype.itemsize
    mantissa = np.finfo(values.dtype).nmant
    unsigned = values.view(f"u{values.dtype.itemsize}")
    magnitude = unsigned & unsigned.dtype.type((1 << (bits - 1)) - 1)
    exponent_mask = ((1 << (bits - 1)) - 1) ^ ((1 << mantissa) - 1)
    return np.flatnonzero(magnitude.reshape(len(values), -1).max(axis=1) >= exponent_mask)


def describe_failures(failures: list[tuple[str, str]], shown: int) -> list[str]:
    """Lines listing the failed images (image id, reason), at most `shown` of them."""
    if not failures:
        return []
    lines = [f"failed images ({len(failures)}):"]
    lines += [f"  {image_id}: {reason}" for image_id, reason in failures[:shown]]
    if len(failures) > shown:
        lines.append(f"  ... and {len(failures) - shown} more")
    return lines


def _check_store_metadata(path: StoreLocation) -> None:
    """CaptionerError unless `path` holds a Zarr group that says it is a store of our schema."""
    made_by = "`captioner extract` makes feature stores"
    if isinstance(path, RemoteStore):
        text = path.read_marker()
        if text is None:
            raise CaptionerError(f"{path}: no such feature store (no zarr.json); {made_by}")
    else:
        if not path.exists():
            raise CaptionerError(f"{path}: no such feature store")
        if not path.is_dir():
            raise CaptionerError(f"{path}: is a file, not a feature store (a folder, STORE.zarr)")
        try:
            text = (path / "zarr.json").read_bytes()
        except FileNotFoundError:
            raise CaptionerError(f"{path}: not a feature store (no zarr.json); {made_by}") from None
        except OSError:
            raise CaptionerError(
                f"{path}: a damaged feature store (zarr.json does not read)"
            ) from None
    try:
        metadata = json.loads(text.decode("utf-8"))
    except ValueError:
        raise CaptionerError(f"{path}: a damaged feature store (zarr.json does not read)") from None
    if not isinstance(metadata, dict) or metadata.get("node_type") != "group":
        raise CaptionerError(f"{path}: a Zarr array, not a feature store; {made_by}")
    attributes = metadata.get("attributes")
    version = attributes.get("schema_version") if isinstance(attributes, dict) else None
    if version is None:
        raise CaptionerError(f"{path}: a Zarr group but not a feature store; {made_by}")
    if version != SCHEMA_VERSION:
        raise CaptionerError(
            f"{path}: feature store schema version {version!r}; this captioner reads version"
            f" {SCHEMA_VERSION}"
        )


def remove_partial_files(path: StoreLocation) -> None:
    """Delete the temporary files of a killed writer (zarr writes ``*.partial``, then renames);
    object storage has none (a PUT is whole or nothing)."""
    if isinstance(path, RemoteStore):
        return
    for leftover in Path(path).rglob("*.partial"):
        leftover.unlink(missing_ok=True)


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def training_corpus(
    store: FeatureStore, captions: Path | None, progress: ShowProgress = False
) -> Corpus:
    """The store's corpus, or the caption file `captions` joined to the store's rows by image path
    (the images keep the store's row order; store images the file lacks get no captions)."""
    corpus = store.corpus(progress)
    if captions is None:
        return corpus
    override = read_corpus([Path(captions)], progress=progress)
    row_of = {image.path: row for row, image in enumerate(corpus.images)}
    split_of = {image.path: image.split for image in override.images}
    images = [
        ImageRecord(image.id, image.path, split_of.get(image.path, UNASSIGNED))
        for image in corpus.images
    ]
    joined = [
        CaptionRecord(row_of[override.images[c.image].path], c.raw, c.tokens)
        for c in override.captions
        if override.images[c.image].path in row_of
    ]
    if not joined:
        raise CaptionerError(f"{captions}: none of its images are in the store {store.path}")
    return Corpus(override.format, override.sources, images, joined, override.skipped)


def split_rows(corpus: Corpus, store: FeatureStore, split: str) -> np.ndarray:
    """Rows of `split` whose features are done and that have at least one caption."""
    done = store.status() == STATUS_DONE
    captioned = np.zeros(len(corpus.images), dtype=bool)
    captioned[[c.image for c in corpus.captions]] = True
    in_split = np.array([image.split == split for image in corpus.images], dtype=bool)
    return np.flatnonzero(done & captioned & in_split)
