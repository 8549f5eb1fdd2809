"""The loader benchmark runs end to end: each loader alone per round, its workers stopped after it."""
import multiprocessing
import re

import pytest

from bench import data_loading, deploy_speed


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


def test_deployment_benchmark_reports_every_model_and_its_speed_against_torchvision(capsys):
    deploy_speed.main(["--only", "demo", "--batches", "1,2", "--images", "2", "--rounds", "1",
                       "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    table = out[out.index("| model |"):].splitlines()
    assert table[0] == "| model | 32 px, width 0.5, batch 1 | 32 px, width 0.5, batch 2 |"
    rows = {line.split(" | ")[0][2:]: re.findall(r"([\d.]+) \(([\d.]+)\)", line) for line in table[2:]}
    assert len(rows) == 9 and all(len(cells) == 2 for cells in rows.values())
    assert all(float(rate) > 0 and float(speed) > 0 for cells in rows.values() for rate, speed in cells)
    assert [speed for _, speed in rows["torchvision float, PyTorch"]] == ["1.00", "1.00"]
    assert "ours opset 25 (INT2), onnxruntime" in rows
    assert "ours opset 25 --fold, onnxruntime, weights at load" in rows
