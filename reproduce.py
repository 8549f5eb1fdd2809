"""A reduced-scale reproduction on Fashion-MNIST: what BASQ's clip branches and its search buy.

Every row runs the three stage scripts under one training budget; only the quantizer of the model
and the search of stage 2 differ (README, "Results"):

  float         full precision: the same network and blocks, no quantizer (--quantizer float)
  lsq-tensor    LSQ activation quantizers with a step per tensor, the LSQ paper's (--quantizer lsq-tensor)
  lsq           LSQ activation quantizers with a step per channel, the reference's (--quantizer lsq);
                neither has clip branches or a search
  basq-uniform  the BASQ supernet, one L2 decay for every layer, the best on each fold (--uniform)
  basq          the BASQ supernet, k-fold evolutionary search

Every row is scored as BASQ is: stage 3 fine-tunes each fold's choice, then top-1 is measured on
the test images outside that fold; the table gives the mean and spread over the folds.

    python reproduce.py            # the committed table, results/fashion_mnist.md and .png
    python reproduce.py --quick    # a smoke check of every step, written to results/quick/
    python reproduce.py --sweep    # MobileNet-v2 2-bit at four stage-1 budgets: results/budget_sweep.*

Each step's outputs stay under --work: a rerun skips the finished steps and resumes an interrupted
supernet training from its last checkpoint.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import utils.torch_floor  # noqa: F401  (first: an older torch stops here, with one line)
from models import QUANTIZERS
from reproduction.report import (
    METHODS,
    Row,
    update_readme,
    write_plot,
    write_sweep_plot,
    write_sweep_table,
    write_table,
)
from search.results import write_json
from utils.checkpoint import checkpoint_name, latest_checkpoint
from utils.cli import comma_list
from utils.errors import UsageError
from utils.runtime import fail_cleanly

ARCH_FLAGS = {
    "mobilenet_v2": ["--arch", "mobilenet_v2", "--width_multiplier", "0.5", "--width_divisor", "8"],
    "resnet18": ["--arch", "resnet18", "--width_multiplier", "0.25", "--width_divisor", "8"],
}
# Fashion-MNIST; four candidate decays spanning the reference's range; the default --replicas 8
# (a batch of 128 as eight pieces of 16, in one pass).
COMMON_FLAGS = ["--data", "fashion-mnist", "--min_crop_scale", "0.5", "-j", "0",
                "--l2_bounds", "0.01,0.001,0.0001,0.00001"]
EVAL_FLAGS = ["--k", "10", "--bn_recalibration_batches", "4"]
EVOLUTION = ["--population-num", "8", "--select-num", "4", "--mutation-num", "3", "--crossover-num", "3",
             "--max-epochs", "3"]

# The training budgets: stage-1 iterations per phase (batch 128), stage-3 iterations; the input
# (``input``) and, for the sweep, the one network and bit width it measures.
PRESETS = {
    # 28 px through the stride-1 stem
    "full": dict(iters=[250], finetune_iters=40, folds="0,1,2", max_val_iters=25, evolution=EVOLUTION,
                 input=["--base_resolution", "28", "--small_input_stem"]),
    "quick": dict(iters=[20], finetune_iters=10, folds="0,1", max_val_iters=10,
                  evolution=["--population-num", "4", "--select-num", "2", "--mutation-num", "1",
                             "--crossover-num", "1", "--max-epochs", "1"],
                  input=["--base_resolution", "28", "--small_input_stem"]),
    # 32 px through the ImageNet stem (the demo's model): a tenfold range of budgets in hours
    "sweep": dict(iters=[200, 500, 1000, 2000], finetune_iters=40, folds="0,1,2", max_val_iters=25,
                  evolution=EVOLUTION, input=["--base_resolution", "32"], archs=["mobilenet_v2"], bits=[2]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="tiny budget, for a smoke check")
    which.add_argument("--sweep", action="store_true",
                       help="MobileNet-v2 x0.5, 2 bits, at four stage-1 budgets (results/budget_sweep.*)")
    parser.add_argument("--archs", default=None, help="comma-separated, of: " + ", ".join(ARCH_FLAGS)
                        + " (default: both; the sweep: mobilenet_v2)")
    parser.add_argument("--bits", default=None,
                        help="comma-separated bit widths (weights and activations; default 2,4; "
                             "the sweep: 2)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="steps run at once; each gets CPU cores / jobs threads")
    parser.add_argument("--work", default=None,
                        help="where the steps write (default: runs/reproduce/full or runs/reproduce/quick)")
    parser.add_argument("--out", default=None,
                        help="table and plot folder (default: results, or results/quick with --quick)")
    parser.add_argument("--data-root", default="data", help="where Fashion-MNIST is unpacked")
    args = parser.parse_args(argv)
    args.preset = "quick" if args.quick else "sweep" if args.sweep else "full"
    preset = PRESETS[args.preset]
    args.work = Path(args.work or f"runs/reproduce/{args.preset}")
    args.out = Path(args.out or ("results/quick" if args.quick else "results"))
    try:
        args.archs = comma_list(args.archs or ",".join(preset.get("archs", ARCH_FLAGS)), str, "networks")
        args.bits = sorted(set(comma_list(args.bits or ",".join(map(str, preset.get("bits", [2, 4]))), int,
                                          "integers")))
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if any(a not in ARCH_FLAGS for a in args.archs):
        parser.error(f"--archs: choose from {', '.join(ARCH_FLAGS)}")
    if any(not 2 <= b <= 8 for b in args.bits):
        parser.error("--bits: give bit widths from 2 to 8")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


@dataclass
class Step:
    """One run of a stage script; ``marker`` is the file it leaves when it has finished."""

    name: str
    argv: list[str]
    marker: Path
    deps: list[str] = field(default_factory=list)
    resumable: Path | None = None  # stage 1: the folder of its checkpoints
    budget: int = 0  # the position of its training budget in the preset: smaller budgets run first

    def command(self) -> list[str]:
        argv = [sys.executable, *self.argv]
        if self.resumable is not None and (last := latest_checkpoint(self.resumable)) is not None:
            argv += ["--resume", str(last)]
        return argv


def plan(args: argparse.Namespace) -> tuple[list[Step], list[Row]]:
    """The steps of every row, and where each row's result will be. With several budgets (the
    sweep) each budget's runs have a folder of their own, ``{iters}it``."""
    preset = PRESETS[args.preset]
    val = [*EVAL_FLAGS, "--max_val_iters", str(preset["max_val_iters"])]
    steps: dict[str, Step] = {}
    rows = []
    for budget, iters in enumerate(preset["iters"]):
        work = args.work / f"{iters}it" if len(preset["iters"]) > 1 else args.work
        prefix = f"{iters}it " if len(preset["iters"]) > 1 else ""
        for arch in args.archs:
            for method in METHODS:
                for bits in ([args.bits[0]] if method == "float" else args.bits):
                    quantizer = method if method in QUANTIZERS else "basq"  # basq-uniform: basq
                    model = [*COMMON_FLAGS, *preset["input"], *ARCH_FLAGS[arch], "--bits", str(bits),
                             "--quantizer", quantizer, "--data-root", args.data_root]
                    tag = f"{arch}-{quantizer}-{bits}bit"
                    train = work / tag / "train-supernet"
                    supernet = train / checkpoint_name(2, iters)
                    if f"train {prefix}{tag}" not in steps:
                        steps[f"train {prefix}{tag}"] = Step(
                            f"train {prefix}{tag}",
                            ["01train_supernet.py", *model, "--teacher", "none", "--batch_size", "128",
                             "--abin_total_iters", str(iters), "--awbin_total_iters", str(iters),
                             "--learning_rate_abin", "2e-3", "--learning_rate_wbin", "2e-3",
                             "--save_interval", "100", "--report_freq", "50", "--save", str(train)],
                            supernet, resumable=train, budget=budget)
                    row = f"{arch}-{method}-{bits}bit"
                    search = work / row / "search"
                    how = ["--uniform"] if method != "basq" else preset["evolution"]
                    steps[f"search {prefix}{row}"] = Step(
                        f"search {prefix}{row}",
                        ["02kfold_evolution.py", *model, *val, "--supernet", str(supernet), "--folds",
                         preset["folds"], *how, "--save", str(search)],
                        search / "search_result.json", deps=[f"train {prefix}{tag}"], budget=budget)
                    finetune = work / row / "finetune"
                    steps[f"finetune {prefix}{row}"] = Step(
                        f"finetune {prefix}{row}",
                        ["03finetune.py", *model, *val, "--supernet", str(supernet), "--search-result",
                         str(search / "search_result.json"), "--bn_epochs", "1", "--iters_per_epoch",
                         str(preset["finetune_iters"]), "--batch_size", "128", "--save", str(finetune)],
                        finetune / "final_result.json", deps=[f"search {prefix}{row}"], budget=budget)
                    rows.append(Row(arch, method, bits, finetune / "final_result.json",
                                    search / "search_result.json", iters))
    # The smallest budget first, so that an interrupted sweep leaves whole budgets behind; within a
    # budget, training first (everything else waits on it), then each row's search and fine-tuning.
    ordered = sorted(steps.values(), key=lambda s: (s.budget, not s.name.startswith("train")))
    return ordered, rows


