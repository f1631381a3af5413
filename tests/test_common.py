"""Behaviour of the shared plumbing: the shapes data, the loaders and their errors, run records, checkpoints and
the Frechet distance."""
import argparse
import colorsys
import copy
import importlib
import json
import math
import re
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common


def make_args(**overrides):
    p = common.add_shared_flags(argparse.ArgumentParser())
    p.add_argument("--channels", type=int, default=8)
    args = p.parse_args([])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- shapes

def test_shapes_splits_deterministic_and_disjoint(tmp_path, monkeypatch):
    train = common.shapes_split("train", 400, 16)
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)
    again = common.shapes_split("train", 400, 16)                     # generated again, in a fresh cache
    factors = train[3].numpy()
    redrawn, _ = common.render_shapes(factors, 16)                    # from scratch
    assert torch.equal(train[0], again[0]) and torch.equal(train[0], redrawn)
    val, test = common.shapes_split("val", 400, 16), common.shapes_split("test", 400, 16)
    seen = {img.numpy().tobytes() for img in train[0]}
    assert not any(img.numpy().tobytes() in seen for img in torch.cat([val[0], test[0]]))
    assert not torch.equal(val[3][:10], test[3][:10])
    # a split's content does not depend on its size
    assert torch.equal(common.shapes_split("val", 100, 16)[0], val[0][:100])


