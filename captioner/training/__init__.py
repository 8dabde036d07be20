"""Phase 2: training a caption decoder from a feature store. `train(TrainConfig(...))` runs it.

loop         the training loop: epochs, steps, validation, best.pt and last.pt, preemption
config       TrainConfig (every option, its default by model and what it accepts), TrainResult,
             and the decoder sizes a config stands for
data         the corpus a run trains on, the rows of each split, their feature streams
batches      reading the store into batches of features and encoded captions
objectives   what a step minimizes: cross entropy, or self-critical training (SCST)
reward       SCST's reward: CIDEr-D against the references, train-split document frequencies
run          the decoder under training with its optimizer, mixed precision and DDP wrapper
schedule     each step's learning rate: a linear warm-up, then constant
resume       what best.pt and last.pt hold, writing them, resuming, and SCST's starting point
validation   validation loss, greedy decodes, BLEU-4, CIDEr-D, the sample's attention maps
metrics_log  an epoch's metrics row, metrics.jsonl and curves.png
tensorboard  the optional TensorBoard event files
runs         `captioner runs`: a table and curves comparing finished runs
"""

from captioner.training.config import TrainConfig, TrainResult
from captioner.training.loop import train

__all__ = ["TrainConfig", "TrainResult", "train"]
