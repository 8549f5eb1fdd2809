"""The prepared check of the GPU path: what users run, at the ImageNet model's size.

    python -m bench.gpu_check --device cuda --out gpu-check      # on a GPU node (about 5 minutes)
    python -m bench.gpu_check --device cpu --out /tmp/gpu-check  # a quick smoke run at small sizes (CI)

On a generated JPEG folder it runs the stages as a user would, at the defaults that decide memory:
the ImageNet model (width 1.0, 224 px, 2-bit, 7 branches; on the CPU a small one), stage 1 at
``--batch_size 768 --replicas 8`` (one piece of 96 per device) with a ResNet-50 teacher (random
weights: nothing is downloaded) in float32 and under ``--amp bf16`` (and fp16 on CUDA), stage 1
resumed from its iteration-2 checkpoint, its first step compared with the uninterrupted run's by the
step rule (``bench.step_compare``), stage 2 (batches of
200), stage 3 at its default batch, and stage 1 under ``torchrun`` with 2 processes (NCCL) where 2
GPUs exist (gloo on the CPU). Each stage's peak GPU memory (``torch.cuda.max_memory_allocated``,
reset between checks) is compared with the README's table (``bench.memory``'s figures, measured
here for this model, at the stage's piece size).

Each check is ``passed``, ``failed`` or ``not exercised`` (what this machine cannot check: GPU
memory on the CPU, NCCL on one GPU), never passed by default. It writes ``report.md`` and
``report.json`` to ``--out`` and exits non-zero when a check failed.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

import utils.torch_floor  # noqa: F401  (first: an older torch stops here, with one line)
from bench import memory
from bench.images import make_image_folder
from bench.stage1_ranks import FIRST_STEP, recording
from bench.step_compare import Step, compare_step, compare_values, noise_gradient_parameters
from models import build_supernet
from search.prefix_scorer import bytes_per_image
from utils import distributed
from utils.checkpoint import save_file
from utils.runtime import load_back_ends

ROOT = Path(__file__).resolve().parent.parent
PASSED, FAILED, NOT_EXERCISED = "passed", "failed", "not exercised"
# A stage's peak agrees with the table's figure within [MEMORY_LOW, MEMORY_SLACK] of it. Both count
# the same tensors (bench.memory follows the stages' own steps); above it, what the allocator counts
# and the count does not: each block rounded up to 512 bytes (a few MB over the thousands of tensors
# alive), cuDNN's workspaces for the algorithms it settled on (through PyTorch's allocator; tens to
# hundreds of MB on a step of ~15 GiB), and the fit's small underestimate at large pieces (a step's
# peak is the largest of its moments, convex in the piece: +0.2 % per image on the small model).
# Below 0.9 the table counts tensors a GPU does not keep (a part twice, as a teacher beside the
# student's activations would be: ~7 % at pieces of 96). Stage 1's peak is taken after its first
# step, whose cuDNN benchmark tries algorithms with workspaces of their own (reported apart).
MEMORY_LOW, MEMORY_SLACK = 0.9, 1.05
RESUMED_STEP = "step_00003.pt"  # stage 1's iteration 3, after the iteration-2 checkpoint it resumes from


class Sizes:
    """What the check runs at: the ImageNet model on a GPU, a small one for the CPU's smoke run."""

    def __init__(self, cuda: bool):
        if cuda:  # width 1.0, 224 px, 2-bit, the 7 reference decays: the defaults
            self.width, self.divisor, self.resolution, self.bounds = 1.0, 1, 224, memory.REFERENCE_L2_BOUNDS
            self.image, self.classes, self.train, self.val = 256, 4, 200, 100
            self.batch, self.val_batch, self.teacher, self.workers = 768, 200, "resnet50", 8
        else:
            self.width, self.divisor, self.resolution, self.bounds = 0.25, 8, 32, [0.01, 0.001, 0.0001]
            # 48 training images: whole batches of 16, whose pieces of 2 give the 1 x 1 feature
            # maps of a 32 px model two values per channel (a last batch of 4 would give one)
            self.image, self.classes, self.train, self.val = 36, 3, 16, 12
            self.batch, self.val_batch, self.teacher, self.workers = 16, 12, "resnet18", 2
        self.replicas, self.iters = 8, 3
        self.piece = math.ceil(self.batch / self.replicas)
        self.model = ["--width_multiplier", str(self.width), "--width_divisor", str(self.divisor),
                      "--base_resolution", str(self.resolution),
                      "--l2_bounds", ",".join(map(str, self.bounds))]

    def supernet(self) -> torch.nn.Module:
        model = build_supernet("mobilenet_v2", 1000, 2, self.bounds, width_multiplier=self.width,
                               width_divisor=self.divisor)
        model.change_precision(True, True)
        return model


