"""Stage 1: train the BASQ supernet (SPEC section 3).

Phase 1 quantizes activations only, phase 2 activations and weights. Every iteration draws a new
branch per searchable layer; Adam trains each branch's clips under that branch's L2 decay; the loss
distils a frozen full-precision teacher.

    python 01train_supernet.py --data {your_imagenet_dataset_folder}
    torchrun --nproc_per_node 8 01train_supernet.py --data {your_imagenet_dataset_folder}

Each step is the reference's nn.DataParallel step over --replicas devices (SPEC 5a), its pieces
computed together (--pieces_per_pass). Under torchrun the pieces are spread over the processes (--replicas a
multiple of their number) and the gradients summed: the same arithmetic on any number of
processes. Every process draws the same selection each iteration (one shared seed); rank 0 alone
writes the checkpoints, log.txt and TensorBoard.
"""
import argparse
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils.torch_floor  # noqa: F401  (first: an older torch stops here, with one line)
from models import Supernet, build_supernet
from quant import ClipActivation
from training.losses import kd_loss
from training.lsq_init import first_piece, initialize_activation_steps
from training.memory import pieces_per_pass, trial_forward
from training.param_groups import stage1_param_groups
from training.pieces import Draws, Share, check_training_pieces, piece_sizes
from training.step import Amp, DataWait, Reading, RunningStats, train_step
from training.teacher import load_teacher
from utils import distributed
from utils.checkpoint import (
    PHASES,
    check_config,
    checkpoint_name,
    load_model_state,
    load_resume_state,
    save_file,
    stage1_checkpoint,
)
from utils.cli import add_amp_arg, model_config, stage_parser
from utils.data import (
    Datasets,
    batch_stream,
    resolution,
    stage_datasets,
    started_loader,
    to_device,
)
from utils.errors import UsageError
from utils.logs import RunLog
from utils.runtime import (
    check_amp,
    check_shared_memory,
    fail_cleanly,
    load_back_ends,
    seed_everything,
    use_tf32,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = stage_parser(__doc__, save="train-supernet", dist_timeout=30)
    parser.add_argument("--batch_size", type=int, default=768,
                        help="global batch size, computed as --replicas pieces (under torchrun, "
                             "--replicas / processes pieces each)")
    parser.add_argument("--abin_total_iters", type=int, default=466000, help="phase 1 iterations")
    parser.add_argument("--awbin_total_iters", type=int, default=466000, help="phase 2 iterations")
    parser.add_argument("--save_interval", type=int, default=2000)
    parser.add_argument("--learning_rate_abin", type=float, default=3.75e-4)
    parser.add_argument("--learning_rate_wbin", type=float, default=3.75e-4)
    parser.add_argument("--weight_decay_abin", type=float, default=5e-6)
    parser.add_argument("--weight_decay_wbin", type=float, default=5e-6)
    parser.add_argument("--teacher", default="resnet50",
                        help="torchvision model name (ImageNet weights), teacher checkpoint path, or none")
    parser.add_argument("--teacher_weights", default="IMAGENET1K_V1",
                        help="which torchvision weights of a named teacher: IMAGENET1K_V1 (the default) "
                             "is what the reference's pretrained=True loaded (76.13 %% for resnet50); "
                             "DEFAULT or any other name of that model's weights")
    parser.add_argument("--report_freq", type=int, default=100)
    add_amp_arg(parser)
    parser.add_argument("--resume", default=None, help="a checkpoint of this stage to continue from")
    parser.add_argument("--record_selections", action="store_true",
                        help="append every iteration's selection to SAVE/selections/rank{R}.txt, one "
                             "file per process (to check that the processes train the same branches)")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "save_interval", "report_freq"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.abin_total_iters < 0 or args.awbin_total_iters < 0:
        parser.error("--abin_total_iters and --awbin_total_iters cannot be negative")
    return args


def phase_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, total_iters: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A phase's Adam (per-branch clip decays, coupled L2) and its per-iteration cosine schedule.

    ``foreach``: one call per group instead of one per parameter, the same values; PyTorch only
    picks it by itself on a GPU, and the supernet has hundreds of small parameters.
    """
    optimizer = torch.optim.Adam(stage1_param_groups(model, weight_decay), lr=lr, foreach=True)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_iters, 1))


def rng_state(selection_rng: random.Random, device: torch.device) -> dict:
    """Every random state the run depends on, in types that load with ``weights_only=True``: the
    selection generator (the same on every rank) and each rank's own torch generator and, on a GPU,
    its own device's CUDA generator. A collective under torchrun: call it on all ranks."""
    version, internal, gauss = selection_rng.getstate()
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    return {"selection": [version, list(internal), gauss], "ranks": distributed.gather_objects(mine)}


def restore_rng(state: dict, selection_rng: random.Random, device: torch.device) -> None:
    """Restore ``rng_state``'s generators, each rank its own: resumed on more processes than it was
    saved from, the extra ranks keep their own seeds; on another device kind, the CUDA state is left
    out (or unset)."""
    # Checkpoints of earlier releases: one list of torch states, CUDA states of rank 0's devices.
    ranks = state.get("ranks") or [{"torch": t} for t in state.get("torch_ranks", [state["torch"]])]
    if distributed.rank() < len(ranks):
        mine = ranks[distributed.rank()]
        torch.set_rng_state(mine["torch"])
        if device.type == "cuda" and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], device)
    version, internal, gauss = state["selection"]
    selection_rng.setstate((version, tuple(internal), gauss))


