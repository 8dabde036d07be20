"""MS-COCO caption annotations (`captions_train2014.json`, `captions_val2014.json`, 2017 alike):
``{"images": [{"id", "file_name", "coco_url"?}], "annotations": [{"image_id", "caption"}]}``.

Several files may be read into one corpus. The image path is `<folder>/<file_name>` with the
folder taken from `coco_url` (``.../train2014/COCO_train2014_...jpg``), the layout of the COCO
download and of Karpathy's `filepath`; without `coco_url` it is `file_name`. The id is COCO's
integer id as text. The files carry no split that matches the usual benchmark, so one is
derived from the id (see splits.py); use Karpathy's `dataset_coco.json` for the standard split.
"""

from __future__ import annotations

from captioner.readers.builder import CorpusBuilder
from captioner.readers.source import Source, json_field

FORMAT = "coco"


def looks_like(source: Source) -> bool:
    if not source.looks_like_json:
        return False
    data = source.json
    return (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    )


def image_path(file_name: str, coco_url: object) -> str:
    if isinstance(coco_url, str):
        parts = coco_url.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-1] == file_name and "." not in parts[-2]:
            return f"{parts[-2]}/{file_name}"
    return file_name


def read(source: Source, builder: CorpusBuilder) -> None:
    images = json_field(source, source.json, "images", list, "")
    annotations = json_field(source, source.json, "annotations", list, "")
    index_of_id: dict[str, int] = {}
    for i, image in enumerate(images):
        where = f"images[{i}]"
        image_id = str(json_field(source, image, "id", (int, str), where))
        file_name = json_field(source, image, "file_name", str, where)
        index_of_id[image_id] = builder.add_image(
            image_id, image_path(file_name, image.get("coco_url"))
        )
    for i, annotation in enumerate(annotations):
        where = f"annotations[{i}]"
        image_id = str(json_field(source, annotation, "image_id", (int, str), where))
        caption = json_field(source, annotation, "caption", str, where)
        if image_id not in index_of_id:
            builder.skip(source.path, 0, "caption of an image id not in images", where)
            continue
        builder.add_caption(index_of_id[image_id], caption, source.path, 0, where)