class Checks:
    """Runs the checks and keeps what each gave."""

    def __init__(self, out: Path, cuda: bool):
        self.out, self.cuda, self.results = out, cuda, []

    def run(self, name: str, check: Callable[[], tuple[str, list[str]]], fresh: bool = True) -> str:
        """``check()`` gives a status and what it measured; an exception fails it. ``fresh``: the
        peak GPU memory counts from here."""
        start = time.monotonic()
        if self.cuda and fresh:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            status, measured = check()
            tail = ""
        except (Exception, SystemExit) as e:  # a stage's exit or error fails the check, not the run
            status, measured = FAILED, [f"{type(e).__name__}: {e}"]
            tail = "".join(traceback.format_exception(e))[-3000:]
        seconds = time.monotonic() - start
        self.results.append({"check": name, "status": status, "seconds": round(seconds, 1),
                             "measured": measured, "tail": tail})
        print(f"{status}: {name} ({seconds:.0f} s) {'; '.join(measured)}", flush=True)
        return status

    def stage(self, name: str, run: Callable[[], Path], predicted: Callable[[], float], what: str) -> None:
        """A stage's run (passed when it ends and writes ``run()``'s file) and its peak GPU memory
        against the table, as two checks."""
        def ran() -> tuple[str, list[str]]:
            if not run().exists():
                raise RuntimeError("the stage did not write its output")
            return PASSED, []

        done = self.run(name, ran)
        self.run(f"{name}: peak memory", lambda: self.peak(predicted(), what) if done == PASSED
                 else (NOT_EXERCISED, ["the stage failed"]), fresh=False)

    def peak(self, predicted: float, what: str) -> tuple[str, list[str]]:
        """The peak GPU memory since the check began against ``predicted`` (bytes)."""
        said = f"table: {predicted / memory.GIB:.2f} GiB ({what})"
        if not self.cuda:
            return NOT_EXERCISED, [f"peak GPU memory not measured on the CPU; {said}"]
        peak = torch.cuda.max_memory_allocated()
        ok = MEMORY_LOW * predicted <= peak <= MEMORY_SLACK * predicted
        return (PASSED if ok else FAILED), [f"peak GPU memory {peak / memory.GIB:.2f} GiB, {said}, "
                                            f"ratio {peak / predicted:.2f}"]

    def report(self, device: str) -> bool:
        if self.cuda:
            machine = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, "
                       f"CUDA {torch.version.cuda}")
        else:
            machine = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        header = f"torch {torch.__version__}, {machine}, {time.strftime('%Y-%m-%d %H:%M')}"
        report = {"machine": header, "checks": self.results}
        (self.out / "report.json").write_text(json.dumps(report, indent=1))
        lines = [f"# GPU check on --device {device}", "", header, "",
                 "| check | status | seconds | measured |", "|---|---|---|---|"]
        lines += [f"| {r['check']} | {r['status']} | {r['seconds']} | {'; '.join(r['measured'])} |"
                  for r in self.results]
        for r in self.results:
            if r["tail"]:
                lines += ["", f"## {r['check']}", "", "```", r["tail"], "```"]
        (self.out / "report.md").write_text("\n".join(lines) + "\n")
        print(f"report: {self.out / 'report.md'}")
        return all(r["status"] != FAILED for r in self.results)