def draw_selection(model: torch.nn.Module, rng: random.Random) -> list[int]:
    """One branch per searchable layer, uniformly (the same on every rank: one shared seed)."""
    return [rng.randrange(model.num_branches) for _ in range(model.num_searchable_layers)]


def clip_values(model: torch.nn.Module) -> dict[str, float]:
    """Every clip value, tagged by searchable layer and branch, for TensorBoard."""
    values, layer = {}, -1
    for m in model.modules():
        if isinstance(m, ClipActivation):
            layer += m.branch == 0
            values[f"clip/layer{layer:02d}/branch{m.branch}"] = m.upper_bound.item()
    return values


class Run:
    """Stage 1's state: the model, the selection generator, where the run is (phase, iteration,
    epoch, batch), the phase's optimizer and schedule and the running top-1; it checkpoints itself
    and resumes from a checkpoint, exactly (the same batches, selections and values)."""

    def __init__(self, args: argparse.Namespace, model: Supernet, config: dict, device: torch.device):
        self.args, self.model, self.config, self.device = args, model, config, device
        self.selection_rng = random.Random(args.seed)
        self.phase, self.iteration, self.epoch, self.batch = 1, 0, 0, 0
        self.meters = {"correct": 0.0, "seen": 0.0}
        self.amp = Amp(args.amp, device)
        self.pieces_per_pass: int | None = None  # train(): --pieces_per_pass, or what fits the device
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.resumed: dict | None = None
        self.last_saved = Path(args.resume) if args.resume else None

    def load(self, path: str) -> None:
        """The model and the position of a checkpoint of this stage (``--resume``); the optimizer,
        schedule and generators follow in ``start_phase`` and ``restore_rng``."""
        resumed = load_resume_state(path, self.args.trust_pickle)
        check_config(resumed["config"], self.config, f"--resume {path}")
        kept = ("batch_size", "abin_total_iters", "awbin_total_iters", "amp", "replicas")
        check_config(resumed["args"], {k: getattr(self.args, k) for k in kept}, f"--resume {path}")
        load_model_state(self.model, resumed, path)
        self.phase, self.iteration = resumed["phase"], resumed["iter"]
        self.epoch, self.batch = resumed["epoch"], resumed["batch"]
        self.meters = dict(resumed["meters"])
        self.resumed = resumed

    def restore_rng(self) -> None:
        """The generators of the checkpoint, after everything that draws random numbers while
        setting up."""
        if self.resumed is not None:
            restore_rng(self.resumed["rng"], self.selection_rng, self.device)

    def draw_selection(self) -> list[int]:
        return draw_selection(self.model, self.selection_rng)

    def start_phase(self, phase: int, initialisation_images: Callable[[], torch.Tensor]) -> None:
        """Enter ``phase`` (SPEC 3): precision, the LSQ activation steps initialised from the first
        piece of a batch of their own (``training.lsq_init``) at the start of phase 1, the weight steps
        re-initialised at the start of phase 2, which begins a fresh epoch as the reference's second
        ``train()``; a new optimizer and schedule, or the checkpoint's."""
        self.model.change_precision(True, phase == 2)
        if phase != self.phase:  # phase 1 ended here: phase 2 starts from its beginning
            self.phase, self.iteration, self.meters = phase, 0, {"correct": 0.0, "seen": 0.0}
            if self.batch:
                self.epoch, self.batch = self.epoch + 1, 0
        if self.iteration == 0:
            if phase == 1:
                initialize_activation_steps(self.model, initialisation_images(), self.draw_selection())
            else:
                self.model.init_weight_steps()
        args = self.args
        lr, decay = ((args.learning_rate_abin, args.weight_decay_abin) if phase == 1 else
                     (args.learning_rate_wbin, args.weight_decay_wbin))
        self.optimizer, self.scheduler = phase_optimizer(self.model, lr, decay, self.total)
        if self.resumed is not None and self.resumed["phase"] == phase:
            self.optimizer.load_state_dict(self.resumed["optimizer"])
            self.scheduler.load_state_dict(self.resumed["scheduler"])
            if self.resumed.get("scaler"):
                self.amp.scaler.load_state_dict(self.resumed["scaler"])

    @property
    def total(self) -> int:
        return self.args.abin_total_iters if self.phase == 1 else self.args.awbin_total_iters

    def checkpoint(self, reading: Reading) -> Path:
        """Save the state after this iteration as ``model_{phase}_best_{iteration}it.pth`` (rank 0
        writes it; every rank takes part)."""
        self.last_saved = Path(self.args.save) / checkpoint_name(self.phase, self.iteration)
        rng = rng_state(self.selection_rng, self.device)  # a collective: every rank takes part
        if distributed.is_main():
            save_file(stage1_checkpoint(
                self.model, self.iteration, reading.top1, config=self.config, phase=self.phase,
                epoch=self.epoch, batch=self.batch, optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(), meters=reading.meters, rng=rng,
                args=vars(self.args), scaler=self.amp.scaler.state_dict()), self.last_saved)
        return self.last_saved


