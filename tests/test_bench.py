"""The loader benchmark runs end to end: each loader alone per round, its workers stopped after it."""
import multiprocessing
import re

import pytest

from bench import data_loading


def test_loader_benchmark_reports_both_loaders_and_a_ratio(tmp_path, capsys):
    data_loading.generate(tmp_path, images=20, size=(60, 45))
    data_loading.main(["--data", str(tmp_path), "--workers", "1", "--batch_size", "2", "--batches", "2",
                       "--rounds", "2", "--size", "32"])
    out = capsys.readouterr().out
    rates = {name: float(v) for name, v in re.findall(r"^(ours|torchvision): ([\d.]+) images/s", out, re.M)}
    assert set(rates) == {"ours", "torchvision"} and all(v > 0 for v in rates.values())
    assert re.search(r"^ratio [\d.]+ \(ours / torchvision, median of 2 rounds; 1 workers", out, re.M)
    assert not multiprocessing.active_children()


def test_loader_benchmark_refuses_a_folder_too_small_for_a_round(tmp_path, capsys):
    data_loading.generate(tmp_path, images=4, size=(60, 45))
    with pytest.raises(SystemExit) as exc:
        data_loading.main(["--data", str(tmp_path), "--workers", "1", "--batch_size", "2", "--size", "32"])
    assert exc.value.code == 2 and "fewer than the 22 images" in capsys.readouterr().err
