#!/usr/bin/env bash
# The paper-size program end to end on whatever machine runs it (a GPU: minutes; a 2-core CPU:
# about half an hour, see BENCHMARKS.md):
#   raw-layout GTA5 (1914x1052) and Cityscapes val (2048x1024) files -> prepare_data.py ->
#   scripts/train.py --config configs/gta2cs.py with random encoders, 2 steps at global batch 2
#   in float32, a checkpoint of step 2, the sliding-window evaluation of the Cityscapes image
#   -> then the same command again (a finished run: resumes nothing, exits at once).
# Prints each stage's time and the training process's peak RSS. Not part of the test suite.
# Knobs: SMOKE_DIR (default /tmp/mfuser_smoke; wiped), VLM (clip|eva02|siglip; siglip needs a
# tokenizer), EXTRA (more --config.* overrides, e.g. --config.model.remat=False).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${SMOKE_DIR:-/tmp/mfuser_smoke}
VLM=${VLM:-clip}
EXTRA=${EXTRA:-}
rm -rf "$DIR"
mkdir -p "$DIR"
stamp() { date +%s; }
t0=$(stamp)

python - "$DIR/data" <<'PY'
import sys
sys.path.insert(0, ".")
from mfuser_jax.data.fake import write_fake_tree
root = sys.argv[1]
write_fake_tree(root, "gta", n=4, size=(1052, 1914), raw=True, block=64, seed=1)
write_fake_tree(root, "cityscapes", n=1, size=(1024, 2048), split="val", raw=True, block=64, seed=2)
print(f"wrote raw GTA5 (4 x 1914x1052) and Cityscapes val (1 x 2048x1024) under {root}")
PY
python scripts/prepare_data.py gta --root "$DIR/data"
python scripts/prepare_data.py cityscapes --root "$DIR/data"
t1=$(stamp)

run_train() {
  /usr/bin/time -v -o "$DIR/time.txt" python scripts/train.py \
    --config "configs/gta2cs.py:vlm=$VLM" --workdir "$DIR/run" \
    --config.model.pretrained= --config.data_root="$DIR/data" --config.batch_size=2 \
    --config.total_steps=2 --config.checkpoint_every=2 --config.eval_every=2 \
    --config.log_every=1 --config.model.dtype=float32 $EXTRA
}
run_train
t2=$(stamp)
peak_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$DIR/time.txt")

test -d "$DIR/run/checkpoints/2" || { echo "smoke: no checkpoint of step 2" >&2; exit 1; }
ls "$DIR"/run/eval/cityscapes_step2.json >/dev/null || { echo "smoke: no Cityscapes eval JSON" >&2; exit 1; }
run_train  # a finished run exits at once
t3=$(stamp)
python - "$DIR/run/eval/cityscapes_step2.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"cityscapes eval at step {r['step']}: mIoU {r['miou']:.2f} over {len(r['per_class'])} classes")
PY
echo "smoke: data $((t1 - t0)) s, train+eval $((t2 - t1)) s (peak RSS $((peak_kb / 1024)) MiB), rerun $((t3 - t2)) s"
