"""captioner: image captioning from a frozen-CNN feature store."""

__version__ = "0.1.0"
