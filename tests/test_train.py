"""Training, on real CoNSeP tiles: the paper's samples and loss, a network
that learns, checkpoints that resume, and bad data refused before any
compute is spent."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2hed

from bridge.evaluation.datasets import load_split
from bridge.model.network import NuClickNet
from bridge.model.weights import load_model
from bridge.nuclick.postprocess import MIN_OBJECT_PX
from bridge.train.augment import AUGMENT_POLICIES, colour
from bridge.train.data import NEIGHBOUR_WEIGHT, NucleusPatches, sample_index
from bridge.train.loop import TrainConfig, train
from bridge.train.loss import lovasz_hinge, nuclick_loss, training_loss

TILES = ("train_1_000", "train_1_001", "test_1_000")


@pytest.fixture(scope="module")
def tiny_set(data_root, tmp_path_factory):
    """Three real CoNSeP tiles: two to train on, one to validate on."""
    root = tmp_path_factory.mktemp("tiny")
    for sub in ("images", "labels"):
        (root / sub).mkdir()
        for stem in TILES:
            shutil.copy(data_root / "consep_tiles" / sub / f"{stem}.png", root / sub / f"{stem}.png")
    (root / "split.json").write_text(json.dumps({"train": list(TILES[:2]), "val": [TILES[2]]}))
    return root


@pytest.mark.parametrize("policy", ["standard", "strong"])
def test_samples_follow_the_paper(tiny_set, policy):
    items = load_split(tiny_set, "train")
    index = sample_index(items)
    # every nucleus of at least MIN_OBJECT_PX pixels is a target, those cut by the tile edge included
    expected = {
        (i, inst)
        for i, it in enumerate(items)
        for inst, n in enumerate(np.bincount(it.labels.ravel()))
        if inst and n >= MIN_OBJECT_PX
    }
    assert {(int(i), int(inst)) for i, inst, _, _ in index} == expected
    cut = [
        k
        for k, (i, inst, _, _) in enumerate(index)
        if np.isin(inst, np.concatenate([items[i].labels[[0, -1]].ravel(), items[i].labels[:, [0, -1]].ravel()]))
    ]
    assert cut, "these tiles have nuclei cut by the edge"
    ds = NucleusPatches(items, size=128, sigma=2.0, jitter=5.0, drop_neighbour=0.0, seed=0, policy=policy)
    for k in cut[:4]:  # an edge-cut target is its visible part, next to the zero padding
        x, y, _ = (t.numpy() for t in ds[k])
        padding = (x[:3] == 0).all(0)
        assert y[0].sum() >= MIN_OBJECT_PX * 0.8 and padding.any()
        assert ndi.binary_dilation(y[0] > 0, iterations=2)[padding].any()
    for k in range(0, len(ds), max(1, len(ds) // 12)):
        x, y, w = (t.numpy() for t in ds[k])
        assert x.shape == (5, 128, 128) and y.shape == w.shape == (1, 128, 128)
        target = y[0] > 0
        peak = np.unravel_index(np.argmax(x[3]), x[3].shape)
        assert target[peak], "the inclusion click lies inside the clicked nucleus"
        neighbours = w[0] == NEIGHBOUR_WEIGHT
        assert not (neighbours & target).any()
        assert set(np.unique(w[0])) <= {1.0, NEIGHBOUR_WEIGHT}
        if neighbours.any():  # exclusion clicks land on neighbours, never on the target
            # each click's peak is the pixel that holds it (>= exp(-1/16) at sigma 2)
            ex = (x[4] == ndi.maximum_filter(x[4], size=3)) & (x[4] > 0.9)
            assert ex.any() and not (ex & target).any() and (ex & neighbours).any()
    a, b = ds[3], ds[3]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True)), "samples are reproducible"
    ds.epoch = 1
    assert not torch.equal(ds[3][0], a[0]), "clicks and augmentation change every epoch"


def test_strong_augmentation_widens_scale_and_stain(monuseg_pair):
    rng = np.random.default_rng(0)
    standard, strong = AUGMENT_POLICIES["standard"], AUGMENT_POLICIES["strong"]
    s = np.array([standard.draw_scale(rng) for _ in range(2000)])
    w = np.array([strong.draw_scale(rng) for _ in range(2000)])
    assert 0.9 <= s.min() < 0.91 and 1.09 < s.max() <= 1.1, "the shipped weights' range"
    assert 0.8 <= w.min() < 0.82 and 1.23 < w.max() <= 1.25
    # the same draws move a real patch's stains further under the strong policy
    image = monuseg_pair[0][:128, :128]
    spread = {}
    for name, policy in AUGMENT_POLICIES.items():
        r = np.random.default_rng(1)
        hed = [rgb2hed(colour(image, r, policy) / 255.0)[..., 0].mean() for _ in range(60)]
        spread[name] = float(np.std(hed))
    assert spread["strong"] > 1.3 * spread["standard"] > 0


def test_loss_punishes_leaking_into_a_neighbour_ten_times_harder():
    target = torch.zeros(1, 1, 32, 32)
    target[..., 8:16, 8:16] = 1
    weights = torch.ones_like(target)
    weights[..., 16:24, 8:16] = NEIGHBOUR_WEIGHT  # the neighbour just below
    perfect = (target * 2 - 1) * 20
    assert nuclick_loss(perfect, target, weights).item() < 1e-3
    into_neighbour = perfect.clone()
    into_neighbour[..., 16:18, 8:16] = 20
    into_background = perfect.clone()
    into_background[..., 8:16, 16:18] = 20
    leak_n = nuclick_loss(into_neighbour, target, weights).item()
    leak_b = nuclick_loss(into_background, target, weights).item()
    assert leak_n > 2 * leak_b > 0


@pytest.fixture()
def targets(tiny_set) -> torch.Tensor:
    """Six real training targets (one nucleus per patch), unaugmented."""
    ds = NucleusPatches(load_split(tiny_set, "train"), augment=False, seed=0)
    return torch.stack([ds[k][1] for k in range(6)])


def test_lovasz_hinge_is_one_minus_iou_on_real_nuclei(targets):
    """With hinge errors of exactly 0 (right) or 1 (wrong) the Lovász hinge is
    1 - IoU of the drawn mask, here real targets against real nuclei drawn a
    pixel too big, a pixel too small and shifted."""
    for drawn in (
        [ndi.binary_dilation(t[0].numpy()) for t in targets],
        [ndi.binary_erosion(t[0].numpy()) for t in targets],
        [np.roll(t[0].numpy(), 3, axis=1) > 0 for t in targets],
    ):
        drawn = torch.from_numpy(np.stack(drawn))[:, None].float()
        sign = targets * 2 - 1
        logits = torch.where(drawn == targets, sign, torch.zeros_like(sign))
        inter = (drawn * targets).sum((1, 2, 3))
        union = ((drawn + targets) > 0).float().sum((1, 2, 3))
        expected = (1 - inter / union).mean()
        assert 0.05 < expected.item() < 0.9
        assert lovasz_hinge(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)
    confident = (targets * 2 - 1) * 3  # every pixel right with a margin: nothing to learn
    assert lovasz_hinge(confident, targets).item() == 0.0
    with pytest.raises(ValueError, match="unknown loss"):
        training_loss("dice", confident, targets, torch.ones_like(targets))


def test_descending_the_lovasz_hinge_corrects_real_outlines(targets):
    """Its gradient pushes every wrong pixel the right way: real nuclei drawn
    two pixels too big (IoU about 0.77) come out exact in a few steps."""
    drawn = np.stack([ndi.binary_dilation(t[0].numpy(), iterations=2) for t in targets])
    logits = torch.from_numpy(drawn)[:, None].float().mul(2).sub(1).requires_grad_(True)

    def iou() -> float:
        p = (logits > 0).float()
        return ((p * targets).sum((1, 2, 3)) / ((p + targets) > 0).float().sum((1, 2, 3))).mean().item()

    assert iou() < 0.85
    opt = torch.optim.Adam([logits], lr=0.5)
    for _ in range(6):
        loss = training_loss("nuclick+lovasz", logits, targets, torch.ones_like(targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert iou() == 1.0


def test_network_learns_real_nuclei(tiny_set):
    """Thirty steps on one real batch bring the paper's loss well down."""
    torch.manual_seed(0)
    ds = NucleusPatches(load_split(tiny_set, "train"), seed=0)
    x, y, w = (torch.stack(t) for t in zip(*(ds[k] for k in range(8)), strict=True))
    model = NuClickNet(0.125)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = nuclick_loss(model(x), y, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses


@pytest.mark.parametrize(("arch", "patch"), [("nuclick", 128), ("effunet-lite0", 96)])
def test_training_checkpoints_resumes_and_writes_loadable_weights(tiny_set, tmp_path, arch, patch):
    train_items = load_split(tiny_set, "train")
    val = {"tiny": load_split(tiny_set, "val")}
    out = tmp_path / "w.pt"
    cfg = TrainConfig(
        arch=arch,
        width=0.125,
        epochs=1,
        batch_size=4,
        samples_per_epoch=8,
        checkpoint_every=1,
        threads=2,
        patch_size=patch,
    )
    state = train(cfg, train_items, val, out, torch.device("cpu"), meta={"name": "tiny"})
    assert state["epoch"] == 1 and state["step"] == 2
    assert out.is_file() and out.with_suffix(".ckpt").is_file()
    first = torch.load(out.with_suffix(".ckpt"), weights_only=False)["model"]
    # a later run of the command asks for two epochs: it goes on from epoch 1, not from scratch
    cfg.epochs = 2
    state = train(cfg, train_items, val, out, torch.device("cpu"), meta={"name": "tiny"})
    assert state["epoch"] == 2 and state["step"] == 4
    records = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["val"]["tiny"]["nuclei"] == len(np.unique(val["tiny"][0].labels)) - 1
    second = torch.load(out.with_suffix(".ckpt"), weights_only=False)["model"]
    assert any(not torch.equal(first[k], second[k]) for k in first)
    _, info = load_model(out)
    assert info.name == "tiny" and info.arch == ("nuclick-w0.125" if arch == "nuclick" else arch)
    assert info.patch_size == patch, "inference cuts the patch size the network was trained on"
    # OUT holds the epoch with the best mean validation AJI, and says which it is
    best = max(records, key=lambda r: r["mean_aji"])
    assert info.extra["epoch"] == best["epoch"] and info.extra["val"] == best["val"]


def test_an_interrupted_epoch_resumes_at_its_last_checkpoint(tiny_set, tmp_path, monkeypatch):
    """A training process that dies mid-epoch loses at most the steps since the last
    checkpoint: the next run continues that epoch, it does not restart it."""
    import bridge.train.loop as loop

    train_items = load_split(tiny_set, "train")
    out = tmp_path / "w.pt"
    cfg = TrainConfig(arch="nuclick", width=0.125, epochs=1, batch_size=2, samples_per_epoch=10, checkpoint_every=2)
    calls = {"n": 0}
    real_loss = loop.training_loss

    def dying_loss(*a):
        calls["n"] += 1
        if calls["n"] == 4:  # the process ends during step 4 (steps 1-3 done, checkpoint at 2)
            raise KeyboardInterrupt
        return real_loss(*a)

    monkeypatch.setattr(loop, "training_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, train_items, {}, out, torch.device("cpu"))
    saved = torch.load(out.with_suffix(".ckpt"), weights_only=False)["state"]
    assert (saved["epoch"], saved["step_in_epoch"], saved["step"]) == (0, 2, 2)
    monkeypatch.setattr(loop, "training_loss", real_loss)
    state = train(cfg, train_items, {}, out, torch.device("cpu"))
    assert (state["epoch"], state["step"]) == (1, 5), "steps 3-5 of the epoch, then done"
    assert len(out.with_suffix(".log.jsonl").read_text().splitlines()) == 1


def test_one_empty_tile_among_labelled_ones_is_fine(tiny_set, tmp_path):
    """Background-only tiles are real (CoNSeP has them): they are named, not refused."""
    from bridge.evaluation.datasets import check_trainable

    root = tmp_path / "data"
    shutil.copytree(tiny_set, root)
    Image.fromarray(np.zeros((256, 256), np.uint16)).save(root / "labels" / f"{TILES[0]}.png")
    assert check_trainable(root, load_split(root, "train")) == [TILES[0]]


@pytest.mark.parametrize("fault", ["extra_label", "missing_label", "empty", "uint8"])
def test_bad_training_data_stops_before_any_compute(tiny_set, tmp_path, cli, fault):
    root = tmp_path / "data"
    shutil.copytree(tiny_set, root)
    stem = TILES[0]
    if fault == "extra_label":
        shutil.copy(root / "labels" / f"{stem}.png", root / "labels" / "stray.png")
        needle = "stray"
    elif fault == "missing_label":
        (root / "labels" / f"{stem}.png").unlink()
        needle = stem
    elif fault == "empty":
        for p in (root / "labels").glob("*.png"):
            Image.fromarray(np.zeros((256, 256), np.uint16)).save(p)
        needle = "has any nuclei"
    else:
        lab = np.asarray(Image.open(root / "labels" / f"{stem}.png"))
        Image.fromarray((lab % 255).astype(np.uint8)).save(root / "labels" / f"{stem}.png")
        needle = "uint16"
    proc = cli("train", "--data", root, "--out", tmp_path / "w.pt", "--epochs", "1")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and needle in err[0], err
    assert not list(tmp_path.glob("w.*")), "nothing was trained or written"


@pytest.mark.parametrize(
    ("flag", "value", "rule"),
    [
        ("--epochs", "0", "at least 1, not 0"),
        ("--batch-size", "0", "at least 1, not 0"),
        ("--lr", "-1", "above 0, not -1.0"),
        ("--sigma", "0", "above 0, not 0.0"),
        ("--ema-decay", "1.5", "from 0 (no average) up to, not including, 1, not 1.5"),
        ("--drop-neighbours", "2", "a probability from 0 to 1, not 2.0"),
        ("--samples-per-epoch", "-5", "0 (every nucleus once) or more, not -5"),
        ("--val-limit", "-1", "0 (every val image) or more, not -1"),
    ],
)
def test_out_of_range_training_numbers_stop_before_any_data_is_read(tmp_path, cli, flag, value, rule):
    """Each of these once trained garbage quietly (a decay of 1.5, a sigma of 0
    giving a NaN loss), crashed at the first step, or wrote nothing with exit 0.
    The data folder does not exist, so the number's error coming first shows
    that nothing was read."""
    proc = cli("train", "--data", tmp_path / "no-such-dataset", "--out", tmp_path / "w.pt", flag, value)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, err
    assert err[0].endswith(f"{flag} must be {rule}")
    assert not list(tmp_path.glob("w.*"))


@pytest.mark.parametrize(("field", "value"), [("val_jitter", -1.0), ("checkpoint_every", 0)])
def test_settings_train_has_no_flag_for_are_named_as_the_python_api_spells_them(field, value):
    """A message naming a flag `train` does not have would send the reader looking for it."""
    from bridge.errors import BridgeInputError

    with pytest.raises(BridgeInputError, match=rf"^TrainConfig\.{field} must be .*, not {value}$"):
        TrainConfig(**{field: value})


def test_init_weights_of_another_architecture_are_refused_before_training(tiny_set, tmp_path):
    from bridge.errors import BridgeInputError
    from bridge.model.weights import save_weights

    init = tmp_path / "quarter.pt"
    save_weights(init, NuClickNet(0.25), {})
    cfg = TrainConfig(arch="nuclick", width=0.125, epochs=1, batch_size=4, samples_per_epoch=8)
    out = tmp_path / "w.pt"
    with pytest.raises(BridgeInputError, match=r"quarter\.pt are nuclick-w0\.25, not nuclick-w0\.125"):
        train(cfg, load_split(tiny_set, "train"), {}, out, torch.device("cpu"), init=init)
    cfg = TrainConfig(arch="effunet-lite0", epochs=1, batch_size=4, samples_per_epoch=8)
    with pytest.raises(BridgeInputError, match=r"are nuclick-w0\.25, not effunet-lite0"):
        train(cfg, load_split(tiny_set, "train"), {}, out, torch.device("cpu"), init=init)
    assert not out.exists() and not out.with_suffix(".ckpt").exists()


def _shipped_lite0(tmp_path):
    """A Lite0 weights file with trained weights: the shipped file, or the
    whole-patch part of it when the shipped network is a joined one."""
    from bridge.model.weights import default_weights_path, save_weights

    model, info = load_model(default_weights_path())
    if info.arch != "effunet-lite0":
        assert info.arch in ("effunet-lite0-2scale", "effunet-lite0-3scale")
        model = model.wide
    path = tmp_path / "lite0.pt"
    save_weights(path, model, {"name": "lite0", "patch_size": 128})
    return path


def _click_patch(tiny_set, size: int) -> torch.Tensor:
    x = load_split(tiny_set, "val")[0].image[:size, :size]
    batch = torch.zeros(1, 5, size, size)
    batch[0, :3] = torch.from_numpy(x.transpose(2, 0, 1) / 255.0)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    batch[0, 3] = torch.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / 8)
    return batch


def test_edge_network_grows_from_trained_lite0_weights_with_their_outputs(tiny_set, tmp_path):
    """`train --arch effunet-lite0-edge --init LITE0.pt` starts from exactly the
    Lite0 network's outputs; other files, and the reverse direction, are refused."""
    from bridge.errors import BridgeInputError
    from bridge.model.architectures import build, parse_arch
    from bridge.model.weights import save_weights
    from bridge.train.loop import start_from

    init = _shipped_lite0(tmp_path)
    lite0, _ = load_model(init)
    spec = parse_arch("effunet-lite0-edge")
    grown = build(spec)
    start_from(grown, spec, init)
    grown.eval()
    batch = _click_patch(tiny_set, 128)
    with torch.no_grad():
        assert torch.equal(grown(batch), lite0(batch))
        assert any(p.abs().sum() > 0 for p in grown.refine.parameters()), "the new block is not all zero"
    save_weights(tmp_path / "edge.pt", grown, {})
    with pytest.raises(BridgeInputError, match=r"edge\.pt are effunet-lite0-edge, not effunet-lite0"):
        start_from(build(parse_arch("effunet-lite0")), parse_arch("effunet-lite0"), tmp_path / "edge.pt")
    save_weights(tmp_path / "quarter.pt", NuClickNet(0.25), {})
    with pytest.raises(BridgeInputError, match=r"quarter\.pt are nuclick-w0\.25, not effunet-lite0-edge"):
        start_from(build(spec), spec, tmp_path / "quarter.pt")


def test_magnified_network_grows_from_trained_lite0_weights_as_lite0_on_a_larger_view(tiny_set, tmp_path):
    """`train --arch effunet-lite0-x2 --init LITE0.pt` takes every Lite0 weight;
    the network is then Lite0 run on the patch magnified twice (bilinear), its
    logits averaged back to the patch's own pixels."""
    import torch.nn.functional as F

    from bridge.model.architectures import build, parse_arch
    from bridge.train.loop import start_from

    init = _shipped_lite0(tmp_path)
    lite0, _ = load_model(init)
    spec = parse_arch("effunet-lite0-x2")
    grown = build(spec)
    start_from(grown, spec, init)
    grown.eval()
    batch = _click_patch(tiny_set, 64)
    with torch.no_grad():
        out = grown(batch)
        view = F.interpolate(batch, size=(128, 128), mode="bilinear", align_corners=False)
        ref = F.avg_pool2d(lite0(view), 2)
    assert out.shape == (1, 1, 64, 64)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out > 0).sum() > 20, "a nucleus is found under the click"