def run_phase(run: Run, teacher: torch.nn.Module | None, data: Datasets, log: RunLog,
              loader: tuple | None = None) -> None:
    """``run``'s phase from its iteration to its end: each iteration a global batch (this process's
    pieces of it), a new selection and the reference's DataParallel step; reports and checkpoints.
    ``loader``: the stage's ``started_loader``, whose workers serve every phase."""
    args, model, device, phase, total = run.args, run.model, run.device, run.phase, run.total
    world, rank = distributed.world_size(), distributed.rank()
    wait = DataWait()
    stream = wait(batch_stream(data.train, args.batch_size, args.workers, args.seed, run.epoch, run.batch,
                               drop_last=False, share=lambda n: Share.of(n, args.replicas, world, rank),
                               source=loader))
    selections = Path(args.save) / "selections" / f"rank{rank}.txt"
    if args.record_selections:
        selections.parent.mkdir(parents=True, exist_ok=True)
    model.train()
    stats = RunningStats(device, **run.meters)
    bar = tqdm(total=total, initial=run.iteration, desc=f"phase {phase} ({PHASES[phase]})",
               dynamic_ncols=True, disable=not distributed.is_main())
    tick, tick_iter = time.time(), run.iteration
    while run.iteration < total:
        run.epoch, batch, (images, labels) = next(stream)
        run.batch = batch + 1
        share = Share.of(min(args.batch_size, len(data.train) - batch * args.batch_size), args.replicas,
                         world, rank)
        images = to_device(images, device)
        labels = labels.to(device, non_blocking=True)
        selection = run.draw_selection()
        if args.record_selections:
            with open(selections, "a") as f:
                f.write(f"{phase} {run.iteration + 1} {','.join(map(str, selection))}\n")
        draws = Draws(args.seed, run.iteration + 1 + (args.abin_total_iters if phase == 2 else 0))
        logits, loss, _ = stage_step(model, teacher, images, labels, selection, run.optimizer, run.amp, share,
                                     run.pieces_per_pass, draws)
        run.scheduler.step()
        run.iteration += 1
        stats.add(loss, logits, labels, run.iteration)
        bar.update(1)
        report = run.iteration % args.report_freq == 0 or run.iteration == total
        checkpoint = run.iteration == 1 or run.iteration % args.save_interval == 0 or run.iteration == total
        if not (report or checkpoint):
            continue
        # The one wait for the device: sums over the ranks, and a non-finite loss seen by every
        # rank at once, so all stop together and no checkpoint holds a diverged model.
        reading = stats.read()
        if reading.nonfinite_at:
            raise UsageError(
                f"the loss is not finite (nan or inf) at phase {phase} iteration "
                f"{reading.nonfinite_at}; stopping. "
                + (f"The last checkpoint, {run.last_saved}, is intact." if run.last_saved else
                   "No checkpoint was written yet."))
        if report:
            lr = run.optimizer.param_groups[-1]["lr"]
            speed = (run.iteration - tick_iter) * args.batch_size / (time.time() - tick)
            tick, tick_iter = time.time(), run.iteration
            waited = wait.per_step_ms()
            bar.set_postfix(loss=f"{reading.loss:.3f}", top1=f"{reading.top1:.2f}", lr=f"{lr:.2e}",
                            img_s=f"{speed:.0f}", data_ms=f"{waited:.0f}")
            log.info(f"phase {phase} iter {run.iteration}/{total} loss {reading.loss:.4f} "
                     f"top1 {reading.top1:.2f} lr {lr:.3e} {speed:.0f} img/s, "
                     f"waiting {waited:.1f} ms/step for data")
            step = run.iteration + (args.abin_total_iters if phase == 2 else 0)
            log.scalars(step, {f"{PHASES[phase]}/loss": reading.loss,
                               f"{PHASES[phase]}/top1": reading.top1, f"{PHASES[phase]}/lr": lr,
                               f"{PHASES[phase]}/data_wait_ms": waited, **clip_values(model)})
            stats.new_window()
            wait.reset()
        if checkpoint:
            run.checkpoint(reading)
    bar.close()


