"""Stage 1: train the BASQ supernet (SPEC section 3).

Phase 1 quantizes activations only, phase 2 activations and weights. Every iteration draws a new
branch per searchable layer; Adam trains each branch's clips under that branch's L2 decay; the loss
distils a frozen full-precision teacher.

    python 01train_supernet.py --data {your_imagenet_dataset_folder}
    torchrun --nproc_per_node 8 01train_supernet.py --data {your_imagenet_dataset_folder}

Under torchrun the run is data parallel: --batch_size is the global batch, split evenly over the
processes; every process draws the same selection each iteration (one shared seed); rank 0 alone
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

from models import build_supernet
from quant import ClipActivation
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
from utils.data import batch_stream, initialisation_batch, stage_datasets, to_device
from utils.errors import UsageError
from utils.logs import RunLog
from utils.losses import kd_loss
from utils.param_groups import stage1_param_groups
from utils.runtime import fail_cleanly, seed_everything, use_tf32
from utils.teacher import load_teacher
from utils.training import Amp, DataWait, RunningStats, train_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = stage_parser(__doc__, save="train-supernet", dist_timeout=30)
    parser.add_argument("--batch_size", type=int, default=768,
                        help="global batch size (under torchrun, split evenly over the processes)")
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
    parser.add_argument("--sync_bn", action="store_true",
                        help="under torchrun on GPUs: BatchNorm statistics over the global batch "
                             "(SyncBatchNorm) instead of each process's share")
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


def train(args: argparse.Namespace) -> None:
    device = distributed.setup(args.device, args.dist_timeout)
    world, rank = distributed.world_size(), distributed.rank()
    if args.batch_size % world:
        raise UsageError(f"--batch_size {args.batch_size} does not split evenly over {world} processes; "
                         f"give a multiple of {world}")
    seed_everything(args.seed, rank)
    torch.backends.cudnn.benchmark = True  # as the reference: fixed shapes, the fastest kernels
    save = Path(args.save)
    data = stage_datasets(args)
    config = model_config(args, data.num_classes)
    model = build_supernet(**config).to(device)
    selection_rng = random.Random(args.seed)
    start_phase, iteration, epoch, batch = 1, 0, 0, 0
    meters = {"correct": 0.0, "seen": 0.0}
    resumed = None
    if args.resume:
        resumed = load_resume_state(args.resume, args.trust_pickle)
        check_config(resumed["config"], config, f"--resume {args.resume}")
        kept = ("batch_size", "abin_total_iters", "awbin_total_iters", "amp")
        check_config(resumed["args"], {k: getattr(args, k) for k in kept}, f"--resume {args.resume}")
        load_model_state(model, resumed, args.resume)
        start_phase, iteration = resumed["phase"], resumed["iter"]
        epoch, batch = resumed["epoch"], resumed["batch"]
        meters = dict(resumed["meters"])
    with distributed.main_first():
        teacher, teacher_name = load_teacher(args.teacher, data.num_classes, device, args.trust_pickle,
                                             args.teacher_weights)
    trainer = distributed.wrap(model, device, args.sync_bn)  # the training forward; ``model`` for the rest
    amp = Amp(args.amp, device)
    if resumed is not None:  # after everything that draws random numbers while setting up
        restore_rng(resumed["rng"], selection_rng, device)
    log = RunLog(save, enabled=distributed.is_main())
    log.info(use_tf32(args.tf32, device))
    log.info(f"stage 1: {config['arch']} supernet, {model.num_searchable_layers} searchable layers x "
             f"{model.num_branches} branches, {config['bits']}-bit, {data.num_classes} classes, "
             f"teacher {teacher_name}, device {device}"
             + (f", {world} processes of {args.batch_size // world} images" if world > 1 else "")
             + (f", mixed precision {args.amp}" if args.amp else "")
             + (f", resumed from {args.resume} (phase {start_phase}, iteration {iteration})"
                if resumed else ""))
    per_rank = args.batch_size // world
    wait = DataWait()
    stream = wait(batch_stream(data.train, per_rank, args.workers, args.seed, epoch, batch,
                               num_replicas=world, rank=rank))
    selections = save / "selections" / f"rank{rank}.txt"
    if args.record_selections:
        selections.parent.mkdir(parents=True, exist_ok=True)
    totals = {1: args.abin_total_iters, 2: args.awbin_total_iters}
    lrs = {1: args.learning_rate_abin, 2: args.learning_rate_wbin}
    decays = {1: args.weight_decay_abin, 2: args.weight_decay_wbin}
    last_saved = Path(args.resume) if args.resume else None
    for phase in range(start_phase, 3):
        total = totals[phase]
        model.change_precision(True, phase == 2)
        if phase == 1 and iteration == 0:  # the reference's initialize(), on a batch of its own
            images, _ = initialisation_batch(data.train, per_rank, args.workers, args.seed, world, rank)
            model.initialize_activation_steps(to_device(images, device), draw_selection(model, selection_rng),
                                              distributed.average_over_ranks)
        if phase == 2 and iteration == 0:
            model.init_weight_steps()
        optimizer, scheduler = phase_optimizer(model, lrs[phase], decays[phase], total)
        if resumed is not None and resumed["phase"] == phase:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            if resumed.get("scaler"):
                amp.scaler.load_state_dict(resumed["scaler"])
        model.train()
        stats = RunningStats(device, **meters)
        bar = tqdm(total=total, initial=iteration, desc=f"phase {phase} ({PHASES[phase]})",
                   dynamic_ncols=True, disable=not distributed.is_main())
        tick, tick_iter = time.time(), iteration
        while iteration < total:
            epoch, batch, (images, labels) = next(stream)
            images = to_device(images, device)
            labels = labels.to(device, non_blocking=True)
            selection = draw_selection(model, selection_rng)
            if args.record_selections:
                with open(selections, "a") as f:
                    f.write(f"{phase} {iteration + 1} {','.join(map(str, selection))}\n")
            logits, loss, _ = train_step(trainer, images, selection, criterion(teacher, images, labels, amp),
                                         optimizer, amp)
            scheduler.step()
            iteration += 1
            stats.add(loss, logits, labels, iteration)
            bar.update(1)
            report = iteration % args.report_freq == 0 or iteration == total
            checkpoint = iteration == 1 or iteration % args.save_interval == 0 or iteration == total
            if not (report or checkpoint):
                continue
            # The one wait for the device: sums over the ranks, and a non-finite loss seen by every
            # rank at once, so all stop together and no checkpoint holds a diverged model.
            reading = stats.read()
            if reading.nonfinite_at:
                raise UsageError(
                    f"the loss is not finite (nan or inf) at phase {phase} iteration "
                    f"{reading.nonfinite_at}; stopping. "
                    + (f"The last checkpoint, {last_saved}, is intact." if last_saved else
                       "No checkpoint was written yet."))
            if report:
                lr = optimizer.param_groups[-1]["lr"]
                speed = (iteration - tick_iter) * args.batch_size / (time.time() - tick)
                tick, tick_iter = time.time(), iteration
                waited = wait.per_step_ms()
                bar.set_postfix(loss=f"{reading.loss:.3f}", top1=f"{reading.top1:.2f}", lr=f"{lr:.2e}",
                                img_s=f"{speed:.0f}", data_ms=f"{waited:.0f}")
                log.info(f"phase {phase} iter {iteration}/{total} loss {reading.loss:.4f} "
                         f"top1 {reading.top1:.2f} lr {lr:.3e} {speed:.0f} img/s, "
                         f"waiting {waited:.1f} ms/step for data")
                step = iteration + (totals[1] if phase == 2 else 0)
                log.scalars(step, {f"{PHASES[phase]}/loss": reading.loss,
                                   f"{PHASES[phase]}/top1": reading.top1, f"{PHASES[phase]}/lr": lr,
                                   f"{PHASES[phase]}/data_wait_ms": waited, **clip_values(model)})
                stats.new_window()
                wait.reset()
            if checkpoint:
                last_saved = save / checkpoint_name(phase, iteration)
                rng = rng_state(selection_rng, device)  # a collective: every rank takes part
                if distributed.is_main():
                    save_file(stage1_checkpoint(
                        model, iteration, reading.top1, config=config, phase=phase, epoch=epoch,
                        batch=batch + 1, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        meters=reading.meters, rng=rng, args=vars(args), scaler=amp.scaler.state_dict()),
                              last_saved)
        bar.close()
        if phase == 1:
            iteration = 0
            meters = {"correct": 0.0, "seen": 0.0}
    log.info(f"stage 1 done; checkpoints, log.txt and TensorBoard events are in {save.resolve()}"
             + (f"; last checkpoint {last_saved}" if last_saved else ""))
    log.close()


def criterion(teacher: torch.nn.Module | None, images: torch.Tensor, labels: torch.Tensor, amp: Amp
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss of this batch's logits: distillation from the teacher (the method), or cross-entropy
    on the labels without one. The teacher runs under the same autocast as the student."""
    if teacher is None:
        return lambda logits: F.cross_entropy(logits, labels)
    with torch.no_grad(), amp.autocast():
        teacher_logits = teacher(images).float()
    return lambda logits: kd_loss(logits, teacher_logits)


if __name__ == "__main__":
    fail_cleanly(train, parse_args())
