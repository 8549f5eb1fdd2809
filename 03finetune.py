"""Stage 3: BN-stabilize fine-tuning of each fold's branch choice (SPEC section 5).

For fold i's arch: load the stage-1 supernet, fix the selection, and fine-tune only the biases
and the clips (SGD, cross-entropy) in train mode, so the BN statistics settle on that selection.
Accuracy is measured on the validation batches outside fold i.

    python 03finetune.py --data {your_imagenet_dataset_folder} \
        --search-result eval-kfold-evolution/search_result.json

Under torchrun the archs are spread over the processes (rank r fine-tunes archs r, r + N, ...,
each on its own GPU, and writes their checkpoints); rank 0 gathers the accuracies into one
final_result.json and one printed block. Each arch's fine-tuning depends on the seed and its fold
alone, so the result is that of a single process. This beats data parallelism here: the archs are
independent, a few epochs of biases and clips need no gradient all-reduce, and the BN statistics,
which this stage re-estimates, keep the whole --batch_size of one process. It stops scaling at
one process per arch (k). Each step, and each evaluation, is the reference's nn.DataParallel's over
--replicas devices (SPEC 5a): its pieces computed together (--pieces_per_pass), each as a device did.
"""
import argparse
import itertools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils.torch_floor  # noqa: F401  (first: an older torch stops here, with one line)
from search import reference_results
from search.bn_recalibration import recalibrate_bn
from search.evaluation import Evaluation, evaluation_setup, gather_by_fold
from search.folds import fold_batches
from search.results import check_search_result, format_block, parse_block, read_search_result, write_json
from training.memory import pieces_per_pass, trial_forward
from training.param_groups import stage3_param_groups
from training.pieces import Draws, Share, check_training_pieces, piece_sizes
from training.step import Amp, DataWait, RunningStats, train_step
from utils import distributed
from utils.checkpoint import finetuned_checkpoint, finetuned_name, save_file
from utils.cli import add_amp_arg, add_eval_args, boolean, stage_parser
from utils.data import ShareBatches, batch_stream, resolution, started_loader, to_device
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
    # Under torchrun a process that has fine-tuned its archs waits for the slowest one: up to an
    # arch's fine-tuning (hours on ImageNet), hence the long --dist_timeout.
    parser = stage_parser(__doc__, save="eval-blast", dist_timeout=24 * 60)
    add_eval_args(parser)
    parser.add_argument("--search-result", default=None,
                        help="search_result.json written by 02kfold_evolution.py, or a text file holding "
                             "its printed ===total-result=== block (from a terminal or a log). Default: "
                             "the authors' published archs, for the model they belong to (the ImageNet "
                             "defaults, k = 10)")
    parser.add_argument("--bn_epochs", type=int, default=3)
    parser.add_argument("--learning_rate_bnstabilize", type=float, default=7.5e-6)
    parser.add_argument("--train_clip", type=boolean, default=True, help="train the clips too")
    parser.add_argument("--batch_size", type=int, default=768)
    add_amp_arg(parser)
    parser.add_argument("--iters_per_epoch", type=int, default=0,
                        help="training iterations per epoch, for small runs (0: whole epochs, the last "
                             "partial batch included, as the reference)")
    return parser.parse_args(argv)


def bn_stabilize_optimizer(model: torch.nn.Module, lr: float, train_clip: bool = True) -> torch.optim.SGD:
    """The reference's SGD (Nesterov, momentum 0.9) over every parameter: biases and clips at
    ``lr``, everything else at lr 0 (``stage3_param_groups``)."""
    return torch.optim.SGD(stage3_param_groups(model, lr, train_clip), lr=lr, momentum=0.9, nesterov=True)


def search_result(args: argparse.Namespace, config: dict, model: torch.nn.Module) -> tuple[dict, str]:
    """The archs to fine-tune and where they come from: ``--search-result``, or without it the
    authors' published archs when the flags describe the model they belong to."""
    if args.search_result is not None:
        return (read_search_result(args.search_result, config, model.num_searchable_layers,
                                   model.num_branches, args.k), str(args.search_result))
    if not reference_results.belongs_to(config, args.k):
        raise UsageError("no --search-result: give stage 2's eval-kfold-evolution/search_result.json "
                         "(or a file holding its printed ===total-result=== block). The authors' "
                         "published archs belong to the ImageNet defaults only (MobileNet-v2, width 1.0, "
                         "divisor 1, 224 px, 2-bit, the seven reference decays, 1000 classes, --k 10)")
    found = parse_block(reference_results.TOTAL_RESULT)
    return (check_search_result(found, "the published search result", None, model.num_searchable_layers,
                                model.num_branches, args.k), reference_results.SOURCE)


