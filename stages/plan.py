"""Stage `plan`: will a params file's run fit the GPUs, and how long will it take? (flexo/plan.py)

    flexo [--params FILE] plan [--gpus N] [--gpu-mem GB] [--gpu-flops F] [--tokens-per-s-per-gpu X] [--json]

Prints, per stage, the memory per GPU (DeepSpeed's estimators for the model states + activations for the
batch and sequence length), CPU memory, disk and time at a stated throughput, the formulas, and a verdict.
Nothing is loaded or trained. A plan in which a stage does not fit prints the same table, then one line
`flexo: error: plan: STAGE needs … GB per GPU …: <what to change>` and exits 2.
"""

from __future__ import annotations

import json

from flexo.errors import FlexoError
from flexo.plan import H100_BF16_FLOPS, Hardware, format_plan, make_plan
from flexo.project import stage_command


def add_cli(sub) -> None:
    def run(args, project) -> str:
        hw = Hardware(gpus=args.gpus, gpu_mem_gb=args.gpu_mem, gpu_flops=args.gpu_flops,
                      tokens_per_s_per_gpu=args.tokens_per_s_per_gpu)
        plan = make_plan(project.params, hw, str(project.params_file))
        text = json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan)
        error = plan.error()
        if error:
            print(text, flush=True)  # the table first: it shows which stage is over and by how much
            raise FlexoError(error)
        return text

    p = stage_command(sub, "plan", "memory per GPU, disk and time of every stage on N GPUs; refuses plans that do not fit",
                      run)
    p.add_argument("--gpus", type=int, default=1, help="GPUs of one node (default: 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GB", help="memory per GPU, GB (default: 80)")
    p.add_argument("--gpu-flops", type=float, default=H100_BF16_FLOPS, metavar="F",
                   help=f"peak bf16 FLOP/s per GPU (default: {H100_BF16_FLOPS:g}, an H100's dense bf16)")
    p.add_argument("--tokens-per-s-per-gpu", type=float, default=None, metavar="X",
                   help="a measured training throughput (default: from 40%% MFU of --gpu-flops)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
