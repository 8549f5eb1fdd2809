"""Stage 2: k-fold evolutionary search of one branch per layer (SPEC section 4).

The validation set, in a fixed order, is split by batch index into k folds. On each fold an
evolutionary search finds the branch choice with the best fold accuracy; the winner is then
scored on every other batch ("full accuracy"). Finished folds are saved, so a rerun continues.

    python 02kfold_evolution.py --data {your_imagenet_dataset_folder}
    torchrun --nproc_per_node 8 02kfold_evolution.py --data {your_imagenet_dataset_folder}

Under torchrun the folds are spread over the processes (rank r searches folds r, r + N, ...; each
on its own GPU); rank 0 gathers them into one search_result.json and one printed block. A fold's
search depends on the seed and the fold alone, so the result is that of a single process.
"""
import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from utils import distributed
from utils.bn_recalibration import recalibrate_bn
from utils.checkpoint import load_supernet
from utils.cli import (
    add_eval_args,
    fail_cleanly,
    model_config,
    seed_everything,
    stage_datasets,
    stage_parser,
)
from utils.data import batch_stream, cache_batches, val_loader
from utils.evolution import EvolutionSearch, uniform_search
from utils.folds import accuracy_on, fold_batches
from utils.logs import RunLog
from utils.prefix_scorer import PrefixScorer
from utils.results import format_block, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Under torchrun a process that has searched its folds waits for the slowest one: up to a
    # fold's search (an hour or more on ImageNet), hence the long --dist_timeout.
    parser = stage_parser(__doc__, save="eval-kfold-evolution", dist_timeout=24 * 60)
    add_eval_args(parser)
    parser.add_argument("--folds", type=fold_list, default=None,
                        help="search only these folds, e.g. 0,1 (default: all k)")
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--select-num", type=int, default=10)
    parser.add_argument("--population-num", type=int, default=45)
    parser.add_argument("--m_prob", type=float, default=0.1)
    parser.add_argument("--crossover-num", type=int, default=15)
    parser.add_argument("--mutation-num", type=int, default=15)
    parser.add_argument("--recalibration_batch_size", type=int, default=128)
    parser.add_argument("--prefix_cache_gb", type=float, default=2.0,
                        help="memory for the fold's stage outputs, reused by every candidate that "
                             "shares their prefix of branches (same accuracies, less compute; 0: off). "
                             "Used when the validation batches fit in memory")
    parser.add_argument("--uniform", action="store_true",
                        help="no evolution: score only the selections with one branch (one L2 decay) "
                             "in every layer and keep the best per fold (an ablation)")
    return parser.parse_args(argv)


