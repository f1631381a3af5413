"""autoencoder.py: each distortion does what it says, the metrics' scale, the networks' shapes for every flag, that
a concatenation skip can express the sum, matched parameter counts, the probes, learning on tiny data,
determinism, checkpoints, sweeps, the command line and its errors."""
import itertools
import json
import math
import re

import pytest
import torch

import autoencoder as ae
import common

TINY = ["--image-size", "16", "--levels", "2", "--channels", "8", "--split-sizes", "512,128,128",
        "--batch-size", "32", "--device", "cpu", "--finetune-steps", "5", "--pretrain-fractions", "0.1,1"]


def images(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def ops(spec):
    (_, item), = ae.parse_distortions(spec)
    return item


# ----------------------------------------------------------------------------- distortions

def test_a_flip_twice_is_the_identity_and_once_mirrors():
    x = images()
    g = torch.Generator().manual_seed(0)
    for flip, dim in (("hflip", 3), ("vflip", 2)):
        once, *_ = ae.apply_item(x, ops(flip), g)
        assert torch.equal(once, x.flip(dim)) and not torch.equal(once, x)
        twice, *_ = ae.apply_item(x, ops(f"{flip}+{flip}"), g)
        assert torch.equal(twice, x)


def test_occlusion_blacks_out_exactly_its_square_and_touches_nothing_else():
    x = images(n=50, size=16) * 0.5                  # no pixel is black before
    out, hole = ae.occlude(x, 5, torch.Generator().manual_seed(0))
    assert hole.shape == (50, 1, 16, 16)
    assert (hole.flatten(1).sum(1) == 25).all()
    for h in hole[:, 0]:                             # a 5 x 5 square: 5 rows and 5 columns in one block
        rows, cols = h.any(1).nonzero().squeeze(1), h.any(0).nonzero().squeeze(1)
        assert len(rows) == len(cols) == 5 and rows[-1] - rows[0] == 4 and cols[-1] - cols[0] == 4
    assert torch.equal(out[~hole.expand_as(x)], x[~hole.expand_as(x)])
    assert (out[hole.expand_as(x)] == -1).all()
    _, many = ae.occlude(torch.zeros(2000, 3, 16, 16), 5, torch.Generator().manual_seed(1))
    assert many[:, 0, 0, 0].any() and many[:, 0, -1, -1].any()    # every position inside, corners included


def test_brightness_shifts_the_mean_by_the_drawn_amount():
    x = torch.zeros(3, 3, 8, 8)                      # mid-grey: no clipping
    out = ae.shift_brightness(x, torch.tensor([0.1, -0.25, 0.0]))
    assert torch.allclose(out.mean((1, 2, 3)), torch.tensor([0.2, -0.5, 0.0]))   # [0, 1] units are twice on [-1, 1]
    drawn, *_ = ae.apply_item(torch.zeros(2000, 3, 2, 2), ops("brightness:0.3"), torch.Generator().manual_seed(0))
    shift = drawn.mean((1, 2, 3)) / 2
    assert shift.abs().max() <= 0.3 + 1e-6 and shift.min() < -0.25 and shift.max() > 0.25
    assert abs(shift.mean()) < 0.02                  # uniform on [-0.3, 0.3]
    assert ae.shift_brightness(torch.ones(1, 3, 2, 2), torch.tensor([0.5])).max() == 1   # clipped to the range


def test_noise_has_the_stated_standard_deviation_on_the_unit_scale():
    x = torch.zeros(8, 3, 32, 32)
    out, *_ = ae.apply_item(x, ops("noise:0.1"), torch.Generator().manual_seed(0))
    assert abs(((out - x) / 2).std().item() - 0.1) < 0.002
    loud, *_ = ae.apply_item(x, ops("noise:2"), torch.Generator().manual_seed(0))
    assert loud.min() == -1 and loud.max() == 1      # clipped


def test_rotation_by_a_quarter_turn_is_rot90_counter_clockwise_and_by_zero_the_identity():
    x = images(n=2, size=16)
    quarter = ae.rotate(x, torch.tensor([90.0, -90.0]))
    assert torch.allclose(quarter[0], torch.rot90(x[0], 1, (1, 2)), atol=1e-5)     # counter-clockwise on screen
    assert torch.allclose(quarter[1], torch.rot90(x[1], -1, (1, 2)), atol=1e-5)
    assert torch.allclose(ae.rotate(x, torch.zeros(2)), x, atol=1e-6)
    corner = ae.rotate(torch.ones(1, 3, 16, 16), torch.tensor([45.0]))[0, :, 0, 0]
    assert torch.allclose(corner, torch.zeros(3), atol=1e-6)   # pixels from outside the image are mid-grey


def test_rotations_and_flips_move_the_hole_and_the_shape_mask_with_the_image():
    x = torch.zeros(20, 3, 16, 16)
    shape = torch.zeros(20, 1, 16, 16)
    shape[:, :, 2:6, 3:9] = 1                                  # an off-centre rectangle
    for spec, dim in (("occlude:4+hflip", 3), ("occlude:4+vflip", 2), ("occlude:4+rotate:180", None)):
        out, hole, moved = ae.apply_item(x, ops(spec), torch.Generator().manual_seed(0), shape)
        assert torch.equal(hole.expand_as(out), out < -0.5), spec         # the hole is where the black square is
        if dim is not None:
            assert torch.equal(moved, shape.flip(dim))
        else:                                                  # random angles: the rectangle turns, about its area
            assert not torch.equal(moved, shape) and abs(moved.sum() / shape.sum() - 1) < 0.2
    masks = torch.zeros(20, 16, 16, dtype=torch.bool)
    masks[:, 2:6, 3:9] = True
    _, target, distorted, _ = ae.make_pair(x, masks, "segment", ae.parse_distortions("vflip"),
                                           torch.zeros(20, dtype=torch.long), None)
    assert torch.equal(target, masks[:, None].float().flip(2))


def test_parsing_defaults_composition_and_identity():
    items = ae.parse_distortions("noise,occlude:4+hflip,vflip")
    assert [name for name, _ in items] == ["noise", "occlude:4+hflip", "vflip"]
    assert items[0][1] == [("noise", ae.DISTORTIONS["noise"])]
    assert items[1][1] == [("occlude", 4.0), ("hflip", None)]
    assert ae.parse_distortions("none") == [("clean", [])]
    assert ae.parse_distortions("noise, hflip") == ae.parse_distortions("noise,hflip")


@pytest.mark.parametrize("spec, message", [("blur:2", "unknown distortion 'blur'"), ("noise:x", "must be a number"),
                                           ("hflip:2", "takes no strength"), ("occlude:2.5", "whole number"),
                                           ("occlude:0", "at least 1"), ("noise:-1", "finite and >= 0"),
                                           ("noise:inf", "finite"), ("rotate:nan", "finite")])
def test_bad_distortions_get_one_line_errors(spec, message):
    with pytest.raises(SystemExit, match=re.escape(message)) as error:
        ae.parse_distortions(spec)
    assert "\n" not in str(error.value)


def test_each_image_gets_the_item_drawn_for_it_and_the_draw_is_seeded():
    x = images(n=6)
    items = ae.parse_distortions("hflip,vflip")
    choice = torch.tensor([0, 1, 0, 1, 1, 0])
    net_input, target, distorted, hole = ae.make_pair(x, None, "restore", items, choice, torch.Generator())
    for n in range(6):
        assert torch.equal(distorted[n], x[n].flip(1 if choice[n] else 2))     # vflip: rows, hflip: columns
    assert torch.equal(target, x) and torch.equal(net_input, distorted) and not hole.any()
    noisy = ae.parse_distortions("noise:0.2,occlude:4,rotate:30,brightness:0.3")
    a = ae.make_pair(x, None, "restore", noisy, torch.arange(6) % 4, torch.Generator().manual_seed(3))[0]
    b = ae.make_pair(x, None, "restore", noisy, torch.arange(6) % 4, torch.Generator().manual_seed(3))[0]
    c = ae.make_pair(x, None, "restore", noisy, torch.arange(6) % 4, torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_task_inputs_and_targets():
    x = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)     # pure red
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    clean = ae.parse_distortions("none")
    grey, target, *_ = ae.make_pair(x, None, "colorize", clean, torch.zeros(2, dtype=torch.long), None)
    assert grey.shape == (2, 1, 4, 4) and torch.allclose(grey, torch.full_like(grey, 2 * 0.299 - 1))
    assert torch.equal(target, x)
    net_input, target, *_ = ae.make_pair(x, mask, "segment", clean, torch.zeros(2, dtype=torch.long), None)
    assert torch.equal(net_input, x) and torch.equal(target, mask[:, None].float())
    occluded = ae.parse_distortions("occlude:2")
    net_input, _, distorted, hole = ae.make_pair(x, None, "inpaint", occluded, torch.zeros(2, dtype=torch.long),
                                                 torch.Generator().manual_seed(0))
    assert net_input.shape == (2, 4, 4, 4) and torch.equal(net_input[:, 3:] > 0, hole)
    assert torch.equal(net_input[:, :3], distorted)
    for task in ae.TASKS:
        assert ae.task_channels(task, 3)[0] == ae.clean_input(x, task).shape[1]


# ----------------------------------------------------------------------------- metrics and loss

def test_scores_are_on_the_unit_range():
    x = images(n=3)
    same = ae.image_scores(x, x)
    assert (same["psnr"] == 100).all() and torch.allclose(same["ssim"], torch.ones(3)) and (same["mse"] == 0).all()
    offset = ae.image_scores((x * 0.5 + 0.2), (x * 0.5))     # 0.2 on [-1, 1] is 0.1 on [0, 1]: MSE 0.01, 20 dB
    assert torch.allclose(offset["mse"], torch.full((3,), 0.01)) and torch.allclose(offset["psnr"], torch.full((3,), 20.0))
    assert math.isclose(ae.loss_fn(x * 0.5 + 0.2, x * 0.5, "restore").item(), 0.01, rel_tol=1e-5)
    a, b = 0.3, 0.6                # constant images on the [0, 1] scale: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    constant = lambda v: torch.full((1, 3, 16, 16), 2 * v - 1)
    expected = (2 * a * b + common.SSIM_C1) / (a * a + b * b + common.SSIM_C1)
    assert math.isclose(ae.image_scores(constant(a), constant(b))["ssim"].item(), expected, rel_tol=1e-4)


def test_iou_and_pixel_accuracy_of_known_masks():
    mask = torch.zeros(3, 1, 4, 4)
    mask[0, 0, :2] = 1                                          # 8 pixels
    mask[1, 0, :, :1] = 1                                       # 4 pixels
    logits = torch.full((3, 1, 4, 4), -5.0)
    logits[0, 0, :1] = 5                                        # 4 of the 8: IoU 0.5
    logits[1, 0, :, :2] = 5                                     # 8 predicted, 4 right: IoU 0.5
    assert torch.allclose(ae.iou(logits, mask), torch.tensor([0.5, 0.5, 1.0]))   # both empty: 1
    assert torch.allclose(ae.pixel_accuracy(logits, mask), torch.tensor([12 / 16, 12 / 16, 1.0]))


# ----------------------------------------------------------------------------- networks

@pytest.mark.parametrize("latent_dim, up, skip, task", [
    (d, up, skip, task) for d, up, skip in itertools.product((0, 8), ae.UPS, ae.SKIPS) for task in ("restore",)]
    + [(0, "transposed", "concat", task) for task in ("inpaint", "colorize", "segment")])
def test_output_shape_for_every_architecture_flag(latent_dim, up, skip, task):
    for size, levels in ((16, 2), (32, 3)):
        args = ae.get_args(["--image-size", str(size), "--levels", str(levels), "--channels", "4", "--latent-dim",
                            str(latent_dim), "--up", up, "--skip", skip, "--task", task])
        model = ae.build(args, 3)
        c_in, c_out = ae.task_channels(task, 3)
        x = torch.randn(2, c_in, size, size)
        assert model(x).shape == (2, c_out, size, size)
        assert model.encoder.code(x).shape == (2, latent_dim or 4 * 2 ** levels)


def test_default_parameter_counts():
    model = ae.build(ae.get_args([]), 3)
    assert (common.count_parameters(model.encoder), common.count_parameters(model.decoder)) == (483_824, 485_491)


def test_a_concatenation_skip_can_express_the_sum():
    torch.manual_seed(0)
    h, s = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    concat = ae.Merge("concat", 6)
    with torch.no_grad():
        concat.mix.weight.copy_(torch.cat([torch.eye(6), torch.eye(6)], 1)[:, :, None, None])
        concat.mix.bias.zero_()
    assert torch.allclose(concat(h, s), ae.Merge("add", 6)(h, s), atol=1e-6)
    assert torch.equal(ae.Merge("none", 6)(h, s), h)


def test_skips_carry_the_input_around_the_bottleneck():
    """With a 2-d bottleneck and no skip, a change of the input that leaves the code unchanged cannot reach the
    output; with a skip it does. The change is a random direction with the code's Jacobian projected out (the
    networks are piecewise linear, so a small step along it keeps the code to float precision)."""
    for skip, reaches in (("none", False), ("add", True)):
        torch.manual_seed(0)
        args = ae.get_args(["--image-size", "16", "--levels", "2", "--channels", "4", "--latent-dim", "2",
                            "--skip", skip])
        model = ae.build(args, 3).double().eval()       # batch norm with fixed statistics: piecewise linear
        x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
        jacobian = torch.autograd.functional.jacobian(lambda v: model.encoder.code(v.view_as(x))[0], x.flatten())
        v = torch.randn(x.numel(), dtype=torch.float64)
        v -= jacobian.T @ torch.linalg.solve(jacobian @ jacobian.T, jacobian @ v)     # into the null space
        x_new = x + 1e-3 * (v / v.norm()).view_as(x)
        with torch.no_grad():
            assert torch.allclose(model.encoder.code(x_new), model.encoder.code(x), rtol=0, atol=1e-12)
            change = (model(x_new) - model(x)).abs().max().item()
        assert (change > 1e-7) if reaches else (change < 1e-12), (skip, change)


def test_the_concatenation_costs_2c2_plus_c_parameters_per_stage_and_the_sum_nothing():
    count = lambda skip, c: common.count_parameters(ae.build(ae.get_args(
        ["--latent-dim", "0", "--skip", skip, "--channels", str(c)]), 3))
    assert count("add", 16) == count("none", 16)
    assert count("concat", 16) - count("add", 16) == sum(2 * c * c + c for c in (16, 32, 64))
    assert 0.02 < count("concat", 16) / count("add", 16) - 1 < 0.03 < count("add", 17) / count("add", 16) - 1


# ----------------------------------------------------------------------------- probes

def test_the_mlp_probe_reads_what_a_linear_probe_cannot():
    g = torch.Generator().manual_seed(0)
    codes, test_codes = torch.randn(2000, 2, generator=g), torch.randn(1000, 2, generator=g)
    xor = lambda c: ((c[:, 0] > 0) ^ (c[:, 1] > 0)).long()       # no line separates the quadrants' parity
    assert common.linear_probe(codes, xor(codes), test_codes, xor(test_codes)) < 0.65
    assert ae.mlp_probe(codes, xor(codes), test_codes, xor(test_codes)) > 0.9


# ----------------------------------------------------------------------------- training and the command line

def run_cli(tmp_path, *flags):
    ae.main([*TINY, "--out", str(tmp_path), *flags])
    return tmp_path / "autoencoder"


def test_denoising_loss_falls_and_the_output_beats_the_input(tmp_path):
    root = run_cli(tmp_path, "--task", "denoise", "--steps", "120", "--eval-every", "60", "--name", "d",
                   "--latent-dim", "0", "--skip", "add", "--pretrain-fractions", "none")
    records = [json.loads(line) for line in (root / "d" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert sum(train[-10:]) < 0.5 * sum(train[:10])
    final = json.loads((root / "d" / "final.json").read_text())
    assert final["per_distortion"]["noise:0.2"]["psnr_out"] > final["per_distortion"]["noise:0.2"]["psnr_in"] + 1
    assert {"val", "test"} <= {r["split"] for r in records}


def test_training_is_deterministic_and_the_checkpoint_reproduces_the_scores(tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        run_cli(tmp_path, "--steps", "20", "--eval-every", "10", "--name", name, "--pretrain-fractions", "none",
                "--distort", "noise:0.1,occlude:4", "--seed", seed)
    root = tmp_path / "autoencoder"
    losses = [[json.loads(line)["loss"] for line in (root / n / "metrics.jsonl").read_text().splitlines()]
              for n in ("a", "b", "c")]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    run_cli(tmp_path, "--eval-only", "--name", "a", "--pretrain-fractions", "none")     # the run's own --distort
    final = json.loads((root / "a" / "final.json").read_text())
    again = json.loads((root / "a" / "evaluation-noise_0.1_occlude_4.json").read_text())
    assert set(again["per_distortion"]) == {"noise:0.1", "occlude:4"}
    assert again["per_distortion"] == final["per_distortion"]
    assert again["linear_probe_accuracy"] == final["linear_probe_accuracy"]
    assert (root / "a" / "restoration_eval-noise_0.1_occlude_4.png").exists()


def test_fine_tuning_learns_the_classes():
    """200 steps from a random encoder on the tiny set's 512 labelled images beat always answering the commonest
    class by more than 10 points (a fine-tuning loop that never stepped would sit near chance)."""
    args = ae.get_args(TINY + ["--finetune-steps", "200"])
    data = common.load_data(args)
    torch.manual_seed(0)
    accuracy = ae.finetune(ae.build(args, 3).encoder, data, len(data.train.dataset), args, "cpu", seed=0)
    labels = data.test.dataset[torch.arange(len(data.test.dataset))][1]
    majority = torch.bincount(labels).max().item() / len(labels)
    assert accuracy > majority + 0.1, (accuracy, majority)


def test_pretraining_fine_tunes_copies_from_the_autoencoder_and_from_a_fresh_start(monkeypatch):
    args = ae.get_args(TINY + ["--pretrain-fractions", "0.1"])
    data = common.load_data(args)
    model = ae.build(args, 3)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    starts = []

    def record(encoder, data, labelled, args, device, seed):
        starts.append((labelled, encoder.stem[0].weight.detach().clone()))
        for p in encoder.parameters():        # what fine-tuning would do to it
            p.data.add_(1.0)
        return 0.5
    monkeypatch.setattr(ae, "finetune", record)
    table = ae.pretraining_table(model, data, args, "cpu")
    assert table == {"0.1": {"labels": 51, "pretrained": 0.5, "scratch": 0.5}}
    (n1, pretrained), (n2, scratch) = starts
    assert n1 == n2 == 51
    assert torch.equal(pretrained, before["stem.0.weight"]) and not torch.equal(scratch, pretrained)
    assert all(torch.equal(v, before[k]) for k, v in model.encoder.state_dict().items())   # the model is untouched


def test_the_command_line_writes_figures_tables_and_resumes(tmp_path):
    root = run_cli(tmp_path, "--steps", "10", "--eval-every", "5", "--name", "r")
    for f in ("restoration.png", "codes.png", "loss.png", "tables.md", "final.json", "args.json", "ckpt.pt"):
        assert (root / "r" / f).exists(), f
    final = json.loads((root / "r" / "final.json").read_text())
    assert set(final["per_distortion"]) == {"noise:0.2", "occlude:8", "brightness:0.3", "rotate:30", "hflip", "vflip"}
    assert set(final["pretraining"]) == {"0.1", "1"} and final["pretraining"]["0.1"]["labels"] == 51
    assert "| hflip |" in (root / "r" / "tables.md").read_text()
    run_cli(tmp_path, "--steps", "15", "--eval-every", "5", "--name", "r", "--resume", "--pretrain-fractions", "none")
    steps = [json.loads(line)["step"] for line in (root / "r" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 16))


@pytest.mark.parametrize("task, key", [("inpaint", "psnr_hole_out"), ("segment", "iou"), ("colorize", "psnr_out")])
def test_every_task_trains_and_reports(tmp_path, task, key):
    root = run_cli(tmp_path, "--task", task, "--steps", "4", "--eval-every", "4", "--name", task, "--latent-dim", "0",
                   "--skip", "concat", "--pretrain-fractions", "none")
    final = json.loads((root / task / "final.json").read_text())
    (item, scores), = final["per_distortion"].items()
    assert key in scores
    if task == "colorize":
        assert scores["psnr_in"] < 100                              # the grey input scored against the colours


def test_a_latent_dim_sweep_trains_each_value_once_then_reuses(tmp_path, capsys, monkeypatch):
    flags = ["--sweep", "latent_dim=1,2", "--steps", "4", "--eval-every", "4", "--pretrain-fractions", "none",
             "--distort", "none"]                                    # a plain autoencoder; a 1-d code is drawn too
    run_cli(tmp_path, *flags)
    root = tmp_path / "autoencoder" / "latent_dim-sweep"
    assert (root / "sweep.png").exists() and set(json.loads((root / "sweep.json").read_text())) == {"1", "2"}
    assert (root / "latent_dim1" / "codes.png").exists()
    assert "| 2 |" in capsys.readouterr().out

    def no_training(args):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(ae, "train", no_training)
    run_cli(tmp_path, *flags)
    with pytest.raises(SystemExit, match="was made with --distort none"):
        run_cli(tmp_path, *flags[:-1], "noise:0.3")                  # other flags under the same sweep name


@pytest.mark.parametrize("flags, message", [
    (["--task", "paint"], "unknown --task 'paint'"),
    (["--task", "segment", "--dataset", "cifar10"], "needs the masks"),
    (["--task", "inpaint", "--distort", "noise:0.1"], "needs occlude in every"),
    (["--skip", "sum"], "unknown --skip 'sum'"),
    (["--image-size", "18"], "divisible by"),
    (["--eval-every", "0"], "--eval-every >= 1"),
    (["--sweep", "channels=8,x"], "must be a int"),
    (["--sweep", "skip=none,sum"], "unknown --skip 'sum'"),
    (["--pretrain-fractions", "0,1"], "must lie in (0, 1]"),
    (["--sweep", "latent_dim=2,8", "--skip", "add"], "skips bypass the bottleneck"),
    (["--sweep", "lr=1,2"], "not supported")])
def test_bad_flags_get_one_line_errors(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)) as error:
        run_cli(tmp_path, "--steps", "2", *flags)
    assert "\n" not in str(error.value)


def test_eval_only_refuses_a_checkpoint_made_with_other_model_flags(tmp_path):
    run_cli(tmp_path, "--steps", "2", "--eval-every", "2", "--name", "m", "--pretrain-fractions", "none")
    with pytest.raises(SystemExit, match="was made with --skip none"):
        run_cli(tmp_path, "--eval-only", "--name", "m", "--skip", "add")
