#!/usr/bin/env bash
# GPU check, for a machine with a GPU and no network (see ../shared/device/README.md for Ray/Optuna):
#   1. extraction efficiency: full pipeline (JPEG decode + transforms + backbone) vs a bare backbone
#      forward on preloaded tensors, resnet34 @ 224, bf16 autocast + channels_last;
#   2. the same at photo sizes (256 px, 2 MP, 12 MP JPEGs made by benchmarks/photos.py, VIEWS views each):
#      phases per image (decode, transforms, copy, forward), the pipeline's steady-state img/s against
#      the bare forward and against full-size decodes, and batched GPU JPEG decoding (nvjpeg) against
#      the CPU's draft decode (a measurement: the pipeline decodes on the CPU);
#   3. the quick search, 30 samples, with the feature bank vs --bank off, trials on
#      fractional GPUs (results.csv records each trial's device and GPU ids).
# Runs from the source tree (PYTHONPATH), --weights none, a demo set generated on the spot.
# Tiny CPU setting for tests: DEVICE=cpu SAMPLES=2 PER_CLASS=8 EPOCHS=2 BACKBONE=resnet18 SIZE=32
#   PHOTOS="256 320x240" PHOTO_IMAGES=8 PHOTO_DISTINCT=4 MODES=on
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TUNE_RICE_OFFLINE=1
DEVICE=${DEVICE:-cuda}; SAMPLES=${SAMPLES:-30}; PER_CLASS=${PER_CLASS:-200}
BACKBONE=${BACKBONE:-resnet34}; SIZE=${SIZE:-224}; EPOCHS=${EPOCHS:-}
PHOTOS=${PHOTOS:-256 2mp 12mp}; VIEWS=${VIEWS:-4}; PHOTO_IMAGES=${PHOTO_IMAGES:-4096}; PHOTO_DISTINCT=${PHOTO_DISTINCT:-256}
MODES=${MODES:-on off}  # the searches of step 3: with the bank, without it
OUT=${OUT:-${TMPDIR:-/tmp}/tune-rice-gpu-check}
mkdir -p "$OUT"
export TUNE_RICE_CACHE="$OUT/cache"
PY=${PYTHON:-python3}

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  GPU_ARGS=(--gpus-per-trial 0.25 --cpus-per-trial 2 --concurrency 4)
else
  GPU_ARGS=(--cpus-per-trial 1 --concurrency 2)
fi
EPOCH_ARGS=(); [ -n "$EPOCHS" ] && EPOCH_ARGS=(--max-epochs "$EPOCHS")

$PY benchmarks/bench_extract.py --device "$DEVICE" --backbone "$BACKBONE" --image-size "$SIZE" \
    --batch-size 128 --per-class "$PER_CLASS" --out "$OUT/extract.json"
# shellcheck disable=SC2086  # PHOTOS is a list of sizes
$PY benchmarks/bench_extract.py --device "$DEVICE" --backbone "$BACKBONE" --image-size "$SIZE" \
    --batch-size 256 --per-class "$PER_CLASS" --photos $PHOTOS --views "$VIEWS" --images "$PHOTO_IMAGES" \
    --distinct "$PHOTO_DISTINCT" --wall-images 0 --feature-shift 0 --gpu-decode --out "$OUT/photos.json"
# One JSON per mode, the bank first: a run cut short by a time limit still leaves the finished mode's figures.
# shellcheck disable=SC2086  # MODES is a list of modes
for mode in $MODES; do
  $PY benchmarks/bench_search.py --space quick --num-samples "$SAMPLES" --per-class "$PER_CLASS" --modes "$mode" \
      --work "$OUT/search" "${GPU_ARGS[@]}" "${EPOCH_ARGS[@]}" --out "$OUT/search_$mode.json"
done

$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
import pandas as pd
out = Path(sys.argv[1])
e = json.loads((out / "extract.json").read_text())
runs = {r["mode"]: r for f in sorted(out.glob("search_o*.json")) for r in json.loads(f.read_text())["runs"]}
print("\n== gpu_check summary ==")
print(f"device {e['device']} {e.get('gpu') or ''} | torch {e['torch']} | {e['backbone']} @ {e['image_size']}px, batch {e['batch_size']}")
print(f"extraction: bare {e['bare_images_per_s']:.0f} img/s, full {e['full_images_per_s']:.0f} img/s, efficiency {e['efficiency']:.2f}")
ph = json.loads((out / "photos.json").read_text())
print(f"photo sizes: {ph['backbone']} @ {ph['image_size']}px, {ph['views']} views, {ph['images']} images "
      f"({ph['distinct_images'] or ph['images']} distinct), ms per image in one process; img/s of the pipeline from its second batch on")
print("| size | MP | MB | decode | transforms | copy | forward | pipeline | full-size decode | bare | pipeline/bare | workers | GPU decode | CPU draft decode (all workers) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in ph["rows"]:
    p, g = r["phases"], r.get("gpu_decode", {})
    cpu = r["workers"] * 1000 / p["decode_ms"] if r["workers"] else 1000 / p["decode_ms"]
    gpu = f"{g['gpu_images_per_s']:.0f} img/s" if g.get("measured") else f"unmeasured ({g.get('why', 'not run')})"
    print(f"| {r['size']} | {r['megapixels']} | {r['mean_mb']:.2f} | {p['decode_ms']:.1f} | {p['transforms_ms']:.1f} | "
          f"{p['copy_ms']:.2f} | {p['forward_ms']:.2f} | {r['pipeline']['steady_images_per_s']:.0f} | "
          f"{r['full_size_pipeline']['steady_images_per_s']:.0f} | {r['bare_images_per_s']:.0f} | {r['efficiency']:.2f} | "
          f"{r['workers']} | {gpu} | {cpu:.0f} img/s |")
for mode, r in sorted(runs.items(), key=lambda kv: kv[0] != "on"):  # the bank's run first
    res = pd.read_csv(Path(r["log"]).with_suffix("").parent / "runs" / Path(r["log"]).stem / "results.csv")
    devices = ",".join(sorted(set(map(str, res["device"].dropna()))))
    gpus = ",".join(sorted(set(map(str, res["gpu_ids"].dropna()))))
    print(f"search {mode:3}: {r['wall_s']:7.1f}s wall (extract {r['phases'].get('extract', 0):.1f}s, trials "
          f"{r['phases'].get('trials', 0):.1f}s), best valid {r['best_valid']:.4f}, test {r['test_acc']:.4f}, "
          f"ASHA-stopped {r['stopped_early']}/{r['trials']}, trial devices [{devices}] gpu ids [{gpus}]")
if "on" in runs and "off" in runs:
    print(f"search speed-up (off / on): {runs['off']['wall_s'] / runs['on']['wall_s']:.1f}x")
PYEOF
