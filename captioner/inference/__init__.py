"""Using a trained decoder: scoring it on a split of a store, scoring other systems' captions,
captioning folders of images, and the pages people look at.

evaluate  decode a split of a store with a checkpoint and score it with coco-caption's metrics
score     score another system's captions (CSV or COCO results JSON) the same way
caption   caption files and folders of images end to end (CNN, decoder) to CSV or JSONL
report    report.html: every image with its caption, references, scores and attention

Import from the modules (`from captioner.inference.evaluate import evaluate`): the package
re-exports nothing, so that `captioner.inference.evaluate` is always the module.
"""