def test_fine_tuning_from_a_joined_file_starts_from_its_part_of_that_architecture(tmp_path):
    """`--init` with a two-scale file (what the package may ship): Lite0 and the
    edge network start from its whole-patch part, Lite0-x2 and Lite0-x4 from
    its magnified part; a network it has no part for is refused in one line."""
    from bridge.errors import BridgeInputError
    from bridge.model.architectures import build, parse_arch
    from bridge.model.weights import save_weights
    from bridge.train.loop import start_from

    lite0, _ = load_model(_shipped_lite0(tmp_path))
    joined = build(parse_arch("effunet-lite0-2scale"))
    joined.wide.load_state_dict(lite0.state_dict())
    joined.near.load_state_dict(lite0.state_dict())
    with torch.no_grad():
        joined.near.head.bias.add_(1.0)  # tell the parts apart
    save_weights(tmp_path / "joined.pt", joined, {"name": "j", "patch_size": 128})
    stored = load_model(tmp_path / "joined.pt")[0]
    for name, part in (("effunet-lite0", stored.wide), ("effunet-lite0-x2", stored.near)):
        net = build(parse_arch(name))
        start_from(net, parse_arch(name), tmp_path / "joined.pt")
        for k, v in part.state_dict().items():
            assert torch.equal(net.state_dict()[k], v), (name, k)
    edge = build(parse_arch("effunet-lite0-edge"))
    start_from(edge, parse_arch("effunet-lite0-edge"), tmp_path / "joined.pt")
    assert torch.equal(edge.head.bias, stored.wide.head.bias)
    closer = build(parse_arch("effunet-lite0-x4"))  # a third view grows from the magnified part
    start_from(closer, parse_arch("effunet-lite0-x4"), tmp_path / "joined.pt")
    assert torch.equal(closer.head.bias, stored.near.head.bias)
    with pytest.raises(BridgeInputError, match=r"joined\.pt are effunet-lite0-2scale, with no nuclick-w0\.25 part"):
        start_from(NuClickNet(0.25), parse_arch("nuclick", 0.25), tmp_path / "joined.pt")
    # the joined network itself (fine-tuned as a whole) takes the whole file, both parts
    whole = build(parse_arch("effunet-lite0-2scale"))
    start_from(whole, parse_arch("effunet-lite0-2scale"), tmp_path / "joined.pt")
    for k, v in stored.state_dict().items():
        assert torch.equal(whole.state_dict()[k], v), k
    assert not torch.equal(whole.near.head.bias, whole.wide.head.bias)


