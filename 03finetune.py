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
one process per arch (k).
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import distributed
from utils.bn_recalibration import recalibrate_bn
from utils.checkpoint import load_supernet, save_file
from utils.cli import add_eval_args, boolean, fail_cleanly, model_config, stage_datasets, stage_parser
from utils.data import batch_stream, cache_batches, val_loader
from utils.folds import accuracy_on, fold_batches
from utils.logs import RunLog
from utils.param_groups import stage3_trainable
from utils.results import format_block, read_search_result, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Under torchrun a process that has fine-tuned its archs waits for the slowest one: up to an
    # arch's fine-tuning (hours on ImageNet), hence the long --dist_timeout.
    parser = stage_parser(__doc__, save="eval-blast", dist_timeout=24 * 60)
    add_eval_args(parser)
    parser.add_argument("--search-result", default="eval-kfold-evolution/search_result.json",
                        help="search_result.json written by 02kfold_evolution.py")
    parser.add_argument("--bn_epochs", type=int, default=3)
    parser.add_argument("--learning_rate_bnstabilize", type=float, default=7.5e-6)
    parser.add_argument("--train_clip", type=boolean, default=True, help="train the clips too")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--iters_per_epoch", type=int, default=0,
                        help="training iterations per epoch (0: one pass over the training set)")
    return parser.parse_args(argv)


def finetune(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = distributed.setup(args.device, args.dist_timeout)
    save = Path(args.save)
    data = stage_datasets(args)
    config = model_config(args, data.num_classes)
    model, _ = load_supernet(args.supernet, config, args.trust_pickle)
    model.to(device)
    supernet_state = {k: v.clone() for k, v in model.state_dict().items()}
    batches, num_batches = cache_batches(val_loader(data.val, args.val_batch_size, args.workers),
                                         args.max_val_iters)
    found = read_search_result(args.search_result, config, model.num_searchable_layers,
                               model.num_branches)
    if "k" not in found and len(found["archs"]) != args.k:
        raise ValueError(f"--search-result {args.search_result} has {len(found['archs'])} folds, "
                         f"--k is {args.k}")
    for fold in found["folds"]:  # refuses a --k larger than the number of batches, or a bad fold
        fold_batches(num_batches, args.k, fold)
    # The folds are batch indices: stage 3 must split the validation set as stage 2 did.
    for key, ours in (("k", args.k), ("val_batch_size", args.val_batch_size), ("num_batches", num_batches)):
        if key in found and found[key] != ours:
            raise ValueError(f"--search-result {args.search_result} was searched with {key}={found[key]}, "
                             f"here it is {ours}: use stage 2's --k, --val_batch_size and --max_val_iters")
    iters = args.iters_per_epoch or len(data.train) // args.batch_size
    log = RunLog(save, enabled=distributed.is_main())
    log.info(f"stage 3: {len(found['archs'])} archs from {args.search_result}, supernet {args.supernet}, "
             f"{args.bn_epochs} epochs of {iters} iterations, lr {args.learning_rate_bnstabilize}"
             + (f", spread over {distributed.world_size()} processes" if distributed.is_distributed()
                else ""))
    archs = list(zip(found["folds"], found["archs"], found["full_accs"], strict=True))
    finished = []
    for fold, arch, searched_acc in tqdm(archs[distributed.rank()::distributed.world_size()], desc="archs",
                                         position=0, dynamic_ncols=True, disable=not distributed.is_main()):
        # The augmentation (drawn from torch's generator without loader workers) depends on the seed
        # and the fold alone: an arch gets the same result on any rank, after any other arch.
        torch.manual_seed(args.seed + fold)
        model.load_state_dict(supernet_state)  # every arch starts from the stage-1 supernet
        model.change_precision(True, True)
        _, full = fold_batches(num_batches, args.k, fold)

        def evaluate(arch=arch, full=full) -> float:
            model.eval()
            return accuracy_on(lambda x: model(x.to(device), arch), batches, full)

        stream = batch_stream(data.train, args.batch_size, args.workers, args.seed + fold)
        if args.bn_recalibration_batches > 0:
            recalibrate_bn(model, arch, [next(stream)[2] for _ in range(args.bn_recalibration_batches)],
                           device)
        accs = [searched_acc, evaluate()]
        log.info(f"arch {fold}: stage-2 full_acc {accs[0]:.2f}, loaded {accs[1]:.2f}")
        groups = stage3_trainable(model, args.train_clip)
        optimizer = torch.optim.SGD(groups, lr=args.learning_rate_bnstabilize, momentum=0.9, nesterov=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.bn_epochs, 1))
        for epoch in range(1, args.bn_epochs + 1):
            model.train()
            start = time.time()
            bar = tqdm(range(iters), desc=f"arch {fold} epoch {epoch}", position=1, leave=False,
                       dynamic_ncols=True, disable=not distributed.is_main())
            for _ in bar:
                _, _, (images, labels) = next(stream)
                loss = F.cross_entropy(model(images.to(device), arch), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            scheduler.step()
            acc = evaluate()
            accs.append(acc)
            path = save / f"arch{fold}_model_actwbin_{args.bits}_{args.bits}_bn_{epoch}ep.pth"
            save_file({"iter": epoch, "model_state_dict": {k: v.detach().cpu()
                                                           for k, v in model.state_dict().items()},
                       "best_top1_acc": acc, "config": config, "selection": list(arch), "fold": fold}, path)
            log.info(f"arch {fold} epoch {epoch}: full_acc {acc:.2f} ({time.time() - start:.0f} s) -> {path}")
        finished.append({"fold": fold, "accs": accs,
                         "bnfull_acc": max(accs[:1] + accs[2:]) if args.bn_epochs else accs[0]})
    shares = distributed.gather_objects(finished)
    for rank, share in enumerate(shares[1:], start=1):  # rank 0 logged its own archs as they went
        for done in share:
            log.info(f"{arch_line(done)} [rank {rank}]")
    by_fold = {done["fold"]: done["bnfull_acc"] for share in shares for done in share}
    bnfull_accs = [by_fold[fold] for fold in found["folds"]]
    summary = {"fold_accs": found["fold_accs"], "full_accs": found["full_accs"],
               "**bnfull_accs": bnfull_accs, "archs": found["archs"]}
    if distributed.is_main():
        write_json({"folds": found["folds"], "fold_accs": found["fold_accs"], "full_accs": found["full_accs"],
                    "bnfull_accs": bnfull_accs, "archs": found["archs"], "config": config,
                    "supernet": str(args.supernet), "search_result": str(args.search_result)},
                   save / "final_result.json")
        print(format_block("final-result", summary))
    log.info(f"final result: {save / 'final_result.json'}; fine-tuned checkpoints and log.txt in {save}")
    log.close()
    return summary


def arch_line(done: dict) -> str:
    """An arch's accuracies in one line (rank 0's log of the archs other processes fine-tuned)."""
    searched, loaded, *epochs = done["accs"]
    return (f"arch {done['fold']}: stage-2 full_acc {searched:.2f}, loaded {loaded:.2f}, after each epoch "
            f"[{', '.join(f'{a:.2f}' for a in epochs)}], bnfull_acc {done['bnfull_acc']:.2f}")


if __name__ == "__main__":
    fail_cleanly(finetune, parse_args())
