"""The prepared check of the GPU path: run it when a GPU machine is at hand, and in CI on the CPU.

    python -m bench.gpu_check --device cuda --out gpu-check      # on a GPU node
    python -m bench.gpu_check --device cpu --out /tmp/gpu-check  # the same steps, on the CPU

On a small generated ImageNet-layout folder it runs, each as a user would (subprocesses):
stage 1 in float32 and under ``--amp`` (bf16, and fp16 on CUDA), an interrupted stage 1 resumed
from its checkpoint, stages 2 and 3 on the result, stage 1 under ``torchrun --nproc_per_node 1``
(NCCL on CUDA, gloo on the CPU), and the step-time benchmark (``bench.step_time``) on the device.
It writes ``report.md`` and ``report.json`` to ``--out`` (each check: passed or not, wall time,
what it measured, the end of its output) and exits non-zero when a check failed.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.images import make_image_folder

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--width_multiplier", "0.25", "--width_divisor", "8", "--base_resolution", "32",
         "--l2_bounds", "0.01,0.001,0.0001", "--seed", "0"]


class Checks:
    """Runs the checks and keeps what each gave."""

    def __init__(self, out: Path):
        self.out, self.results = out, []

    def run(self, name: str, argv: list[str], timeout: float = 900, expect: Path | None = None) -> str:
        start = time.monotonic()
        try:
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            output, ok = done.stdout + done.stderr, done.returncode == 0
        except subprocess.TimeoutExpired as e:
            output, ok = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s", False
        if ok and expect is not None and not expect.exists():
            output, ok = output + f"\n{expect} was not written", False
        seconds = time.monotonic() - start
        self.results.append({"check": name, "passed": ok, "seconds": round(seconds, 1),
                             "measured": measured(output), "command": " ".join(argv[1:]),
                             "tail": "\n".join(output.strip().splitlines()[-12:])})
        print(f"{'passed' if ok else 'FAILED'}: {name} ({seconds:.0f} s)", flush=True)
        return output

    def report(self, device: str) -> bool:
        if device.startswith("cuda"):
            machine = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
        else:
            machine = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        header = f"torch {torch.__version__}, {machine}, {time.strftime('%Y-%m-%d %H:%M')}"
        report = {"machine": header, "checks": self.results}
        (self.out / "report.json").write_text(json.dumps(report, indent=1))
        lines = [f"# GPU check on --device {device}", "", header, "",
                 "| check | result | seconds | measured |", "|---|---|---|---|"]
        lines += [f"| {r['check']} | {'passed' if r['passed'] else 'FAILED'} | {r['seconds']} | "
                  f"{'; '.join(r['measured'])} |" for r in self.results]
        for r in self.results:
            lines += ["", f"## {r['check']}", "", f"`{r['command']}`", "", "```", r["tail"], "```"]
        (self.out / "report.md").write_text("\n".join(lines) + "\n")
        print(f"report: {self.out / 'report.md'}")
        return all(r["passed"] for r in self.results)


def measured(output: str) -> list[str]:
    """The figures worth a glance in a stage's or benchmark's output."""
    found = []
    for pattern, form, last in ((r"(\d+) img/s, waiting ([\d.]+) ms/step", "{} img/s, data {} ms/step", 1),
                                (r"(train|eval)\s+ratio ([\d.]+)", "{} ratio {}", 4),
                                (r"peak (GPU memory|RSS) (\d+) MiB", "peak {} {} MiB", 2)):
        found += [form.format(*m.groups()) for m in re.finditer(pattern, output)][-last:]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--iters", type=int, default=6, help="stage-1 iterations per phase")
    parser.add_argument("--skip-benchmark", action="store_true", help="leave out bench.step_time")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: CUDA is not available here; use --device cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_image_folder(args.out / "data", train_per_class=64, val_per_class=16, size=48, suffix="jpg")
    py = [sys.executable]
    common = ["--data", str(data), *MODEL, "--device", args.device, "-j", "2"]
    stage1 = [*py, "01train_supernet.py", *common, "--teacher", "none", "--batch_size", "16",
              "--abin_total_iters", str(args.iters), "--awbin_total_iters", str(args.iters),
              "--save_interval", "2", "--report_freq", "2"]
    supernet = f"model_actwbin_best_{args.iters:05d}it.pth"
    checks = Checks(args.out)
    fp32 = args.out / "stage1-fp32"
    checks.run("stage 1, float32", [*stage1, "--save", str(fp32)], expect=fp32 / supernet)
    for amp in ("bf16", "fp16") if cuda else ("bf16",):
        save = args.out / f"stage1-{amp}"
        checks.run(f"stage 1, --amp {amp}", [*stage1, "--amp", amp, "--save", str(save)],
                   expect=save / supernet)
    resumed = args.out / "stage1-resumed"
    checks.run("stage 1, resumed from phase 1, iteration 2",
               [*stage1, "--save", str(resumed), "--resume", str(fp32 / "model_actbin_best_00002it.pth")],
               expect=resumed / supernet)
    search = args.out / "stage2"
    checks.run("stage 2", [*py, "02kfold_evolution.py", *common, "--supernet", str(fp32 / supernet),
                           "--k", "2", "--val_batch_size", "16", "--max-epochs", "2", "--population-num", "4",
                           "--select-num", "2", "--mutation-num", "1", "--crossover-num", "1",
                           "--save", str(search)], expect=search / "search_result.json")
    finetune = args.out / "stage3"
    checks.run("stage 3, --amp bf16", [*py, "03finetune.py", *common, "--supernet", str(fp32 / supernet),
                                       "--search-result", str(search / "search_result.json"), "--k", "2",
                                       "--val_batch_size", "16", "--bn_epochs", "1", "--batch_size", "32",
                                       "--amp", "bf16", "--save", str(finetune)],
               expect=finetune / "final_result.json")
    ranked = args.out / "stage1-torchrun"
    checks.run(f"stage 1 under torchrun --nproc_per_node 1 ({'NCCL' if cuda else 'gloo'})",
               [*py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                *stage1[1:], "--save", str(ranked)], expect=ranked / supernet)
    if not args.skip_benchmark:
        only = [] if cuda else ["--only", "0", "--steps", "3", "--warmup", "1"]
        name = "step time against torchvision's mobilenet_v2" + (" (--amp, channels-last)" if cuda else "")
        checks.run(name, [*py, "-m", "bench.step_time", "--device", args.device,
                          *(["--amp", "--channels-last"] if cuda else []), *only], timeout=1200)
    if not checks.report(args.device):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