def search(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)  # seeds 0 for torch, numpy and random, as the reference
    torch.backends.cudnn.deterministic = True  # as the reference: a candidate scores the same each time
    device = distributed.setup(args.device, args.dist_timeout)
    save = Path(args.save)
    data = stage_datasets(args)
    config = model_config(args, data.num_classes)
    model, _ = load_supernet(args.supernet, config, args.trust_pickle)
    model.to(device).eval()
    model.change_precision(True, True)
    batches, num_batches = cache_batches(val_loader(data.val, args.val_batch_size, args.workers),
                                         args.max_val_iters)
    folds_to_search = args.folds if args.folds is not None else list(range(args.k))
    for fold in folds_to_search:  # refuses a --k larger than the number of batches, or a bad fold
        fold_batches(num_batches, args.k, fold)
    calibration = []
    if args.bn_recalibration_batches > 0:
        stream = batch_stream(data.train, args.recalibration_batch_size, args.workers, args.seed)
        calibration = [next(stream)[2] for _ in range(args.bn_recalibration_batches)]

    def accuracy(selection: tuple[int, ...], indices) -> float:
        if calibration:
            recalibrate_bn(model, selection, calibration, device)
        return accuracy_on(lambda x: model(x.to(device), selection), batches, indices)

    log = RunLog(save, enabled=distributed.is_main(), tensorboard=False)
    log.info(f"stage 2: {args.supernet} ({config['arch']}, {config['bits']}-bit, "
             f"{model.num_branches} branches), {num_batches} validation batches in {args.k} folds"
             + (f", spread over {distributed.world_size()} processes" if distributed.is_distributed()
                else ""))
    stat = Path(args.supernet).stat()  # a retrained supernet invalidates the finished folds
    settings = {"config": config, "supernet": str(args.supernet), "k": args.k,
                "supernet_size_mtime": [stat.st_size, stat.st_mtime_ns],
                "num_batches": num_batches, "seed": args.seed,
                "bn_recalibration_batches": args.bn_recalibration_batches, "uniform": args.uniform,
                **{k: getattr(args, k) for k in ("max_epochs", "select_num", "population_num", "m_prob",
                                                 "crossover_num", "mutation_num", "val_batch_size")}}
    mine = folds_to_search[distributed.rank()::distributed.world_size()]
    searched = []
    bar = tqdm(total=len(mine), desc="folds", position=0, dynamic_ncols=True,
               disable=not distributed.is_main())
    for fold in mine:
        fold_file = save / "folds" / f"fold{fold}.json"
        done = _read_json(fold_file)
        if done is not None and done.get("settings") == settings and "num_candidates" in done:
            log.info(f"fold {fold}: finished earlier, kept ({fold_file})")
            searched.append(done)
            bar.update(1)
            continue
        fold_range, full = fold_batches(num_batches, args.k, fold)
        candidates = tqdm(desc=f"fold {fold} candidates", position=1, leave=False, dynamic_ncols=True,
                          disable=not distributed.is_main())
        if args.prefix_cache_gb > 0 and isinstance(batches, list):  # not when streamed (ImageNet-sized)
            on_fold = PrefixScorer(model, [batches[i] for i in fold_range], calibration, device,
                                   args.prefix_cache_gb * 2**30).accuracy
        else:
            def on_fold(c, on=fold_range):
                return accuracy(c, on)

        if args.uniform:
            result = uniform_search(model.num_searchable_layers, model.num_branches, on_fold, candidates)
        else:
            result = EvolutionSearch(
                model.num_searchable_layers, model.num_branches, on_fold,
                population_num=args.population_num, select_num=args.select_num,
                mutation_num=args.mutation_num, crossover_num=args.crossover_num, m_prob=args.m_prob,
                max_epochs=args.max_epochs, rng=random.Random(args.seed + fold), progress=candidates).run()
        candidates.close()
        full_acc = accuracy(result.best, full)
        done = {"fold": fold, "fold_acc": result.best_acc, "full_acc": full_acc,
                "arch": list(result.best), "num_candidates": result.num_evaluated, "settings": settings}
        write_json(done, fold_file)
        log.info(fold_line(done))
        searched.append(done)
        bar.update(1)
    bar.close()
    shares = distributed.gather_objects(searched)
    for rank, share in enumerate(shares[1:], start=1):  # rank 0 logged its own folds as they ended
        for done in share:
            log.info(f"{fold_line(done)} [rank {rank}]")
    by_fold = {done["fold"]: done for share in shares for done in share}
    folds = [by_fold[fold] for fold in folds_to_search]
    summary = {"folds": folds_to_search, "fold_accs": [f["fold_acc"] for f in folds],
               "full_accs": [f["full_acc"] for f in folds], "archs": [f["arch"] for f in folds]}
    result = {**summary, "num_candidates": [f["num_candidates"] for f in folds], **settings}
    if distributed.is_main():
        write_json(result, save / "search_result.json")
        print(format_block("total-result", summary))
    log.info(f"search result: {save / 'search_result.json'}; log: {save / 'log.txt'}")
    log.close()
    return result


def fold_line(done: dict) -> str:
    return (f"fold {done['fold']}: fold_acc {done['fold_acc']:.2f} full_acc {done['full_acc']:.2f} "
            f"arch {tuple(done['arch'])} ({done['num_candidates']} candidates)")


def fold_list(text: str) -> list[int]:
    try:
        folds = sorted({int(f) for f in text.split(",") if f.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of fold numbers") from None
    if not folds:
        raise argparse.ArgumentTypeError("give at least one fold")
    return folds


def _read_json(path: Path) -> dict | None:
    """A finished fold's record, or ``None`` when there is none (or only an unreadable one)."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


if __name__ == "__main__":
    fail_cleanly(search, parse_args())
