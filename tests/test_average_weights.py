"""scripts/average_weights.py: the parameter-wise average of weights files of
one architecture, on the shipped weights."""

from __future__ import annotations

import pytest
import torch

from bridge.model.network import NuClickNet
from bridge.model.weights import default_weights_path, load_model, save_weights
from support.scripts import load_script


@pytest.fixture(scope="module")
def avg():
    return load_script("average_weights")


def test_average_is_the_mean_of_every_parameter_and_records_its_sources(avg, tmp_path):
    shipped, info = load_model(default_weights_path())
    moved, _ = load_model(default_weights_path())
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.25)
    first, other = tmp_path / "first.pt", tmp_path / "moved.pt"
    save_weights(first, shipped, {"name": info.name, "epoch": 9, "val": {"monuseg": {"aji": 0.7}}})
    save_weights(other, moved, {"name": info.name, "epoch": 3})
    out = tmp_path / "soup.pt"
    assert avg.main([str(out), str(first), str(other)]) == 0
    soup, soup_info = load_model(out)
    a, b, s = shipped.state_dict(), load_model(other)[0].state_dict(), soup.state_dict()
    for k in (k for k, v in a.items() if v.is_floating_point()):
        # files hold fp16: the mean of the stored values, up to one more fp16 rounding
        torch.testing.assert_close(s[k], (a[k] + b[k]) / 2, rtol=1e-3, atol=1e-3)
    name = next(k for k, _ in shipped.named_parameters())
    assert (s[name] - a[name]).abs().mean().item() == pytest.approx(0.125, abs=1e-3)
    assert soup_info.arch == info.arch and soup_info.patch_size == info.patch_size
    sources = soup_info.extra["averaged_from"]
    assert [r["version"] for r in sources] == [load_model(first)[1].version, load_model(other)[1].version]
    assert sources[0]["epoch"] == 9 and sources[1]["epoch"] == 3
    assert "epoch" not in soup_info.extra and "val" not in soup_info.extra, "one run's facts are not the average's"


def test_files_of_different_architectures_are_refused_in_one_line(avg, tmp_path, capsys):
    quarter = tmp_path / "quarter.pt"
    save_weights(quarter, NuClickNet(0.25), {})
    out = tmp_path / "soup.pt"
    assert avg.main([str(out), str(default_weights_path()), str(quarter)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different architectures" in err[0] and "nuclick-w0.25" in err[0]
    assert avg.main([str(out), str(default_weights_path())]) == 2
    assert "at least two" in capsys.readouterr().err
    assert not out.exists()


def test_the_card_traces_an_average_of_fine_tunes_to_where_each_member_started(avg, tmp_path):
    """ship_weights.py writes the card's Training line; for an average it
    follows each member's own history, as it does for one run."""
    from bridge.model.weights import source_record

    ship = load_script("ship_weights")
    shipped, info = load_model(default_weights_path())
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    save_weights(
        first, shipped, {"name": info.name, "epoch": 4, "init_from": source_record(default_weights_path(), info)}
    )
    save_weights(second, shipped, {"name": info.name, "epoch": 2, "init": "runs/older.pt"})  # before init_from
    out = tmp_path / "soup.pt"
    assert avg.main([str(out), str(first), str(second)]) == 0
    words = ship._training_words(load_model(out)[1].extra)
    assert words.startswith("the parameter-wise average of 2 weights files")
    assert "`first.pt`" in words and "best epoch 4" in words and "`second.pt`" in words and "best epoch 2" in words
    assert f"It started from `nuclick_default.pt` (version `{info.version}`, {info.arch})" in words
    assert "It started from `runs/older.pt`." in words