def train(args: argparse.Namespace) -> None:
    device = distributed.setup(args.device, args.dist_timeout)
    world, rank = distributed.world_size(), distributed.rank()
    seed_everything(args.seed, rank)
    torch.backends.cudnn.benchmark = True  # as the reference: fixed shapes, the fastest kernels
    check_amp(args.amp, device)
    data = stage_datasets(args)
    loaders = check_shared_memory(args.workers, Share.of(args.batch_size, args.replicas, world, rank).images,
                                  resolution(args.base_resolution, args.resolution_multiplier))
    config = model_config(args, data.num_classes)
    model = build_supernet(**config).to(device)
    image = torch.zeros(1, 3, *[resolution(args.base_resolution, args.resolution_multiplier)] * 2,
                        device=device)
    check_training_pieces(model, lambda x: model(x, [0] * model.num_searchable_layers), image,
                          args.batch_size, len(data.train), args.replicas, world)
    run = Run(args, model, config, device)
    if args.resume:
        run.load(args.resume)
    with distributed.main_first():
        teacher, teacher_name = load_teacher(args.teacher, data.num_classes, device, args.trust_pickle,
                                             args.teacher_weights)
    distributed.broadcast_from_main(list(model.state_dict().values()))  # the same start everywhere
    run.restore_rng()
    log = RunLog(Path(args.save), enabled=distributed.is_main())
    log.info(use_tf32(args.tf32, device))
    log.info(loaders)
    pieces = piece_sizes(args.batch_size, args.replicas)
    log.info(f"stage 1: {config['arch']} supernet, {model.num_searchable_layers} searchable layers x "
             f"{model.num_branches} branches, {config['bits']}-bit, {data.num_classes} classes, "
             f"teacher {teacher_name}, device {device}, batches of {args.batch_size} as "
             + (f"{len(pieces)} pieces of {pieces[0]}" if len(pieces) > 1 else "a whole")
             + f" (--replicas {args.replicas})"
             + (f", {args.replicas // world} piece{'s' if args.replicas > world else ''} per process over "
                f"{world} processes" if world > 1 else "")
             + (f", mixed precision {args.amp}" if args.amp else "")
             + (f", resumed from {args.resume} (phase {run.phase}, iteration {run.iteration})"
                if args.resume else ""))

    def initialisation_images() -> torch.Tensor:
        return first_piece(data.train, args.batch_size, args.replicas, args.seed, device)

    # The loader's workers start now, before the steps' memory grows, and serve both phases (a
    # loader made for phase 2 would fork its workers from the grown process: utils.data.started_loader).
    loader = started_loader(data.train, args.batch_size, args.workers, args.seed, run.epoch, run.batch,
                            drop_last=False, share=lambda n: Share.of(n, args.replicas, world, rank))
    # Measured after the workers started (the trial passes grow the process's heap).
    run.pieces_per_pass, chose = pieces_per_pass(
        args.pieces_per_pass, len(Share.of(args.batch_size, args.replicas, world, rank).sizes), pieces[0],
        device, lambda n: trial_forward(model, [0] * model.num_searchable_layers, n,
                                        resolution(args.base_resolution, args.resolution_multiplier),
                                        args.amp, device))
    log.info(chose)
    for phase in range(run.phase, 3):
        run.start_phase(phase, initialisation_images)
        run_phase(run, teacher, data, log, loader)
    log.info(f"stage 1 done; checkpoints, log.txt and TensorBoard events are in {Path(args.save).resolve()}"
             + (f"; last checkpoint {run.last_saved}" if run.last_saved else ""))
    log.close()