def test_weight_average_follows_training_from_the_first_steps():
    """The moving average starts short: after 100 updates towards a weight that
    moved from 0 to 1, the average is past 0.9 (a fixed 0.999 would be at 0.1),
    and far into training it is the requested decay."""
    from functools import partial

    from torch.optim.swa_utils import AveragedModel

    from bridge.train.loop import ema_decay_at, ema_update

    net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.BatchNorm1d(4))
    torch.nn.init.zeros_(net[0].weight)
    ema = AveragedModel(net, multi_avg_fn=partial(ema_update, decay=0.999), use_buffers=True)
    ema.update_parameters(net)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    for _ in range(100):
        net(torch.rand(8, 3))  # BatchNorm's statistics and its integer step counter move too
        ema.update_parameters(net)
    assert 0.9 < float(ema.module[0].weight.detach().mean()) < 1.0
    assert int(ema.module[1].num_batches_tracked) == int(net[1].num_batches_tracked) == 100
    assert ema_decay_at(100_000, 0.999) == 0.999 and ema_decay_at(0, 0.999) == pytest.approx(0.1)


def test_learning_rate_defaults_follow_the_architecture():
    """One place decides the default for the CLI and the API alike."""
    assert TrainConfig(arch="nuclick").lr == 3e-3  # as published
    assert TrainConfig(arch="effunet-lite0").lr == 1e-3  # a pretrained encoder wants a gentler start
    assert TrainConfig(arch="nuclick", lr=5e-4).lr == 5e-4


