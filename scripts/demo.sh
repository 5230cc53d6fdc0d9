#!/usr/bin/env bash
# The main job: train SwinV2 on real images bundled with scikit-learn (1,797 handwritten digits),
# then evaluate the best checkpoint. About two minutes on 2 CPU cores; no download.
. "$(dirname "$0")/_env.sh" base
out=${1:-runs/digits-$(date +%Y%m%d-%H%M%S)}
swinv2 train --output "$out" "${@:2}"
swinv2 eval --checkpoint "$out/model-best.safetensors"
echo "run folder: $out (metrics.jsonl, loss.png, accuracy.png, lr.png, tb/, checkpoints)"
