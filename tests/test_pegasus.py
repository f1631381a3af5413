"""pegasus.py: standalone, the whole pipeline on a tiny fake CIFAR-10 folder, resume, the conditioning maths, the
nearest-neighbour search and the choice of the 64."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision

import pegasus

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"argparse", "json", "math", "os", "time", "pathlib",                   # the standard library it uses
           "torch", "torchvision", "numpy", "tqdm", "matplotlib"}                 # the brief's packages


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    """<root>/train/<class>/*.png for CIFAR-10's ten classes, 10 images each, each class its own colour."""
    root = tmp_path_factory.mktemp("cifar")
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(pegasus.CIFAR10_CLASSES):
        (root / "train" / name).mkdir(parents=True)
        colour = torch.tensor([(k * 97) % 256, (k * 53 + 80) % 256, (k * 31 + 160) % 256])
        for i in range(10):
            image = (colour[:, None, None] + 30 * torch.randn(3, 32, 32, generator=g)).clamp(0, 255)
            torchvision.utils.save_image(image.round() / 255, root / "train" / name / f"{i}.png")
    return root


def read_png(path):
    return torchvision.transforms.functional.pil_to_tensor(torchvision.datasets.folder.pil_loader(path))


def tiny(cifar_folder, out, *extra):
    return ["--quick", "--dataset", "folder", "--data-dir", str(cifar_folder), "--held-out", "30", "--steps", "4",
            "--classifier-steps", "4", "--candidates", "80", "--eval-every", "2", "--out", str(out), "--amp", "off",
            "--g-channels", "8", "--d-channels", "4", "--classifier-channels", "4", *extra]


def test_imports_only_the_briefs_packages():
    tree = ast.parse((ROOT / "pegasus.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= ALLOWED, f"pegasus.py imports {modules - ALLOWED}"


def test_quick_run_alone_writes_grid_best_diagram_and_uniqueness_report(cifar_folder, tmp_path):
    """A student hands in pegasus.py alone: copied away from the project and run there, --quick with a tiny budget
    writes every output of the brief."""
    shutil.copy(ROOT / "pegasus.py", tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "pegasus.py", *tiny(cifar_folder, "runs")], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "default"
    for name in ("samples.png", "best.png", "architecture.png", "neighbours.png", "training.png", "unselected.png",
                 "report.md", "checkpoint.pt"):
        assert (run / name).stat().st_size > 0, name
    grid = read_png(run / "samples.png")
    assert grid.shape == (3, 8 * 34 + 2, 8 * 34 + 2)                      # 64 cells of 32px with 2px frames
    assert grid[:, 0, 0].tolist() == [255, 0, 0] and grid[:, 0, 40].tolist() == [255, 255, 255]   # best framed red
    best = read_png(run / "best.png")
    assert best.shape == (3, 256, 256) and torch.equal(best[:, ::8, ::8], grid[:, 2:34, 2:34])    # cell 0, 8x
    report = json.loads((run / "report.json").read_text())
    assert len(report["samples"]) == 64 and len({s["candidate"] for s in report["samples"]}) == 64
    assert report["best"] == report["samples"][0] and report["steps"] == 4
    assert all(s["wing"] in ("bird", "airplane") and 0 <= s["pixel_nn_index"] < 70 for s in report["samples"])
    assert report["real_horses"]["pixel_nn"] > 0 and report["parameters"]["generator"] > 0


def test_sample_only_is_deterministic_under_a_seed(cifar_folder, tmp_path):
    first = pegasus.main(tiny(cifar_folder, tmp_path))
    again = pegasus.main(tiny(cifar_folder, tmp_path, "--sample-only"))
    other = pegasus.main(tiny(cifar_folder, tmp_path, "--sample-only", "--seed", "1"))
    assert again["samples"] == first["samples"] and again["best"] == first["best"]
    assert other["samples"] != first["samples"]


def test_a_generator_that_copies_training_horses_scores_badly(cifar_folder, tmp_path, monkeypatch):
    """The brief marks uniqueness: candidates that are training horses are all flagged as copies and the report's
    uniqueness ratio (pixel distance to the training set, as a share of real unseen horses') falls to zero."""
    args = pegasus.get_args(tiny(cifar_folder, tmp_path))
    x, y, _, _, _ = pegasus.load_cifar10(args)
    horses = pegasus.to_float(x[y == pegasus.CIFAR10_CLASSES.index("horse")])
    monkeypatch.setattr(pegasus, "generate", lambda G, maps, args, device, seed: horses[torch.arange(len(maps))
                                                                                        % len(horses)])
    report = pegasus.main(tiny(cifar_folder, tmp_path))
    assert report["copies_skipped"] == report["candidates"] == 80
    assert report["uniqueness_ratio"]["pixel"] < 1e-3 and report["best"]["pixel_nn"] < 1e-3


def test_resume_continues_exactly(cifar_folder, tmp_path):
    """Six steps straight = three steps, a stop, and --resume to six (batches, flips, z and Adam restored); the
    resumed run takes its budget and widths from the checkpoint, not from flags it was not given."""
    pegasus.main(tiny(cifar_folder, tmp_path, "--steps", "6", "--name", "straight"))
    pegasus.main(tiny(cifar_folder, tmp_path, "--steps", "3", "--name", "resumed"))
    pegasus.main(["--resume", "--steps", "6", "--name", "resumed", "--out", str(tmp_path), "--dataset", "folder",
                  "--data-dir", str(cifar_folder), "--held-out", "30", "--amp", "off"])
    a, b = [torch.load(tmp_path / n / "checkpoint.pt", weights_only=False) for n in ("straight", "resumed")]
    assert a["step"] == b["step"] == 6 and b["args"]["g_channels"] == 8 and b["args"]["steps"] == 6
    for key in ("G", "D", "G_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(b[key][name], tensor), f"{key}.{name}"
    for key in ("opt_g", "opt_d"):
        for i, moments in a[key]["state"].items():
            assert torch.equal(b[key]["state"][i]["exp_avg_sq"], moments["exp_avg_sq"]), f"{key} {i}"


def test_bf16_autocast_trains_and_samples(cifar_folder, tmp_path):
    """--amp bf16 (what --amp auto picks on CPUs and GPUs with native bf16) runs the whole pipeline."""
    report = pegasus.main(tiny(cifar_folder, tmp_path, "--amp", "bf16", "--steps", "2"))
    state = torch.load(tmp_path / "default" / "checkpoint.pt", weights_only=False)
    assert report["steps"] == 2 and all(torch.isfinite(t).all() for t in state["G"].values())
    assert all(torch.isfinite(torch.tensor([h["loss_d"], h["loss_g"]])).all() for h in state["gan_history"])


def test_torchrun_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="pegasus.py runs in one process"):
        pegasus.get_args([])


def test_hinge_losses():
    zero = torch.zeros(5)
    assert pegasus.d_hinge_loss(zero, zero).item() == 2 and pegasus.g_hinge_loss(zero).item() == 0
    d_real, d_fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert pegasus.d_hinge_loss(d_real, d_fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert pegasus.g_hinge_loss(d_fake).item() == pytest.approx(1.5)


def test_one_step_moves_the_ema_generator_by_one_minus_decay(cifar_folder, tmp_path):
    args = pegasus.get_args(tiny(cifar_folder, tmp_path, "--steps", "1", "--ema", "0.9"))
    pegasus.fill_presets(args, pegasus.QUICK)
    x, y, _, _, _ = pegasus.load_cifar10(args)
    x, y = pegasus.select_classes(x, y, args.classes)
    G, D, G_ema, _ = pegasus.build(args, torch.device("cpu"))
    before = [p.detach().clone() for p in G.parameters()]
    pegasus.train_gan(G, D, G_ema, dict(step=0, gan_history=[]), x, y, args, torch.device("cpu"), tmp_path / "c.pt")
    moved = 0
    for p0, p, p_ema in zip(before, G.parameters(), G_ema.parameters()):
        torch.testing.assert_close(p_ema, 0.9 * p0 + 0.1 * p.detach())
        moved += not torch.equal(p0, p.detach())
    assert moved > 0


def test_gan_learns_the_colours_of_its_classes(cifar_folder, tmp_path):
    """Trained on three flat-coloured classes, G's samples for each class move to that class's colour."""
    args = pegasus.get_args(tiny(cifar_folder, tmp_path, "--steps", "150", "--batch-size", "16", "--eval-every",
                                 "1000", "--lr", "1e-3"))
    pegasus.fill_presets(args, pegasus.QUICK)
    x, y, _, _, _ = pegasus.load_cifar10(args)
    x, y = pegasus.select_classes(x, y, args.classes)
    torch.manual_seed(0)
    G, D, G_ema, _ = pegasus.build(args, torch.device("cpu"))
    target = torch.stack([pegasus.to_float(x[y == k]).mean((0, 2, 3)) for k in range(3)])     # (3 classes, RGB)

    def colour_error():                                  # batch statistics, as in training
        with torch.no_grad():
            colours = G(torch.randn(96, args.latent_dim), torch.eye(3).repeat(32, 1)).mean((2, 3))
        return (colours.view(32, 3, 3).mean(0) - target).abs().mean().item()

    before = colour_error()
    pegasus.train_gan(G, D, G_ema, dict(step=0, gan_history=[]), x, y, args, torch.device("cpu"), tmp_path / "c.pt")
    assert colour_error() < 0.5 * before


def test_clear_errors(cifar_folder, tmp_path):
    pegasus.main(tiny(cifar_folder, tmp_path))
    (tmp_path / "empty" / "train" / "horse").mkdir(parents=True)
    cases = [(tiny(cifar_folder, tmp_path), "exists: pass --resume"),
             (tiny(cifar_folder, tmp_path, "--resume", "--g-channels", "16"), "--g-channels 8, not 16"),
             (tiny(cifar_folder, tmp_path, "--sample-only", "--name", "none"), "no checkpoint"),
             (tiny(tmp_path / "nowhere", tmp_path, "--name", "x"), "not found"),
             (tiny(tmp_path / "empty", tmp_path, "--name", "z"), "no valid file"),
             (tiny(cifar_folder, tmp_path, "--dataset", "mnist", "--name", "y"), "unknown --dataset"),
             (tiny(cifar_folder, tmp_path, "--classes", "bird,airplane"), "must include horse"),
             (tiny(cifar_folder, tmp_path, "--classes", "horse,unicorn"), "unicorn not among"),
             (tiny(cifar_folder, tmp_path, "--candidates", "10"), "at least 64")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            pegasus.main(argv)
    with pytest.raises(SystemExit, match="D loss became nan at step 7"):
        pegasus.check_finite(torch.tensor(float("nan")), "D", 7)


def test_nearest_returns_the_training_image_itself():
    g = torch.Generator().manual_seed(0)
    train = pegasus.pixels(torch.rand(100, 3, 32, 32, generator=g) * 2 - 1)
    index, distance = pegasus.nearest(train[[3, 42, 99]], train, batch=7)           # chunks of 7: 15 of them
    assert index.tolist() == [3, 42, 99] and distance.max() < 1e-3
    queries = pegasus.pixels(torch.rand(20, 3, 32, 32, generator=g) * 2 - 1)
    index, distance = pegasus.nearest(queries, train, batch=7)
    brute = torch.cdist(queries, train)
    assert index.tolist() == brute.argmin(1).tolist()
    torch.testing.assert_close(distance, brute.min(1).values, atol=1e-4, rtol=1e-4)


def test_pixel_distance_is_the_rms_difference_in_0_1():
    a, b = -torch.ones(1, 3, 32, 32), torch.ones(1, 3, 32, 32)                     # black and white
    assert torch.dist(pegasus.pixels(a), pegasus.pixels(b)).item() == pytest.approx(1.0, rel=1e-5)


def test_choice_skips_copies_and_near_duplicates():
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(200, 16, generator=g), dim=1)
    features[1:10] = features[0]                                 # ten identical candidates with the best scores
    scores = -torch.arange(200.0)
    copies = torch.zeros(200, dtype=torch.bool)
    copies[10:15] = True                                         # the next five best are copies of training images
    chosen = pegasus.choose(scores, features, copies, SimpleNamespace(min_spacing=0.5))
    assert len(chosen) == 64 and len(set(chosen)) == 64
    assert chosen[0] == 0 and not set(chosen) & set(range(1, 15))
    too_few = pegasus.choose(scores[:70], features[:70], copies[:70], SimpleNamespace(min_spacing=0.5))
    assert len(set(too_few)) == 64                               # the rules leave too few: near duplicates fill
    assert not set(too_few) & set(range(10, 15))                 # the rest, and copies never while others remain


def test_candidate_conditions_mix_horse_and_a_wing_class():
    args = SimpleNamespace(mix_min=0.2, mix_max=0.6, classes=["horse", "bird", "airplane"])
    maps, info = pegasus.candidate_conditions(200, 3, 0, [1, 2], args, torch.Generator().manual_seed(0))
    torch.testing.assert_close(maps.sum(1), torch.ones(200, 4, 4))        # a convex mix at every position
    assert (maps >= 0).all()
    for m, i in zip(maps, info):
        top, bottom = m[:, :i["rows"]], m[:, i["rows"]:]
        wing = 1 if i["wing"] == "bird" else 2
        assert 0.2 <= i["a"] <= 0.6 and torch.allclose(top[wing], torch.tensor(i["a"]), atol=1e-3)
        assert (bottom[0] == 1).all()                                     # pure horse below the wing rows
        assert (i["rows"] == 4) == (i["kind"] == "global")
    assert {i["kind"] for i in info} == {"global", "spatial"} and {i["wing"] for i in info} == {"bird", "airplane"}


def test_conditioning_is_linear_in_the_condition():
    """A mix of conditions is the same mix of CBN gains and of projection terms, and a constant map is the
    plain (B, K) condition: what lets the file ask for conditions it never trained on."""
    torch.manual_seed(0)
    G, D = pegasus.Generator(3, latent_dim=8, cond_dim=6, channels=8).eval(), pegasus.Discriminator(3, 4).eval()
    for module in G.modules():                           # off the zero start, so the condition matters
        if isinstance(module, pegasus.ConditionalBatchNorm):
            torch.nn.init.normal_(module.gamma.weight), torch.nn.init.normal_(module.beta.weight)
    e0, e1, a = torch.eye(3)[:1], torch.eye(3)[1:2], 0.3
    mix = (1 - a) * e0 + a * e1
    torch.testing.assert_close(G.condition_map(mix), (1 - a) * G.condition_map(e0) + a * G.condition_map(e1))
    z = torch.randn(1, 8)
    torch.testing.assert_close(G(z, mix), G(z, mix[:, :, None, None].expand(1, 3, 4, 4)))
    assert not torch.allclose(G(z, e0), G(z, e1))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(D(x, mix.expand(2, 3)), (1 - a) * D(x, e0.expand(2, 3)) + a * D(x, e1.expand(2, 3)))


def test_conditional_batch_norm_starts_as_plain_batch_norm():
    cbn, h = pegasus.ConditionalBatchNorm(5, 7), torch.randn(4, 5, 8, 8)
    torch.testing.assert_close(cbn(h, torch.randn(4, 7, 4, 4)), F.batch_norm(h, None, None, training=True))


def test_score_is_the_documented_formula(monkeypatch):
    probs = torch.full((4, 10), 0.01)
    horse, bird, plane = (pegasus.CIFAR10_CLASSES.index(c) for c in ("horse", "bird", "airplane"))
    probs[:, horse] = torch.tensor([0.5, 0.1, 0.3, 0.2])
    probs[:, bird], probs[:, plane] = torch.tensor([0.2, 0.3, 0.05, 0.4]), 0.1
    monkeypatch.setattr(pegasus, "embed", lambda classifier, images, device: (probs.log(), torch.zeros(4, 3)))
    D = pegasus.Discriminator(3, 4)
    x = torch.randn(4, 3, 32, 32)
    args = SimpleNamespace(classes=["horse", "bird", "airplane"], wing_weight=0.5, realism_weight=0.25)
    s = pegasus.score(x, None, D, args, torch.device("cpu"))
    realism = D.eval()(x, torch.eye(3)[[0, 0, 0, 0]])
    expected = probs[:, horse].log() + 0.5 * (probs[:, bird] + probs[:, plane]).log() + \
        0.25 * ((realism - realism.mean()) / realism.std()).clamp(-2, 2)
    torch.testing.assert_close(s["scores"], expected.detach())


def test_classifier_loss_falls_and_learns_tiny_data(cifar_folder, tmp_path):
    """Ten colours, one per class: the classifier's loss falls and it labels held-out images well above chance."""
    args = pegasus.get_args(["--dataset", "folder", "--data-dir", str(cifar_folder), "--held-out", "30",
                             "--classifier-steps", "60", "--batch-size", "16", "--eval-every", "30", "--amp", "off"])
    x, y, x_held, y_held, _ = pegasus.load_cifar10(args)
    state, classifier = {}, pegasus.Classifier(10, 8)
    torch.manual_seed(0)
    pegasus.train_classifier(classifier, x, y, x_held, y_held, args, torch.device("cpu"), state, tmp_path / "c.pt")
    losses = [h["loss"] for h in state["classifier_history"] if "loss" in h]
    assert len([h for h in state["classifier_history"] if "held_out_accuracy" in h]) == 2     # step 30 and the end
    assert losses[-1] < 0.5 * losses[0]
    assert state["classifier_accuracy"] >= 0.8 and (tmp_path / "c.pt").exists()


def test_native_bf16_needs_the_bf16_instructions_not_just_avx512(tmp_path):
    cpu, cpuinfo = torch.device("cpu"), tmp_path / "cpuinfo"
    for flags, native in (("avx512f avx512bw avx512vl", False), ("avx512f avx512_bf16", True), ("amx_bf16", True)):
        cpuinfo.write_text(f"flags : {flags}\n")
        assert pegasus.native_bf16(cpu, cpuinfo) == native, flags
