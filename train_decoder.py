"""Phase 2 entry point: `python train_decoder.py --features STORE.zarr --model ... --out runs/NAME`.

The same as `captioner train`; launch with `torchrun --nproc_per_node=K train_decoder.py ...` to
train with DistributedDataParallel.
"""

from captioner.cli import script

if __name__ == "__main__":
    script("train").main(prog_name="train_decoder.py")
