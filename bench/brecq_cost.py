"""What brecq and synthesis cost on an ImageNet-size model: torchvision resnet18 at 224x224 (random weights are
enough for timing). Prints seconds per block iteration (rounding + step-size iterations together, batch 32)
and seconds per synthesis iteration at half and full resolution (batch 16), and the CPU seconds used.

    python bench/brecq_cost.py                   # CPU
    python bench/brecq_cost.py --device cuda     # a GPU, when there is one
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_utils import cpu_seconds

from qexport.calibrators.base import CalibrationContext
from qexport.calibrators.brecq import BrecqConfig, calibrate_brecq
from qexport.data.synthesize import SynthConfig, synthesize_batch
from qexport.training.synthesis_run import load_zoo
from qexport.models import fold_batchnorm, load_model
from qexport.quant.plan import build_plan
from qexport.quant.quantsim import QuantSim
from qexport.quant.spec import BitsConfig



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=4, help="rounding iterations per block")
    ap.add_argument("--synth-iters", type=int, default=4, help="synthesis iterations per resolution")
    ap.add_argument("--num-images", type=int, default=64, help="calibration images (random)")
    args = ap.parse_args()
    m = load_model(args.model, None)
    folded = fold_batchnorm(m.model)
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse("w4a4")))
    data = torch.rand(args.num_images, *m.input_shape, generator=torch.Generator().manual_seed(0))
    c0 = cpu_seconds()
    metrics = calibrate_brecq(CalibrationContext(sim=sim, folded=folded, model=m, data=data, labels=None,
                                                 device=args.device, quiet=True),
                              BrecqConfig(iters=args.iters, act_iters=args.iters, batch_size=32))
    blocks = [{"block": b["block"], "s_per_iter": round(b["loop_seconds"] / (b["iters"] + b["act_iters"]), 3)}
              for b in metrics["block_metrics"]]
    brecq_cpu = cpu_seconds() - c0
    zoo = load_zoo(m, args.model, [], args.device)
    lab = torch.arange(16).to(args.device) % m.num_classes
    out = {}
    for name, size in (("half", tuple(s // 2 for s in m.input_shape[1:])), ("full", tuple(m.input_shape[1:]))):
        t0 = time.perf_counter()
        synthesize_batch(zoo, lab, size, SynthConfig(half_res_min=10**9), torch.Generator().manual_seed(0),
                         args.synth_iters, m.num_classes)
        out[name] = round((time.perf_counter() - t0) / args.synth_iters, 3)
    print(json.dumps({"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
                      "brecq_s_per_block_iter": blocks,
                      "brecq_s_per_iter_all_blocks": round(sum(b["s_per_iter"] for b in blocks), 3),
                      "brecq_cpu_s": round(brecq_cpu, 1), "synthesis_s_per_iter_batch16": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
