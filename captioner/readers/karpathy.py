"""Karpathy's split files (`dataset_flickr8k.json`, `dataset_flickr30k.json`, `dataset_coco.json`):
``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw", "tokens"}]}]}``.

The image path is `filepath/filename` (COCO keeps train2014/ and val2014/ apart); the id is COCO's
`cocoid` when present, else the path. Captions are re-tokenized from `raw` so every format goes
through the same tokenizer; `tokens` is used only when `raw` is absent.
"""

from __future__ import annotations

from captioner.readers.builder import CorpusBuilder, split_name
from captioner.readers.source import Source, json_field

FORMAT = "karpathy"


def looks_like(source: Source) -> bool:
    if not source.looks_like_json:
        return False
    data = source.json
    images = data.get("images") if isinstance(data, dict) else None
    return (
        isinstance(images, list)
        and "annotations" not in data
        and (not images or isinstance(images[0], dict) and "sentences" in images[0])
    )


def read(source: Source, builder: CorpusBuilder) -> None:
    images = json_field(source, source.json, "images", list, "")
    for i, image in enumerate(images):
        where = f"images[{i}]"
        filename = json_field(source, image, "filename", str, where)
        sentences = json_field(source, image, "sentences", list, where)
        filepath = image.get("filepath") or ""
        path = f"{filepath}/{filename}" if filepath else filename
        image_id = str(image["cocoid"]) if "cocoid" in image else path
        split = None
        if image.get("split"):
            split = split_name(str(image["split"]))
            if split is None:
                builder.skip(source.path, 0, "unknown split name", where)
                continue
        index = builder.add_image(image_id, path, split)
        for j, sentence in enumerate(sentences):
            item = f"{where}.sentences[{j}]"
            if isinstance(sentence, dict) and "raw" not in sentence and "tokens" in sentence:
                raw = " ".join(json_field(source, sentence, "tokens", list, item))
            else:
                raw = json_field(source, sentence, "raw", str, item)
            builder.add_caption(index, raw, source.path, 0, item)
