"""Phase 1: running a frozen CNN once over a dataset into a feature store, and keeping the store
whole. `extract_features(ExtractConfig(...))` runs it.

extract    the extraction run: images decoded in workers, the CNN, shards written in the
           background, resume after a kill, several ranks under torchrun
integrity  checking a store's shards against their checksums (`features verify`) and finding
           the damaged ones that `--repair` extracts again
"""

from captioner.extraction.extract import ExtractConfig, ExtractSummary, extract_features
from captioner.extraction.integrity import DamagedShard, damaged_shards

__all__ = ["DamagedShard", "ExtractConfig", "ExtractSummary", "damaged_shards", "extract_features"]