def finetune(args: argparse.Namespace) -> dict:
    torch.backends.cudnn.benchmark = True  # as the reference: fixed shapes, the fastest kernels
    setup = evaluation_setup(args)
    check_amp(args.amp, setup.device)
    size = resolution(args.base_resolution, args.resolution_multiplier)
    loaders = check_shared_memory(args.workers, max(args.batch_size, args.val_batch_size), size)
    found, source = search_result(args, setup.config, setup.model)
    setup.check_folds(found["folds"], args.k)
    # The folds are batch indices: stage 3 must split the validation set as stage 2 did.
    # Its accuracies are comparable with this stage's when its evaluation's pieces were these too.
    for key, ours in (("k", args.k), ("val_batch_size", args.val_batch_size),
                      ("num_batches", setup.num_batches), ("replicas", args.replicas)):
        if key in found and found[key] != ours:
            raise UsageError(f"--search-result {args.search_result} was searched with {key}={found[key]}, "
                             f"here it is {ours}: use stage 2's --k, --val_batch_size, --max_val_iters "
                             "and --replicas")
    save = Path(args.save)
    log = RunLog(save, enabled=distributed.is_main())
    log.info(use_tf32(args.tf32, setup.device))
    log.info(loaders)
    iters = args.iters_per_epoch or math.ceil(len(setup.data.train) / args.batch_size)
    log.info(f"stage 3: {len(found['archs'])} archs from {source}, supernet {args.supernet}, "
             f"{args.bn_epochs} epochs of {iters} iterations, lr {args.learning_rate_bnstabilize}"
             + (f", spread over {distributed.world_size()} processes" if distributed.is_distributed()
                else ""))
    image = torch.zeros(1, 3, *[resolution(args.base_resolution, args.resolution_multiplier)] * 2,
                        device=setup.device)
    check_training_pieces(setup.model, lambda x: setup.model(x, found["archs"][0]), image, args.batch_size,
                          len(setup.data.train), args.replicas)
    supernet_state = {k: v.clone() for k, v in setup.model.state_dict().items()}
    archs = distributed.share(list(zip(found["folds"], found["archs"], found["full_accs"], strict=True)))
    # The training loader's workers start now, before the validation cache and the steps' memory
    # grow, and serve every arch (a loader made per arch would fork them from the grown process:
    # utils.data.started_loader).
    loader = (started_loader(setup.data.train, args.batch_size, args.workers, args.seed + archs[0][0])
              if archs else None)
    pieces = piece_sizes(args.batch_size, args.replicas)  # measured after the workers started
    args.pieces_per_pass, chose = pieces_per_pass(
        args.pieces_per_pass, len(pieces), pieces[0], setup.device,
        lambda n: trial_forward(setup.model, found["archs"][0], n,
                                resolution(args.base_resolution, args.resolution_multiplier), args.amp,
                                setup.device))
    log.info(chose)
    finished = []
    for fold, arch, searched_acc in tqdm(archs, desc="archs", position=0,
                                         dynamic_ncols=True, disable=not distributed.is_main()):
        setup.model.load_state_dict(supernet_state)  # every arch starts from the stage-1 supernet
        finished.append(finetune_arch(args, setup, fold, arch, searched_acc, iters, save, log, loader))
    by_fold = gather_by_fold(finished, log, arch_line)
    bnfull_accs = [by_fold[fold]["bnfull_acc"] for fold in found["folds"]]
    summary = {"fold_accs": found["fold_accs"], "full_accs": found["full_accs"],
               "**bnfull_accs": bnfull_accs, "archs": found["archs"]}
    if distributed.is_main():
        write_json({"folds": found["folds"], "fold_accs": found["fold_accs"], "full_accs": found["full_accs"],
                    "bnfull_accs": bnfull_accs, "archs": found["archs"], "config": setup.config,
                    "supernet": str(args.supernet), "search_result": source}, save / "final_result.json")
        print(format_block("final-result", summary))
    log.info(f"final result: {save / 'final_result.json'}; fine-tuned checkpoints and log.txt in {save}")
    log.close()
    return summary