def same_first_step(one: dict, two: dict) -> tuple[bool, str]:
    """Stage 1's first step in two runs (``bench.stage1_ranks``'s records) agrees: the model before
    the LSQ initialisation exactly (built from the seed, rank 0's shared); the state the
    initialisation's forward sets within its float noise (``compare_values``); the step by
    ``same_step``."""
    failures = {k: "another value before the LSQ initialisation" for k, v in one["state_initial"].items()
                if not torch.equal(v, two["state_initial"][k])}
    model = phase1_model(one)
    model.load_state_dict(two["state_before"])
    failures |= {f"{k} (LSQ initialisation)": why
                 for k, why in compare_values(model, one["state_initial"], one["state_before"]).items()}
    return same_step(one, two, failures, model)


def same_resumed_step(one: dict, two: dict) -> tuple[bool, str]:
    """The first step of a run resumed from a checkpoint (``two``) against the same step of the
    uninterrupted run that wrote it (``one``): both start from the same bits (the checkpoint keeps
    the model and Adam exactly), and the step agrees by ``same_step``; on a GPU it need not be
    bit-identical, cuDNN choosing its algorithms anew in each process (``cudnn.benchmark``)."""
    failures = {k: "resumed from another value" for k, v in one["state_before"].items()
                if not torch.equal(v, two["state_before"][k])}
    failures |= {f"{k}.{key} (before)": "resumed from another value"
                 for k, state in one["optimizer_state_before"].items() for key, v in state.items()
                 if not torch.equal(v, two["optimizer_state_before"][k][key])}
    return same_step(one, two, failures, phase1_model(one))


def phase1_model(case: dict) -> torch.nn.Module:
    """The recorded run's supernet as phase 1 trains it: the clips on, float weights."""
    model = build_supernet(**case["config"])
    model.change_precision(True, False)
    return model


def same_step(one: dict, two: dict, failures: dict[str, str], model: torch.nn.Module) -> tuple[bool, str]:
    """A phase-1 step of stage 1 recorded twice agrees by the rule the fixture tests compare a step
    by (``bench.step_compare``), ``one`` as the recording: what the step changed from each run's own
    start (``own_update``), within the gradients' float noise carried through Adam, the parameters
    whose gradient is zero in exact arithmetic (found from the autograd graph of the phase-1 model)
    by what is reproducible about them. No count of elements allowed off. ``failures``: what the
    caller found off before the step; ``model``: the recorded run's (``phase1_model``)."""
    model.load_state_dict(one["state_before"])
    model.train()
    noise = noise_gradient_parameters(model, one["batch"]["x"], one["batch"]["selection"])
    step = Step(two["parameters"], own_update(one, two), two["optimizer_state_after"], two["grads"],
                two["loss"], two["grad_norm_before_clipping"])
    failures = {**failures, **compare_step(one, step, noise)}
    said = (f"all {len(one['state_after'])} tensors and the optimizer's state within float noise "
            f"({len(noise)} parameters with a zero gradient in exact arithmetic)" if not failures else
            f"{len(failures)} off, e.g. " + "; ".join(f"{k}: {why}" for k, why in list(failures.items())[:3]))
    return not failures, said