def test_shapes_loader_ranges_and_fields():
    args = make_args(image_size=16, batch_size=50)
    data = common.load_data(args, fields=("image", "label", "mask", "factors"), sizes=(500, 100, 100))
    x, y, mask, factors = next(iter(data.train))
    assert x.shape == (50, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    assert mask.shape == (50, 16, 16) and mask.dtype == torch.bool
    assert factors.shape == (50, len(common.FACTOR_NAMES)) and torch.equal(factors[:, 0].long(), y)
    assert data.num_classes == 10 and data.classes[0] == "circle" and data.channels == 3
    assert set(data.train.dataset.labels.tolist()) == set(range(10))
    assert len(data.val.dataset) == 100 and len(data.test.dataset) == 100


def test_shuffled_loader_order_follows_seed():
    first = lambda seed, workers=0: next(iter(common.load_data(
        make_args(image_size=16, batch_size=20, seed=seed, num_workers=workers), sizes=(200, 20, 20)).train))[1]
    assert torch.equal(first(0), first(0)) and not torch.equal(first(0), first(1))
    assert torch.equal(first(0), first(0, workers=2))


def test_hsv_matches_colorsys():
    h = torch.rand(50, generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([colorsys.hsv_to_rgb(float(x), 0.85, 0.95) for x in h])
    assert torch.allclose(common._hsv_to_rgb(h, 0.85, 0.95), expected, atol=1e-6)


# area / (scale * size)^2 of each shape, from its geometry; a flipped inside/outside sign breaks these
SHAPE_AREAS = {"circle": math.pi * 0.81, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4,
               "hexagon": 3 * math.sqrt(3) / 2, "diamond": 1.1, "ring": math.pi * (0.94 ** 2 - 0.5 ** 2),
               "cross": 0.95 ** 2 * (4 * 0.6 - 0.36), "star": 5 * 0.45 * math.sin(math.radians(36))}


@pytest.mark.parametrize("size", [32, 64])
def test_shape_areas_and_inside_out(size):
    rng = np.random.default_rng(1)
    factors = common.sample_factors(400, rng)
    images, masks = common.render_shapes(factors, size)
    assert not masks[:, 0, 0].any() and not masks[:, -1, -1].any()          # corners are always background
    for name, area in SHAPE_AREAS.items():
        pick = factors[:, 0] == common.SHAPE_CLASSES.index(name)
        relative = masks[pick].sum((1, 2)).float() / torch.tensor(factors[pick, 3] * size) ** 2
        assert relative.mean().item() == pytest.approx(area, rel=0.05), name


def test_masks_match_image_colours():
    images, labels, masks, factors = common.shapes_split("train", 200, 32)
    fg = common._hsv_to_rgb(factors[:, 1], *common.FG_SAT_VAL) * 255
    bg = common._hsv_to_rgb(factors[:, 2], *common.BG_SAT_VAL) * 255
    for img, m, f, b in zip(images.float(), masks, fg, bg):
        inside, outside = img[:, m], img[:, ~m]
        assert (inside.median(1).values - f).abs().max() <= 1
        assert (outside.median(1).values - b).abs().max() <= 1


def test_factors_recoverable_from_masks():
    size = 32
    images, labels, masks, factors = common.shapes_split("train", 600, size)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    symmetric = [common.SHAPE_CLASSES.index(c) for c in ("circle", "square", "hexagon", "ring", "cross", "star")]
    for m, f in zip(masks.float(), factors):
        if int(f[0]) in symmetric:       # centroid = centre for shapes symmetric about it
            cx, cy = (m * xs).sum() / m.sum(), (m * ys).sum() / m.sum()
            assert abs(cx - f[4] * size) < 0.6 and abs(cy - f[5] * size) < 0.6
        if int(f[0]) == 0:               # circle of radius 0.9 * scale
            assert m.sum().item() == pytest.approx(math.pi * (0.9 * f[3].item() * size) ** 2, rel=0.08)


def test_rotation_is_counter_clockwise():
    base = np.array([[common.SHAPE_CLASSES.index("heart"), 0.3, 0.7, 0.3, 0.5, 0.5, 0.0]], dtype=np.float32)
    turned = base.copy()
    turned[0, 6] = math.pi / 2
    (_, m0), (_, m90) = common.render_shapes(base, 32), common.render_shapes(turned, 32)
    assert (m90[0] != torch.rot90(m0[0], 1, (0, 1))).sum() <= 4          # up to anti-aliasing ties
    assert (m90[0] != torch.rot90(m0[0], -1, (0, 1))).sum() > 20


def test_fields_missing_on_real_datasets_fail_clearly(tmp_path):
    folder = make_folder(tmp_path / "imgs", classes=2, per_class=20)
    with pytest.raises(SystemExit, match="no mask"):
        common.load_datasets("folder", folder, 8, fields=("image", "label", "mask"))


# ----------------------------------------------------------------------------- folder, list, torchvision

def make_folder(root, classes=3, per_class=20, size=12):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size, size, 3), 40 * c, dtype=np.uint8) + rng.integers(0, 10, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_folder_layout_carves_validation_and_test(tmp_path):
    root = make_folder(tmp_path / "data", classes=3, per_class=40)
    (train, val, test), classes = common.load_datasets("folder", root, 16)
    assert classes == ["class0", "class1", "class2"]
    assert (len(train), len(val), len(test)) == (96, 12, 12)
    files = [set(map(str, d.files)) for d in (train, val, test)]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    x, y = train[list(range(len(train)))]
    assert x.shape[1:] == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    for c in range(3):          # the class-c images are grey level 40 c (+ noise) everywhere
        mean = ((x[y == c] + 1) * 127.5).mean().item()
        assert abs(mean - (40 * c + 4.5)) < 2


def test_folder_layout_with_train_and_test_subfolders(tmp_path):
    make_folder(tmp_path / "data" / "train", classes=2, per_class=30)
    make_folder(tmp_path / "data" / "test", classes=2, per_class=5)
    (train, val, test), _ = common.load_datasets("folder", tmp_path / "data", 8)
    assert (len(train), len(val), len(test)) == (54, 6, 10)
    assert all("test" in f.parts for f in test.files)


def test_list_layout(tmp_path):
    root = make_folder(tmp_path / "mini", classes=2, per_class=10)
    lines = lambda ids: "".join(f"class{c}/{i}.png n0{c}\n" for c in range(2) for i in ids)
    (root / "train.txt").write_text(lines(range(6)))
    (root / "validation.txt").write_text(lines([6, 7]))
    (root / "test.txt").write_text(lines([8, 9]))
    (train, val, test), classes = common.load_datasets("list", root, 8)
    assert classes == ["n00", "n01"] and (len(train), len(val), len(test)) == (12, 4, 4)
    assert train.labels.tolist() == [0] * 6 + [1] * 6


@pytest.mark.parametrize("content, message", [
    ("class0/0.png\n", r"train.txt:1: expected 'path label'"),
    ("class0/0.png 0\nclass0/missing.png 1\n", r"train.txt:2: image .*missing.png does not exist"),
])
def test_list_layout_bad_lines_named(tmp_path, content, message):
    root = make_folder(tmp_path / "mini", classes=1, per_class=1)
    (root / "train.txt").write_text(content)
    with pytest.raises(SystemExit, match=message):
        common.load_datasets("list", root, 8)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no class subfolders"):
        common.load_datasets("folder", tmp_path / "empty", 8)
    (tmp_path / "noimages" / "cat").mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds no images"):
        common.load_datasets("folder", tmp_path / "noimages", 8)
    with pytest.raises(SystemExit, match="is not a directory"):
        common.load_datasets("folder", tmp_path / "nowhere", 8)
    with pytest.raises(SystemExit, match="no train.txt"):
        common.load_datasets("list", tmp_path / "empty", 8)
    root = make_folder(tmp_path / "broken", classes=1, per_class=12)
    (root / "class0" / "1.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"cannot read image .*1.png"):
        common.load_datasets("folder", root, 8)
    with pytest.raises(SystemExit, match="9 training examples are too few"):
        common.load_datasets("folder", make_folder(tmp_path / "tiny", classes=1, per_class=9), 8)


def test_non_square_images_are_centre_cropped(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255                                          # the white centre square survives the crop
    for i in range(10):
        Image.fromarray(pixels).save(tmp_path / "d" / "a" / f"{i}.png")
    (train, _, _), _ = common.load_datasets("folder", tmp_path / "d", 10)
    assert (train.images == 255).all()


def test_unknown_dataset_lists_choices():
    with pytest.raises(SystemExit, match="unknown dataset 'cifar11'; choose one of: shapes, cifar10"):
        common.load_datasets("cifar11")


def test_missing_download_says_what_to_do(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit) as e:
        common.load_datasets("cifar10", tmp_path, 32)
    message = str(e.value)
    assert str(tmp_path / "cifar10") in message and "--data-dir" in message and "--dataset shapes" in message
    assert "\n" not in message


def test_torchvision_path_carves_validation(tmp_path, monkeypatch):
    class FakeCIFAR:             # stands in for the download: the same attributes torchvision's CIFAR10 has
        def __init__(self, root, train, download):
            n = 200 if train else 50
            self.data = np.random.default_rng(int(train)).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets, self.classes = [i % 10 for i in range(n)], [f"c{i}" for i in range(10)]
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    (train, val, test), classes = common.load_datasets("cifar10", tmp_path, 16)
    assert (len(train), len(val), len(test)) == (180, 20, 50) and classes[3] == "c3"
    assert train.images.shape[1:] == (3, 16, 16)


def test_color_mnist_paints_digits():
    digits = torch.zeros(4, 28, 28, dtype=torch.uint8)
    digits[:, 10:18, 12:16] = 255
    images, _ = common._color_mnist(digits, torch.arange(4), seed=0)
    assert images.shape == (4, 3, 28, 28)
    fg, bg = images[:, :, 12, 13].float(), images[:, :, 0, 0].float()
    assert (fg.max(1).values > 200).all() and (bg.max(1).values < 60).all()
    assert len({tuple(c.tolist()) for c in fg}) == 4                     # each digit its own colour


# ----------------------------------------------------------------------------- runs and checkpoints

def test_run_checkpoint_round_trip_and_resume(tmp_path):
    args = make_args(out=str(tmp_path), name="a")
    run = common.Run("toy", args)
    model = torch.nn.Linear(3, 2)
    for step in range(1, 8):
        run.log(step, "train", loss=1.0 / step)
    run.save_checkpoint(5, model=model.state_dict())
    assert sorted(p.name for p in run.dir.iterdir()) == ["args.json", "ckpt.pt", "metrics.jsonl"]
    assert json.loads((run.dir / "args.json").read_text())["channels"] == 8

    with pytest.raises(SystemExit, match="already holds a run: add --resume"):
        common.Run("toy", make_args(out=str(tmp_path), name="a"))
    resumed = common.Run("toy", make_args(out=str(tmp_path), resume=True))       # latest run
    state = resumed.load_checkpoint(["channels"], "cpu")
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(state["model"])
    x = torch.randn(4, 3)
    assert state["step"] == 5 and torch.equal(fresh(x), model(x))
    assert [r["step"] for r in resumed.metrics()] == [1, 2, 3, 4, 5]          # steps 6, 7 will be logged again

    wrong = common.Run("toy", make_args(out=str(tmp_path), name="a", resume=True, channels=16))
    with pytest.raises(SystemExit, match="made with --channels 8; this run has --channels 16"):
        wrong.load_checkpoint(["channels"], "cpu")
    with pytest.raises(SystemExit, match="no run with a checkpoint"):
        common.Run("other", make_args(out=str(tmp_path), resume=True))


def test_atomic_save_keeps_old_checkpoint_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    common.save_atomic({"step": 1}, path)

    def killed(obj, f):
        open(f, "wb").write(b"half a checkpo")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        common.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1


def test_unreadable_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        common.load_checkpoint(tmp_path / "bad.pt", make_args(), [])
    with pytest.raises(SystemExit, match="does not exist"):
        common.load_checkpoint(tmp_path / "none.pt", make_args(), [])


def test_checkpoint_older_than_a_model_flag(tmp_path):
    """A checkpoint whose args lack a flag that shapes the model (it predates the flag) gets a one-line error."""
    torch.save({"args": {"channels": 8}, "step": 1}, tmp_path / "old.pt")
    assert common.load_checkpoint(tmp_path / "old.pt", make_args(), ["channels"])["step"] == 1
    with pytest.raises(SystemExit, match="does not record --inject: it was made by an older version"):
        common.load_checkpoint(tmp_path / "old.pt", make_args(inject="scale-shift"), ["channels", "inject"])
    flags, implied = ["channels", "self_cond"], {"self_cond": False}  # a feature it could not have had: taken as off
    state = common.load_checkpoint(tmp_path / "old.pt", make_args(self_cond=False), flags, implied=implied)
    assert state["args"]["self_cond"] is False
    with pytest.raises(SystemExit, match="was made with --self-cond False; this run has --self-cond True"):
        common.load_checkpoint(tmp_path / "old.pt", make_args(self_cond=True), flags, implied=implied)


def test_finish_writes_plot_grid_and_final(tmp_path):
    run = common.Run("toy", make_args(out=str(tmp_path), name="b"))
    for step in range(50):
        run.log(step, "train", loss=math.exp(-step / 20))
    run.log(25, "val", loss=0.3)
    run.log(49, "test", loss=0.1)
    run.save_grid(torch.rand(16, 3, 8, 8) * 2 - 1, "samples.png", nrow=4)
    final = run.finish(parameters=123, test_loss=torch.tensor(0.5), note="10 samples")
    assert json.loads((run.dir / "final.json").read_text()) == final == \
        {"parameters": 123, "test_loss": 0.5, "note": "10 samples"}
    for png in ("loss.png", "samples.png"):
        assert Image.open(run.dir / png).size[0] > 30


def test_runs_table_shows_differing_flags(tmp_path, capsys):
    for name, lr, fd in (("r1", 1e-3, 12.5), ("r2", 1e-4, 20.25)):
        run = common.Run("toy", make_args(out=str(tmp_path), name=name, lr=lr))
        run.finish(parameters=10, fd=fd)
    capsys.readouterr()
    common.main(["table", str(tmp_path / "toy")])
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "| run | --lr | parameters | fd |"
    assert table[2] == "| r1 | 0.001 | 10 | 12.5 |" and table[3] == "| r2 | 0.0001 | 10 | 20.25 |"
    with pytest.raises(SystemExit, match="no finished runs"):
        common.runs_table(tmp_path / "nothing")


def test_nan_loss_stops_with_a_message():
    common.check_finite(torch.tensor(0.5), 3)
    with pytest.raises(SystemExit, match="became nan at step 7"):
        common.check_finite(torch.tensor(float("nan")), 7)


def test_total_steps_and_device():
    loader = [0] * 30
    assert common.total_steps(make_args(epochs=2), loader) == 60
    assert common.total_steps(make_args(steps=7), loader) == 7
    assert common.get_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="unknown --device 'cdua'"):
        common.get_device("cdua")


def test_lr_factor_warms_up_holds_then_decays_to_near_zero():
    f = [common.lr_factor(step, 100, 10, 0.3) for step in range(100)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5)             # warm-up: (step + 1) / 10
    assert f[9:71] == [1.0] * 62                                                  # constant until 30 steps remain
    assert f[71] == pytest.approx(29 / 30) and f[99] == pytest.approx(1 / 30)     # linear towards zero
    assert all(a > b for a, b in zip(f[70:], f[71:]))
    assert [common.lr_factor(step, 100, 10, 0.0) for step in range(9, 100)] == [1.0] * 91
    assert max(common.lr_factor(step, 3, 1, 0.3) for step in range(3)) == 1.0    # never above the peak


@pytest.mark.parametrize("script", ["ddpm", "cddpm", "cgan"])
@pytest.mark.parametrize("bad", ["1", "-0.1"])
def test_a_learning_rate_decay_outside_0_1_is_refused_when_the_flags_are_read(script, bad):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit, match=re.escape(f"--lr-decay must be in [0, 1), got {float(bad)}")):
        module.get_args(["--lr-decay", bad])


def test_autocast_flag():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    cpu = torch.device("cpu")
    with common.autocast("off", cpu):
        assert (a @ b).dtype == torch.float32
    with common.autocast("bf16", cpu):
        assert (a @ b).dtype == torch.bfloat16
    with common.autocast("auto", cpu):          # bf16 exactly where the CPU has native bf16
        assert (a @ b).dtype == (torch.bfloat16 if common.native_bf16(cpu) else torch.float32)


def test_a_fused_optimizer_resumed_in_another_memory_layout_continues_exactly():
    """Saved in channels_last, resumed in NCHW (ddpm.py's layout follows --amp): the next steps must be those of a
    resume in the saved layout. Plain load_state_dict keeps the moments' strides, which fused AdamW misreads."""
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(4, 8, 3), torch.randn(2, 4, 6, 6)

    def steps(model, opt, layout, n=3):
        for _ in range(n):
            opt.zero_grad()
            model(x.contiguous(memory_format=layout)).square().mean().backward()
            opt.step()

    saved = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(saved.parameters(), lr=1e-2, fused=True)
    steps(saved, opt, torch.channels_last)
    resumed = {}
    for layout in (torch.channels_last, torch.contiguous_format):
        model = copy.deepcopy(saved).to(memory_format=layout)
        opt_resumed = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        common.load_optimizer_state(opt_resumed, copy.deepcopy(opt.state_dict()))
        steps(model, opt_resumed, layout)
        resumed[layout] = model.weight.detach().contiguous()
    torch.testing.assert_close(resumed[torch.contiguous_format], resumed[torch.channels_last])


def test_native_bf16_needs_the_bf16_instructions_not_just_avx512(tmp_path):
    """An AVX-512 CPU without AVX-512 BF16 or AMX emulates bf16 (slower): --amp auto must leave it off there."""
    cpu, cpuinfo = torch.device("cpu"), tmp_path / "cpuinfo"
    for flags, native in (("fpu avx2 avx512f avx512bw avx512vl", False), ("avx512f avx512_bf16", True),
                          ("avx2 amx_bf16 amx_tile", True), ("", False)):
        cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
        assert common.native_bf16(cpu, cpuinfo) == native, flags
    assert not common.native_bf16(cpu, tmp_path / "missing")          # not Linux: off


def test_restart_without_resume_starts_metrics_afresh(tmp_path):
    run = common.Run("toy", make_args(out=str(tmp_path), name="killed"))
    run.log(1, "train", loss=1.0)                                    # killed before its first checkpoint
    again = common.Run("toy", make_args(out=str(tmp_path), name="killed"))
    again.log(1, "train", loss=9.0)
    assert again.metrics() == [{"step": 1, "split": "train", "loss": 9.0}]


# ----------------------------------------------------------------------------- Frechet distance

def random_covariance(d, seed):
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_closed_forms():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2
    expected = 5.0 + ((s1.sqrt() - s2.sqrt()) ** 2).sum().item()
    assert common.frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # full covariances: against tr((S1 S2)^(1/2)) from the eigenvalues of the non-symmetric product
    a, b = random_covariance(5, 0), random_covariance(5, 1)
    cross = torch.linalg.eigvals(a @ b).sqrt().real.sum().item()
    expected = (a.trace() + b.trace()).item() - 2 * cross
    assert common.frechet_distance(torch.zeros(5), a, torch.zeros(5), b) == pytest.approx(expected, rel=1e-9)
    assert common.frechet_distance(torch.zeros(5), a, torch.zeros(5), a) == pytest.approx(0, abs=1e-9)
    assert common.frechet_distance(mu1, a[:3, :3], mu2, b[:3, :3]) == \
        pytest.approx(common.frechet_distance(mu2, b[:3, :3], mu1, a[:3, :3]), rel=1e-9)
    # rank-deficient covariances (fewer samples than feature dimensions, as with 2048-d Inception features)
    u = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    low = u @ u.T                                                     # rank 3 in 6 dimensions
    assert common.frechet_distance(torch.zeros(6), low, torch.zeros(6), low) == pytest.approx(0, abs=1e-6)
    assert common.frechet_distance(torch.zeros(6), low, torch.zeros(6), torch.zeros(6, 6)) == \
        pytest.approx(low.trace().item(), rel=1e-9)


def test_frechet_distance_from_samples_converges():
    a, b = random_covariance(4, 2), random_covariance(4, 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(a).T
    y = torch.randn(200_000, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(b).T + 1.0
    estimate = common.frechet_distance(*common.gaussian_stats(x), *common.gaussian_stats(y))
    exact = common.frechet_distance(torch.zeros(4), a, torch.ones(4), b)
    assert estimate == pytest.approx(exact, rel=0.02)


def test_reference_classifier_accuracy_and_frechet():
    args = make_args(image_size=32, batch_size=64, seed=3)
    data = common.load_data(args, fields=("image", "label", "factors"), sizes=(1_000, 1_000, 2_000))
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    quality = common.SampleQuality(args, data, "cpu", split="test", classifier_steps=200)
    assert torch.equal(torch.rand(3), expected_next)          # the caller's random stream is left untouched
    assert quality.classifier_accuracy >= 0.95                # on the default 10,000 test images
    val_images, val_labels, _ = data.val.dataset[list(range(1000))]
    noise = torch.rand(1000, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_val, fd_noise = quality.frechet(val_images), quality.frechet(noise)
    assert fd_val < 0.05 * fd_noise
    assert quality.conditional_accuracy(val_images, val_labels) >= 0.95
    assert quality.conditional_accuracy(val_images, (val_labels + 1) % 10) < 0.05
    # cached: a second call loads the same weights instead of training again
    model, acc = common.reference_classifier(args, "cpu", steps=200)
    assert acc == quality.classifier_accuracy
    assert torch.equal(model.head.weight, quality.classifier.head.weight)


def test_inception_offline_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models, "inception_v3", offline)
    with pytest.raises(SystemExit, match="--metric classifier"):
        common.InceptionFeatures()


def test_linear_probe_reads_linear_structure_only():
    """Classes that differ along one direction of 8-d features are found; labels independent of the features sit
    at chance; a class coded by a feature's magnitude, not its sign (not linearly separable), is missed."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(4000, 8, generator=g)
    labels = torch.randint(0, 4, (4000,), generator=g)
    separable = features + 6 * torch.nn.functional.one_hot(labels, 8).float()
    assert common.linear_probe(separable[:2000], labels[:2000], separable[2000:], labels[2000:]) > 0.97
    assert common.linear_probe(features[:2000], labels[:2000], features[2000:], labels[2000:]) < 0.32
    by_magnitude = (features[:, 0].abs() > 0.67).long()                          # about half each
    assert common.linear_probe(features[:2000], by_magnitude[:2000], features[2000:], by_magnitude[2000:]) < 0.6
    with torch.no_grad():                                                     # fits inside no_grad too
        assert common.linear_probe(features[:100], labels[:100], features[100:200], labels[100:200]) == \
            common.linear_probe(features[:100], labels[:100], features[100:200], labels[100:200])
