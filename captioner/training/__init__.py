"""The parts of a training run that captioner.train puts together, one concern a module:

data         the corpus a run trains on, the rows of each split, their feature streams
run          the decoder under training with its optimizer, mixed precision and DDP wrapper
resume       what best.pt and last.pt hold, writing them, and resuming from last.pt
validation   validation loss, greedy decodes, BLEU-4, and the sample caption's attention maps
metrics_log  an epoch's metrics row, metrics.jsonl and curves.png
"""
