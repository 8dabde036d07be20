#!/usr/bin/env bash
# `make bench-gpu`: every benchmark with --device cuda, each bounded so that the whole run takes
# at most about 14 minutes on one GPU; the output goes to bench/gpu-results.txt.
# bench/train.py needs the Flickr8k fixtures (../shared/fixtures/flickr8k) for its captions.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}

run() {  # one benchmark, at most $1 seconds
    local limit=$1
    shift
    echo "\$ $*"
    timeout "$limit" "$@"
    echo "(exit status $?)"
    echo
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    run 150 "$python" bench/extract.py pipeline --device cuda --images 1024  # 4 precisions
    run 130 "$python" bench/train.py --device cuda --repeats 3
    run 120 "$python" bench/reader.py --maps 1024 --threads 1 2 4 8 16 --steps 40 --repeats 2
    run 60 "$python" bench/attention_step.py --device cuda --images 16 --repeats 10
    run 45 "$python" bench/decode.py --device cuda --images 256 --model show-attend-tell
    run 45 "$python" bench/decode.py --device cuda --images 256 --model show-tell
    run 45 "$python" bench/decode.py --device cuda --images 256 --model transformer
    run 45 "$python" bench/mfu.py --device cuda --repeats 10
    run 120 "$python" bench/caption.py --device cuda --encoder resnet152 --image-size 448 \
        --images 512 --batch-size 64 --workers 8  # 3 precisions
    run 20 "$python" bench/scst.py --device cuda --repeats 5
} 2>&1 | tee bench/gpu-results.txt
