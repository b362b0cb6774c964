#!/usr/bin/env bash
# End-to-end demo on a fresh machine (no ../shared needed): scikit-learn ships the 8x8 handwritten digits;
# prepare_digits() writes them as 16x16 PNG folders and trains a small residual CNN on the CPU (cached in
# ~/.cache/qexport or $QEXPORT_CACHE). Then the four verbs: calibrate -> export -> build-engine -> verify.
#
#   pip install -e '.[demo]' && bash examples/demo.sh [RUN_FOLDER]     (default RUN_FOLDER: runs/digits)
set -euo pipefail

RUN="${1:-runs/digits}"

echo "== preparing the digits demo (training DigitsNet once, then cached)"
eval "$(python - <<'PY'
from qexport.zoo.digits import prepare_digits
d = prepare_digits()
print(f"WEIGHTS='{d['weights']}' TRAIN='{d['train']}' TEST='{d['test']}' SPEC='{d['spec']}'")
print(f"echo 'DigitsNet float test accuracy: {d['accuracy']:.2%}'")
PY
)"
mkdir -p "$RUN"

echo "== qexport calibrate"
qexport calibrate "$SPEC" --weights "$WEIGHTS" --method mse --bits w8a8 --data "$TRAIN" --num-samples 512 \
    -o "$RUN/recipe" --force --quiet
echo "== qexport export"
qexport export "$RUN/recipe" --target onnxruntime -o "$RUN/model.onnx" --force
echo "== qexport build-engine"
qexport build-engine "$RUN/model.onnx" --target onnxruntime -o "$RUN/engine" --force
echo "== qexport verify"
qexport verify "$RUN/engine" --recipe "$RUN/recipe" --data "$TEST" --report "$RUN/report" \
    --max-drop 1.0 --min-agreement 99.0 --force --quiet