def stage_step(model: Supernet, teacher: torch.nn.Module | None, images: torch.Tensor, labels: torch.Tensor,
               selection: list[int], optimizer: torch.optim.Optimizer, amp: Amp, share: Share,
               pieces_per_pass: int | None = None, draws: Draws | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1's step on this process's ``images``: the teacher's logits of its pieces, then the
    reference's DataParallel step of the student (``train_step``, ``pieces_per_pass`` pieces at a
    time, dropout masks from ``draws``). ``bench.memory`` measures this function, so the README's
    table is what the stage does."""
    return train_step(model, images, selection, criterion(teacher, images, labels, amp, share), optimizer,
                      amp, share, pieces_per_pass, draws)


def criterion(teacher: torch.nn.Module | None, images: torch.Tensor, labels: torch.Tensor, amp: Amp,
              share: Share | None = None) -> Callable[[torch.Tensor, slice], torch.Tensor]:
    """The loss of a piece's logits: distillation from the teacher (the method), or cross-entropy
    on the labels without one.

    The teacher runs here, on each piece of ``share`` (default: the whole of ``images``) under the
    same autocast as the student, before the student's first forward: its activations are freed
    before the student's are saved, so a device holds the larger of the two, not their sum (about
    1 GiB less at pieces of 96, README "Memory"). Only its logits wait (a few MB). The teacher is
    frozen and in eval mode and draws no random numbers, so when it runs does not change a value.
    """
    if teacher is None:
        return lambda logits, piece: F.cross_entropy(logits, labels[piece])
    share = share or Share.of(len(images))
    with torch.no_grad(), amp.autocast():
        targets = torch.cat([teacher(images[start:stop]).float() for start, stop in share.bounds()])
    return lambda logits, piece: kd_loss(logits, targets[piece])


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    fail_cleanly(train, parse_args())