def own_update(one: dict, two: dict) -> dict[str, torch.Tensor]:
    """``two``'s state after its step, moved onto ``one``'s start (float64): what ``two``'s step
    changed, so that the float noise of the two starts (the LSQ initialisation, compared apart) is
    not counted as the step's."""
    before = two["state_before"]
    return {k: one["state_before"][k] if torch.equal(v, before[k]) else
            one["state_before"][k] + (v - before[k]) if not v.is_floating_point() else
            one["state_before"][k].double() + (v.double() - before[k].double())
            for k, v in two["state_after"].items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: CUDA is not available here; use --device cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    size = Sizes(cuda)
    data = make_image_folder(args.out / "data", classes=size.classes, train_per_class=size.train,
                             val_per_class=size.val, size=size.image, suffix="jpg")
    teacher = args.out / f"teacher-{size.teacher}.pth"  # random weights: nothing to download
    weights = torchvision.models.get_model(size.teacher, num_classes=size.classes).state_dict()
    save_file({"arch": size.teacher, "num_classes": size.classes, "model_state_dict": weights}, teacher)
    common = ["--data", str(data), *size.model, "--device", args.device, "-j", str(size.workers),
              "--replicas", str(size.replicas), "--seed", "0"]
    # One piece per pass: the memory figures are a piece's (bench.memory).
    stage1_args = [*common, "--teacher", str(teacher), "--batch_size", str(size.batch),
                   "--pieces_per_pass", "1", "--abin_total_iters", str(size.iters),
                   "--awbin_total_iters", str(size.iters),
                   "--save_interval", "2", "--report_freq", "1"]
    last = f"model_actwbin_best_{size.iters:05d}it.pth"
    checks = Checks(args.out, cuda)
    print("measuring the memory figures (bench.memory) ...", flush=True)
    if cuda:  # the figures of PyTorch's ops, as the GPU runs them (the smoke run keeps its fast kernels)
        os.environ["BASQ_NATIVE"] = "0"
    figures = {amp: memory.measure(amp, model=size.supernet(), resolution=size.resolution,
                                   teacher=torchvision.models.get_model(size.teacher))
               for amp in (None, "bf16")}
    stage1, stage2, stage3 = (memory.stage_script(name)
                              for name in ("01train_supernet.py", "02kfold_evolution.py", "03finetune.py"))

    first_steps: list[float] = []  # each stage-1 run's peak over its first step (cuDNN's benchmark)

    def stage1_run(save: Path, amp: str | None = None) -> Callable[[], Path]:
        def run() -> Path:
            amp_flag = ["--amp", amp] if amp else []
            real, steps = stage1.stage_step, []

            def step(*args):
                out = real(*args)
                if cuda and not steps:  # the steady state from here: the benchmark's trials are done
                    torch.cuda.synchronize()
                    first_steps.append(torch.cuda.max_memory_allocated())
                    torch.cuda.reset_peak_memory_stats()
                steps.append(1)
                return out

            stage1.stage_step = step
            try:
                stage1.train(stage1.parse_args([*stage1_args, "--save", str(save), *amp_flag]))
            finally:
                stage1.stage_step = real
            return save / last

        if amp is None:  # the uninterrupted run's iteration 3, which the resumed run repeats
            def recorded() -> Path:
                with recording(stage1, save / RESUMED_STEP, at=3):
                    return run()
            return recorded
        return run

    fp32 = args.out / "stage1-fp32"
    for amp in (None, "bf16", "fp16") if cuda else (None, "bf16"):
        figure = figures.get(amp, figures["bf16"])  # fp16 keeps what bf16 keeps
        checks.stage(f"stage 1, {'--amp ' + amp if amp else 'float32'}, --batch_size {size.batch} --replicas "
                     f"{size.replicas}", stage1_run(fp32 if amp is None else args.out / f"stage1-{amp}", amp),
                     lambda figure=figure: figure.stage1(size.piece, size.batch),
                     f"stage 1, pieces of {size.piece}, {amp or 'float32'}, after the first step")
        if first_steps:
            checks.results[-1]["measured"].append(
                f"first step {first_steps[-1] / memory.GIB:.2f} GiB (with cuDNN's benchmark trials)")
    resumed = args.out / "stage1-resumed"

    def resume():
        with recording(stage1, resumed / RESUMED_STEP):  # the resumed run's first step: iteration 3
            stage1.train(stage1.parse_args([*stage1_args, "--save", str(resumed),
                                            "--resume", str(fp32 / "model_actbin_best_00002it.pth")]))
        ok, said = same_resumed_step(*(torch.load(run / RESUMED_STEP, weights_only=True)
                                       for run in (fp32, resumed)))
        return (PASSED if ok else FAILED), [f"iteration 3 against the uninterrupted run's: {said}"]

    checks.run("stage 1 resumed from phase 1, iteration 2", resume)
    search = args.out / "stage2"
    eval_args = [*common, "--supernet", str(fp32 / last), "--k", "2", "--val_batch_size", str(size.val_batch)]

    def search_run() -> Path:
        # --prefix_cache_gb 2: the default takes what the fold leaves free, which the table cannot predict
        stage2.search(stage2.parse_args([*eval_args, "--prefix_cache_gb", "2", "--max-epochs", "1",
                                         "--population-num", "4",
                                         "--select-num", "2", "--mutation-num", "1", "--crossover-num", "1",
                                         "--save", str(search)]))
        return search / "search_result.json"

    def search_memory() -> float:
        """An evaluation batch, and what the prefix scorer keeps of a fold (its cache 2 GiB at most)."""
        shape = (3, size.resolution, size.resolution)
        per_image = 5 * math.prod(shape) + bytes_per_image(size.supernet(), shape, torch.device("cpu"))
        return figures[None].evaluation(size.val_batch) + fold * per_image + 2 * memory.GIB

    fold = size.classes * size.val // 2
    checks.stage(f"stage 2, batches of {size.val_batch}", search_run, search_memory,
                 f"evaluation of {size.val_batch}, a fold of {fold} on the device, the prefix cache")

    def finetune_run() -> Path:
        stage3.finetune(stage3.parse_args([*eval_args, "--search-result", str(search / "search_result.json"),
                                           "--batch_size", str(size.batch), "--bn_epochs", "1",
                                           "--iters_per_epoch", "2", "--save", str(args.out / "stage3")]))
        return args.out / "stage3" / "final_result.json"

    checks.stage(f"stage 3 at --batch_size {size.batch} --replicas {size.replicas}", finetune_run,
                 lambda: figures[None].stage3(size.piece, size.batch, size.val_batch),
                 f"stage 3, pieces of {size.piece}, float32")
    checks.run("stage 1 under torchrun, 2 processes, against 1",
               lambda: torchrun_check(cuda, stage1_args, args.out / "stage1-torchrun", figures[None], size))
    if not checks.report(args.device):
        raise SystemExit(1)


def torchrun_check(cuda: bool, stage1_args: list[str], out: Path, figure: memory.Figures, size: Sizes
                   ) -> tuple[str, list[str]]:
    """Stage 1 under ``torchrun --nproc_per_node 2`` against one process, the dropout on (each
    piece's masks its own, whichever process draws them: ``bench.stage1_ranks``): NCCL where 2 GPUs
    exist; on one GPU the two processes share it over gloo (NCCL refuses two ranks on one device); gloo on the
    CPU. Both compute the same pieces; their first steps agree (``same_first_step``). Reports each
    rank's peak memory (the device's, or on the CPU the resident set)."""
    # --tf32 off: the comparison's noise is float32 sums in another order; TF32 would round the
    # convolutions' inputs to 10 bits, differently under each algorithm cuDNN's benchmark settles on.
    flags = [*stage1_args, "--abin_total_iters", "2", "--awbin_total_iters", "2", "--tf32", "off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shared = cuda and torch.cuda.device_count() < 2
    if shared:
        env[distributed.BACKEND_VARIABLE] = "gloo"
        torch.cuda.empty_cache()  # this process's cached blocks, for the two that share the GPU
    one, two = out / "one-process", out / "two-processes"
    for command, save in ((["-m", "bench.stage1_ranks"], one),
                          (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "bench.stage1_ranks"], two)):
        done = subprocess.run([sys.executable, *command, *flags, "--save", str(save)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit status {done.returncode}: {done.stderr[-2000:]}")
    ok, said = same_first_step(*(torch.load(save / FIRST_STEP, weights_only=True) for save in (one, two)))
    unit = "GPU memory" if cuda else "resident memory"
    peaks = [json.loads((save / f"peak_rank{r}.json").read_text())["peak"]
             for save, r in ((one, 0), (two, 0), (two, 1))]
    half = figure.stage1(size.piece, size.batch // 2)
    backend = "gloo, sharing one GPU" if shared else "NCCL" if cuda else "gloo"
    return (PASSED if ok else FAILED), [
        f"2 processes ({backend}) against 1, dropout on, first step: {said}",
        f"peak {unit}: 1 process {peaks[0] / memory.GIB:.2f} GiB; rank 0 {peaks[1] / memory.GIB:.2f} GiB, "
        f"rank 1 {peaks[2] / memory.GIB:.2f} GiB (table: {half / memory.GIB:.2f} GiB per process with "
        f"{size.replicas // 2} pieces of {size.piece})"]


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    main()