def finetune_arch(args: argparse.Namespace, setup: Evaluation, fold: int, arch: list[int],
                  searched_acc: float, iters: int, save: Path, log: RunLog,
                  source: tuple[torch.utils.data.DataLoader, ShareBatches]) -> dict:
    """BN-stabilize fine-tuning of fold ``fold``'s arch; its accuracy outside the fold after each
    epoch, a checkpoint per epoch, and ``bnfull_acc``. ``source``: the stage's ``started_loader``."""
    # The augmentation (drawn from torch's generator without loader workers) depends on the seed
    # and the fold alone: an arch gets the same result on any rank, after any other arch.
    seed_everything(args.seed + fold)
    model, device = setup.model, setup.device
    model.change_precision(True, True)
    _, full = fold_batches(setup.num_batches, args.k, fold)
    stream = batch_stream(setup.data.train, args.batch_size, args.workers, args.seed + fold, source=source)
    if args.bn_recalibration_batches > 0:
        recalibrate_bn(model, arch, [next(stream)[2] for _ in range(args.bn_recalibration_batches)], device,
                       args.replicas)
    accs = [searched_acc, setup.accuracy(arch, setup.val.stream(full))]
    log.info(f"arch {fold}: stage-2 full_acc {accs[0]:.2f}, loaded {accs[1]:.2f}")
    optimizer = bn_stabilize_optimizer(model, args.learning_rate_bnstabilize, args.train_clip)
    amp = Amp(args.amp, device)
    if not args.iters_per_epoch:  # whole epochs, the last partial batch included
        loader, sampler = source
        sampler.retarget(args.seed + fold, drop_last=False)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.bn_epochs, 1))
    for epoch in range(args.bn_epochs):
        model.train()
        start = time.time()
        if args.iters_per_epoch:
            batches = (item for _, _, item in itertools.islice(stream, iters))
        else:
            sampler.set_epoch(epoch)
            batches = loader
        stats = RunningStats(device, over_ranks=False)  # each process trains archs of its own
        wait = DataWait()
        for step, (images, labels) in enumerate(tqdm(
                wait(batches), total=iters, desc=f"arch {fold} epoch {epoch}", position=1, leave=False,
                dynamic_ncols=True, disable=not distributed.is_main())):
            labels = labels.to(device, non_blocking=True)
            logits, loss, _ = train_step(model, to_device(images, device), arch,
                                         lambda logits, piece, labels=labels:
                                         F.cross_entropy(logits, labels[piece]),
                                         optimizer, amp, Share.of(len(images), args.replicas),
                                         args.pieces_per_pass,
                                         Draws(args.seed + fold, epoch * iters + step + 1))
            stats.add(loss, logits, labels, 0)
        scheduler.step()
        trained = stats.read()
        acc = setup.accuracy(arch, setup.val.stream(full))
        accs.append(acc)
        path = save / finetuned_name(fold, args.bits, epoch)
        evaluation = {"val_batch_size": args.val_batch_size, "replicas": args.replicas}
        save_file(finetuned_checkpoint(model, epoch, acc, setup.config, arch, fold, evaluation), path)
        log.info(f"arch {fold} epoch {epoch}: train loss {trained.loss:.4f} top1 {trained.top1:.2f}, "
                 f"full_acc {acc:.2f} ({time.time() - start:.0f} s, waiting {wait.per_step_ms():.1f} ms/step "
                 f"for data) -> {path}")
        log.scalars(epoch, {f"arch{fold}/train_loss": trained.loss, f"arch{fold}/full_acc": acc,
                            f"arch{fold}/data_wait_ms": wait.per_step_ms()})
    return {"fold": fold, "accs": accs, "bnfull_acc": max(accs[:1] + accs[2:]) if args.bn_epochs else accs[0]}


def arch_line(done: dict) -> str:
    """An arch's accuracies in one line (rank 0's log of the archs other processes fine-tuned)."""
    searched, loaded, *epochs = done["accs"]
    return (f"arch {done['fold']}: stage-2 full_acc {searched:.2f}, loaded {loaded:.2f}, after each epoch "
            f"[{', '.join(f'{a:.2f}' for a in epochs)}], bnfull_acc {done['bnfull_acc']:.2f}")


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    fail_cleanly(finetune, parse_args())