def test_the_joined_network_fine_tunes_as_a_whole_and_every_part_learns(tiny_set, tmp_path):
    """`train --arch effunet-lite0-3scale --init JOINED.pt` (the shipped file):
    one loss on the averaged logits moves all three views, and the file written
    is still the joined network, loadable as such."""
    from bridge.model.weights import default_weights_path

    init = default_weights_path()
    before, init_info = load_model(init)
    assert init_info.arch == "effunet-lite0-3scale"
    cfg = TrainConfig(
        arch="effunet-lite0-3scale", epochs=1, batch_size=4, samples_per_epoch=8, lr=1e-3, warmup_steps=1, ema_decay=0
    )
    out = tmp_path / "joint.pt"
    train(cfg, load_split(tiny_set, "train"), {}, out, torch.device("cpu"), init=init)
    after, info = load_model(out)
    assert info.arch == "effunet-lite0-3scale" and info.patch_size == 128
    # the new file traces back through the file it started from (and what that one started from) to the
    # parts that were joined
    start = info.extra["init_from"]
    assert start["version"] == init_info.version and start["arch"] == "effunet-lite0-3scale"
    while "joined_from" not in start:
        start = start["init_from"]
    # the shipped file's first two views came from a two-view file, the third from an x4 file
    assert [(p["part"], p["arch"]) for p in start["joined_from"]] == [
        ("wide", "effunet-lite0-2scale"),
        ("near", "effunet-lite0-2scale"),
        ("closer", "effunet-lite0-x4"),
    ]
    for part in ("wide", "near", "closer"):
        old, new = getattr(before, part).state_dict(), getattr(after, part).state_dict()
        moved = [k for k in old if old[k].is_floating_point() and not torch.equal(old[k], new[k].to(old[k].dtype))]
        assert len(moved) > len(old) // 2, f"the {part} part hardly moved: {len(moved)} of {len(old)} tensors"


def test_train_choices_are_the_registries_and_unknown_names_stop_before_any_data_is_read():
    """The CLI lists --loss and --augment without importing torch; its lists
    must be the names training knows, and a config naming anything else is
    refused at once rather than after the data are loaded."""
    from bridge.cli import build_parser
    from bridge.errors import BridgeInputError
    from bridge.train.augment import AUGMENT_POLICIES
    from bridge.train.loss import LOSSES

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: a.choices for a in train_parser._actions if a.choices}
    assert tuple(choices["loss"]) == LOSSES
    assert tuple(choices["augment"]) == tuple(AUGMENT_POLICIES)
    with pytest.raises(BridgeInputError, match=r"unknown loss 'dice'; choose one of nuclick, nuclick\+lovasz"):
        TrainConfig(loss="dice")
    with pytest.raises(BridgeInputError, match=r"unknown augmentation 'heavy'; choose one of standard, strong"):
        TrainConfig(augment="heavy")
