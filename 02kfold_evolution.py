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
import random
from pathlib import Path

import torch
from tqdm import tqdm

from utils import distributed
from utils.cli import add_eval_args, comma_list, non_negative_int, positive_int, probability, stage_parser
from utils.data import batch_stream
from utils.evaluation import Evaluation, evaluation_setup, gather_by_fold
from utils.evolution import EvolutionSearch, uniform_search
from utils.folds import fold_batches
from utils.logs import RunLog
from utils.prefix_scorer import PrefixScorer
from utils.results import (
    BLOCK_ROWS,
    fold_record,
    format_block,
    read_fold_record,
    search_result_file,
    write_json,
)
from utils.runtime import fail_cleanly, seed_everything


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Under torchrun a process that has searched its folds waits for the slowest one: up to a
    # fold's search (an hour or more on ImageNet), hence the long --dist_timeout.
    parser = stage_parser(__doc__, save="eval-kfold-evolution", dist_timeout=24 * 60)
    add_eval_args(parser)
    parser.add_argument("--folds", type=fold_list, default=None,
                        help="search only these folds, e.g. 0,1 (default: all k)")
    parser.add_argument("--max-epochs", type=positive_int, default=20)
    parser.add_argument("--select-num", type=positive_int, default=10)
    parser.add_argument("--population-num", type=positive_int, default=45)
    parser.add_argument("--m_prob", type=probability, default=0.1)
    parser.add_argument("--crossover-num", type=non_negative_int, default=15)
    parser.add_argument("--mutation-num", type=non_negative_int, default=15)
    parser.add_argument("--recalibration_batch_size", type=positive_int, default=128)
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
    setup = evaluation_setup(args)
    model = setup.model.eval()
    model.change_precision(True, True)
    folds_to_search = args.folds if args.folds is not None else list(range(args.k))
    setup.check_folds(folds_to_search, args.k)
    calibration = []
    if args.bn_recalibration_batches > 0:
        stream = batch_stream(setup.data.train, args.recalibration_batch_size, args.workers, args.seed)
        calibration = [next(stream)[2] for _ in range(args.bn_recalibration_batches)]
    save = Path(args.save)
    log = RunLog(save, enabled=distributed.is_main(), tensorboard=False)
    log.info(f"stage 2: {args.supernet} ({setup.config['arch']}, {setup.config['bits']}-bit, "
             f"{model.num_branches} branches), {setup.num_batches} validation batches in {args.k} folds"
             + (f", spread over {distributed.world_size()} processes" if distributed.is_distributed()
                else ""))
    stat = Path(args.supernet).stat()  # a retrained supernet invalidates the finished folds
    settings = {"config": setup.config, "supernet": str(args.supernet), "k": args.k,
                "supernet_size_mtime": [stat.st_size, stat.st_mtime_ns],
                "num_batches": setup.num_batches, "seed": args.seed,
                "bn_recalibration_batches": args.bn_recalibration_batches, "uniform": args.uniform,
                **{k: getattr(args, k) for k in ("max_epochs", "select_num", "population_num", "m_prob",
                                                 "crossover_num", "mutation_num", "val_batch_size",
                                                 "replicas")}}
    mine = distributed.share(folds_to_search)
    searched = []
    for fold in tqdm(mine, desc="folds", position=0, dynamic_ncols=True, disable=not distributed.is_main()):
        fold_file = save / "folds" / f"fold{fold}.json"
        done = read_fold_record(fold_file, settings)
        if done is not None:
            log.info(f"fold {fold}: finished earlier, kept ({fold_file})")
        else:
            done = search_fold(args, setup, fold, calibration, settings)
            write_json(done, fold_file)
            log.info(fold_line(done))
        searched.append(done)
    by_fold = gather_by_fold(searched, log, fold_line)
    result = search_result_file([by_fold[fold] for fold in folds_to_search], settings)
    if distributed.is_main():
        write_json(result, save / "search_result.json")
        print(format_block("total-result", {k: result[k] for k in BLOCK_ROWS}))
    log.info(f"search result: {save / 'search_result.json'}; log: {save / 'log.txt'}")
    log.close()
    return result


def search_fold(args: argparse.Namespace, setup: Evaluation, fold: int, calibration: list,
                settings: dict) -> dict:
    """The evolutionary (or ``--uniform``) search on one fold; its winner's full accuracy."""
    fold_range, full = fold_batches(setup.num_batches, args.k, fold)
    model = setup.model
    candidates = tqdm(desc=f"fold {fold} candidates", position=1, leave=False, dynamic_ncols=True,
                      disable=not distributed.is_main())
    kept = setup.val.kept(fold_range, setup.device)  # decoded once for all of the fold's candidates
    if kept is not None and args.prefix_cache_gb > 0:
        on_fold = PrefixScorer(model, kept, calibration, setup.device, args.prefix_cache_gb * 2**30,
                               setup.replicas).accuracy
    else:
        def on_fold(candidate):
            return setup.accuracy(candidate, kept if kept is not None else setup.val.stream(fold_range),
                                  calibration)

    if args.uniform:
        result = uniform_search(model.num_searchable_layers, model.num_branches, on_fold, candidates)
    else:
        result = EvolutionSearch(
            model.num_searchable_layers, model.num_branches, on_fold,
            population_num=args.population_num, select_num=args.select_num,
            mutation_num=args.mutation_num, crossover_num=args.crossover_num, m_prob=args.m_prob,
            max_epochs=args.max_epochs, rng=random.Random(args.seed + fold), progress=candidates).run()
    candidates.close()
    full_acc = setup.accuracy(result.best, setup.val.stream(full), calibration)  # the rest, read once
    return fold_record(fold, result.best_acc, full_acc,
                       list(result.best), result.num_evaluated, settings)


def fold_line(done: dict) -> str:
    return (f"fold {done['fold']}: fold_acc {done['fold_acc']:.2f} full_acc {done['full_acc']:.2f} "
            f"arch {tuple(done['arch'])} ({done['num_candidates']} candidates)")


def fold_list(text: str) -> list[int]:
    return sorted(set(comma_list(text, int, "fold numbers")))


if __name__ == "__main__":
    fail_cleanly(search, parse_args())