def run_steps(steps: list[Step], jobs: int, work: Path) -> None:
    """Run the unfinished steps, ``jobs`` at a time, each after the steps it depends on."""
    times_file = work / "step_seconds.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    done = {s.name for s in steps if s.marker.exists()}
    pending = [s for s in steps if s.name not in done]
    unknown = {d for s in pending for d in s.deps} - {s.name for s in steps}
    if unknown:
        raise ValueError(f"steps depend on steps that are not planned: {', '.join(sorted(unknown))}")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    bar = tqdm(total=len(steps), initial=len(done), desc="reproduce", unit="step", dynamic_ncols=True)
    if done:
        tqdm.write(f"{len(done)} of {len(steps)} steps finished earlier; kept (delete {work} to redo them)")
    while pending or running:
        for step in list(pending):
            if len(running) < jobs and all(d in done for d in step.deps):
                pending.remove(step)
                log = work / "logs" / (step.name.replace(" ", "_") + ".txt")
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a") as out:
                    proc = subprocess.Popen(step.command(), stdout=out, stderr=subprocess.STDOUT, env=env)
                running[step.name] = (proc, time.monotonic(), log)
        time.sleep(1)
        for name, (proc, began, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                for other, *_ in running.values():
                    other.terminate()
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise UsageError(f"step '{name}' failed (exit {proc.returncode}); the end of {log}:\n{tail}")
            done.add(name)
            times[name] = times.get(name, 0.0) + time.monotonic() - began
            write_json(times, times_file)
            bar.update(1)
            tqdm.write(f"done: {name} ({times[name] / 60:.1f} min)")
    bar.close()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def kept_settings(settings_file: Path, preset: str, steps: list[Step]) -> dict:
    """The work folder's settings with ``steps`` added: a rerun may add rows (a method, a network, a
    bit width) beside the finished ones, but a step already planned must keep its command line."""
    settings = {"preset": PRESETS[preset], "steps": {s.name: s.argv for s in steps}}
    if settings_file.exists():
        earlier = json.loads(settings_file.read_text())
        changed = [name for name, argv in settings["steps"].items()
                   if earlier["steps"].get(name, argv) != argv]
        if earlier["preset"] != settings["preset"] or changed:
            raise UsageError(f"{settings_file.parent} holds a run with other settings"
                             f"{' (' + ', '.join(changed) + ')' if changed else ''}; delete it, or give "
                             "another --work")
        settings["steps"] = {**earlier["steps"], **settings["steps"]}
    return settings


def main(args: argparse.Namespace) -> None:
    steps, rows = plan(args)
    args.work.mkdir(parents=True, exist_ok=True)
    write_json(kept_settings(args.work / "settings.json", args.preset, steps), args.work / "settings.json")
    sessions_file = args.work / "sessions.json"
    sessions = json.loads(sessions_file.read_text()) if sessions_file.exists() else []
    began = time.monotonic()
    todo = any(not step.marker.exists() for step in steps)
    try:
        run_steps(steps, args.jobs, args.work)
    finally:  # a failed or interrupted session counts towards the wall time; a mere report does not
        if todo:
            sessions.append({"seconds": time.monotonic() - began, "jobs": args.jobs,
                             "finished": time.strftime("%Y-%m-%d %H:%M")})
            write_json(sessions, sessions_file)
    meta = {"preset": args.preset, "machine": machine(), "sessions": sessions, "budget": PRESETS[args.preset],
            "command": {"quick": "make reproduce QUICK=1", "sweep": "make sweep"}.get(args.preset,
                                                                                     "make reproduce")}
    name = "budget_sweep" if args.sweep else "fashion_mnist"
    if args.sweep:
        table = write_sweep_table(args.out / f"{name}.md", rows, meta)
        write_sweep_plot(args.out / f"{name}.png", rows)
    else:
        table = write_table(args.out / f"{name}.md", rows, meta)
        write_plot(args.out / f"{name}.png", rows)
    if not args.quick and update_readme(Path("README.md"), table, "sweep" if args.sweep else "reproduce"):
        print("README.md: results section updated")
    print(f"table: {args.out / f'{name}.md'}; plot: {args.out / f'{name}.png'}; "
          f"runs and their logs: {args.work}")


if __name__ == "__main__":
    fail_cleanly(main, parse_args())
