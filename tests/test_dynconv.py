"""dynconv.py: the dynamic layer's shapes for any channels and sizes, that it is an ordinary convolution when its
generator says so, permutation invariance, what the channel path sees that a linear layer cannot, hand-counted
FLOPs, what the baselines fill in, that evaluation really drops channels, the channel draws, learning on tiny data,
determinism, exact resumption, the comparison files and the errors."""
import argparse
import json
import re

import pytest
import torch
import torch.nn.functional as F

import common
import dynconv as dc

CPU = torch.device("cpu")
TINY = ["--image-size", "16", "--split-sizes", "256,128,128", "--batch-size", "32", "--device", "cpu",
        "--width", "8", "--amp", "off"]


def model_args(**overrides):
    values = dict(model="dynamic", routing="softmax", prior="mean", set_norm=True, channel_path=True, width=8,
                  kernel_size=3, kernels=4, embed=8, hidden=16, image_size=16, wide_width=8)
    return argparse.Namespace(**{**values, **overrides})


def images(n=4, channels=3, size=16, seed=0):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the dynamic layer

@pytest.mark.parametrize("channels", [1, 2, 3, 5])
@pytest.mark.parametrize("size", [8, 16, 23])
def test_any_number_of_channels_and_any_size_gives_the_same_output_channels(channels, size):
    torch.manual_seed(0)
    layer = dc.DynamicConv2d(out_channels=6, kernel_size=3, identities=5, kernels=4, embed=8, hidden=16)
    ids = list(range(5))[-channels:]
    assert layer(images(2, channels, size), ids).shape == (2, 6, size, size)
    net = dc.build(model_args(), identities=5, num_classes=7)
    assert net(images(2, channels, size), ids).shape == (2, 7)


def set_to_plain_convolution(layer, conv):
    """Identity i embeds as one-hot e_i; hidden unit j = ReLU(e_c[j]) = [i_c = j]; logit k = 1e4 [i_c = k], so the
    softmax picks basis kernel i_c, which is set to the plain kernel's slice for input channel i_c."""
    g = layer.generator
    with torch.no_grad():
        for p in (g.embedding.weight, *g.attention.parameters()):
            p.zero_()
        g.embedding.weight[:, :3] = torch.eye(3)
        g.attention[0].weight[:3, :3] = torch.eye(3)                      # features start with e_c
        g.attention[2].weight[:3, :3] = 1e4 * torch.eye(3)
        g.basis.copy_(conv.weight.permute(1, 0, 2, 3))                    # (K = C_in, O, k, k)
        layer.bias.copy_(conv.bias)


def test_with_all_channels_and_one_hot_attention_it_is_a_plain_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1)
    layer = dc.DynamicConv2d(out_channels=6, kernel_size=3, identities=3, kernels=3, embed=4, hidden=8, prior="none")
    set_to_plain_convolution(layer, conv)
    x = images()
    kernels = layer.generator(x, torch.tensor([0, 1, 2]))
    assert torch.allclose(kernels, conv.weight.expand(4, -1, -1, -1, -1), atol=1e-6)
    assert torch.allclose(layer(x, [0, 1, 2]), conv(x), atol=1e-5)
    # and with channel G missing: the same kernels for R and B, summed, scaled by N / C = 3 / 2
    expected = 1.5 * F.conv2d(x[:, [0, 2]], conv.weight[:, [0, 2]], padding=1) + conv.bias[:, None, None]
    assert torch.allclose(layer(x[:, [0, 2]], [0, 2]), expected, atol=1e-5)


def test_permuting_channels_with_their_identities_changes_nothing_and_without_them_does():
    torch.manual_seed(0)
    net = dc.build(model_args(), identities=3, num_classes=5).eval()
    with torch.no_grad():
        net.stem.generator.gate.fill_(1.0)                     # the generated correction (g) and the channel path (g') on,
        net.stem.path.gate.fill_(1.0)                          # as after training
    x = images()
    reference = net(x, [0, 1, 2])
    for order in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):
        assert torch.allclose(net(x[:, order], order), reference, atol=1e-5)
    assert not torch.allclose(net(x[:, [2, 1, 0]], [0, 1, 2]), reference, atol=1e-3)
    assert torch.allclose(net(x[:, [2, 0]], [2, 0]), net(x[:, [0, 2]], [0, 2]), atol=1e-5)


def test_the_kernels_depend_on_which_channels_are_present():
    torch.manual_seed(0)
    layer = dc.DynamicConv2d(out_channels=4, kernel_size=3, identities=3, kernels=4, embed=8, hidden=16, prior="none")
    x = images()
    alone = layer.generator(x[:, [0]], torch.tensor([0]))[:, :, 0]
    with_g = layer.generator(x[:, [0, 1]], torch.tensor([0, 1]))[:, :, 0]
    assert not torch.allclose(alone, with_g, atol=1e-4)                           # the set context s moved it


def test_with_the_mean_prior_it_starts_as_a_convolution_of_the_mean_filled_input():
    """sum_{c in S} A_c x_c + sum_{m not in S} A_m mean_S(x) = sum_{c in S} (A_c + (1/C) sum_{m not in S} A_m) x_c,
    and the generated correction starts at zero (its gate does)."""
    torch.manual_seed(0)
    layer = dc.DynamicConv2d(out_channels=6, kernel_size=3, identities=3, kernels=4, embed=8, hidden=16, prior="mean")
    x = images()
    for order in dc.combinations(3) + [(2, 0), (1, 2, 0)]:
        filled = dc.fill_missing(x[:, list(order)], order, 3, "mean")
        expected = F.conv2d(filled, layer.weight, layer.bias, padding=1)
        assert torch.allclose(layer(x[:, list(order)], order), expected, atol=1e-5), order
    with torch.no_grad():
        layer.generator.gate.fill_(1.0)                                            # once it has learned something
    assert not torch.allclose(layer(x[:, [0]], [0]), F.conv2d(dc.fill_missing(x[:, [0]], [0], 3, "mean"),
                                                                layer.weight, layer.bias, padding=1), atol=1e-3)


def test_the_channel_path_ignores_each_channels_contrast_and_sees_what_a_sum_of_channels_cancels():
    """xhat_c = (x_c - mean) / (std + floor) does not change when a channel is scaled by a > 0 and shifted (up to the
    floor), so a faint channel counts as much as a strong one; and the ReLU comes before the channels are pooled,
    so a shape bright in R and dark in G, which cancels in R + G, still shows."""
    torch.manual_seed(0)
    path = dc.ChannelPath(out_channels=4, kernel_size=3, identities=3)
    with torch.no_grad():
        path.gate.fill_(1.0)
    x = images(2, 2)
    faint = x * torch.tensor([0.25, 3.0])[None, :, None, None] + torch.tensor([0.5, -0.2])[None, :, None, None]
    assert torch.allclose(path(faint, [0, 1]), path(x, [0, 1]), atol=5e-3)
    assert not torch.allclose(path(faint, [0, 1]), path(faint[:, [1, 0]], [0, 1]), atol=1e-3)   # V depends on i_c
    # a square, +1 in R and -1 in G on a flat background: R + G is flat, so a linear layer with the same kernel
    # for R and G gives a flat map
    square = torch.zeros(1, 2, 8, 8)
    square[0, 0, 2:6, 2:6], square[0, 1, 2:6, 2:6] = 1.0, -1.0
    kernel = torch.randn(4, 1, 3, 3)
    assert torch.allclose(F.conv2d(square.sum(1, keepdim=True), kernel, padding=1), torch.zeros(1, 4, 8, 8))
    with torch.no_grad():
        path.weight.copy_(kernel[:, 0].expand(3, -1, -1, -1))                  # the same kernel for every identity
    assert path(square, [0, 1]).std() > 0.1
    flat = torch.cat([square[:, :1], torch.full((1, 1, 8, 8), 0.3)], 1)          # a constant channel: no shape in it
    assert torch.allclose(path(flat, [0, 1]), (path(square[:, :1], [0]) + F.relu(path.bias[1])[:, None, None]) / 2,
                          atol=1e-4)


def test_the_layer_adds_the_channel_path_to_its_linear_part():
    torch.manual_seed(0)
    layer = dc.DynamicConv2d(out_channels=6, kernel_size=3, identities=3, kernels=4, embed=8, hidden=16)
    with torch.no_grad():
        layer.path.gate.fill_(1.0)
    x = images()[:, [2, 0]]
    linear = F.conv2d(dc.fill_missing(x, [2, 0], 3, "mean"), layer.weight, layer.bias, padding=1)   # g = 0
    expected = linear + sum(F.relu(F.conv2d((x[:, [c]] - x[:, [c]].mean((2, 3), keepdim=True))
                                            / (x[:, [c]].flatten(1).std(1)[:, None, None, None] + dc.STD_FLOOR),
                                            layer.path.weight[i][:, None], layer.path.bias[i], padding=1))
                            for c, i in enumerate([2, 0])) / 2
    assert torch.allclose(layer(x, [2, 0]), expected, atol=1e-5)


def test_set_batch_norm_keeps_running_statistics_per_set_of_channels():
    norm = dc.SetBatchNorm(4, identities=3)
    x = images(8, 4) * 3 + 2
    norm.train()
    norm(x, [2, 0])                                                               # a batch with R and B
    moved = {name for name, bn in norm.norms.items() if not torch.equal(bn.running_mean, torch.zeros(4))}
    assert moved == {"RB"}
    norm.eval()
    assert not torch.allclose(norm(x, [0, 2]), norm(x, [0]))                       # RB's statistics, not R's
    assert torch.allclose(norm(x, [0, 2]), norm(x, [2, 0]))


def test_flop_counts_match_a_hand_count():
    """One image, C = 2 of N = 3 channels, O = 4, k = 3, K = 2, d = 5, h = 6, 7 x 7 pixels, 10 classes."""
    torch.manual_seed(0)
    args = model_args(width=4, kernels=2, embed=5, hidden=6, image_size=7)
    net = dc.build(args, identities=3, num_classes=10)
    C, O, k, K, d, h, HW = 2, 4, 3, 2, 5, 6, 7 * 7
    generator = 2 * C * ((2 * d + 2) * h + h * K) + 2 * C * K * O * k * k
    first = 2 * O * C * k * k * HW + 2 * O * C * k * k * HW                      # the convolution and the channel path
    counted = dc.flops(net, (0, 2), 7, "cpu")
    assert counted["generator_flops"] == generator
    backbone = dc.flops(dc.build(argparse.Namespace(**{**vars(args), "model": "zero"}), 3, 10), (0, 2), 7, "cpu")
    plain_first = 2 * O * 3 * k * k * HW                                          # the zero-filled conv sees N = 3
    assert counted["backbone_flops"] - first == backbone["backbone_flops"] - plain_first
    assert backbone["generator_flops"] == 0


def test_parameter_counts_separate_the_generator():
    args = model_args()
    N, d, h, K, O, k = 3, 8, 16, 4, 8, 3
    plain = dc.parameter_counts(dc.build(model_args(model="zero"), 3, 10))
    for prior, static in (("mean", O * N * k * k), ("none", 0)):                 # A is an ordinary conv's kernel
        counts = dc.parameter_counts(dc.build(model_args(prior=prior), 3, 10))
        gate = prior == "mean"
        assert counts["generator"] == N * d + (2 * d + 2) * h + h + h * K + K + K * O * k * k + gate
        path = N * O * k * k + N * O + 1                                          # V, v and the gate g'
        assert counts["backbone"] == plain["stored"] - O * N * k * k + static + path
        without = dc.parameter_counts(dc.build(model_args(prior=prior, channel_path=False), 3, 10))
        assert without["backbone"] == counts["backbone"] - path
    per = dc.parameter_counts(dc.PerCombination(args, 3, 10))
    assert per["stored"] == 7 * (plain["stored"] - O * N * k * k) + O * k * k * (3 + 3 * 2 + 3 * 1)   # sum of |S|


# ----------------------------------------------------------------------------- the baselines and the evaluation

def test_zero_filling_rescales_the_present_channels_and_mean_filling_copies_their_mean():
    x = images(2, 2)
    zero = dc.fill_missing(x, [2, 0], 3, "zero")
    assert torch.equal(zero[:, 1], torch.zeros_like(zero[:, 1]))
    assert torch.allclose(zero[:, [2, 0]], 1.5 * x)                                # N / C = 3 / 2
    mean = dc.fill_missing(x, [2, 0], 3, "mean")
    assert torch.allclose(mean[:, [2, 0]], x) and torch.allclose(mean[:, 1], x.mean(1))
    assert torch.equal(dc.fill_missing(images(), [0, 1, 2], 3, "zero"), images())


def test_per_combination_routes_each_subset_to_its_own_network_in_canonical_order():
    torch.manual_seed(0)
    model = dc.PerCombination(model_args(), 3, 5).eval()
    x = images(2, 2)
    assert torch.allclose(model(x, [2, 0]), model.nets["RB"](x[:, [1, 0]]))
    assert torch.allclose(model(x, [0, 2]), model.nets["RB"](x))


def test_the_rgb_only_networks_get_all_channels_in_canonical_order():
    torch.manual_seed(0)
    wide = dc.build(model_args(model="wide"), 3, 10).eval()
    x = images()
    assert torch.allclose(wide(x[:, [2, 0, 1]], [2, 0, 1]), wide.net(x), atol=1e-6)


class Recorder(torch.nn.Module):
    """A 'model' that keeps what it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, ids):
        self.seen.append((x.clone(), list(ids)))
        return torch.zeros(len(x), 2)


def test_evaluation_really_drops_the_channels_it_names():
    x = images(6)
    loader = [(x, torch.zeros(6, dtype=torch.long))]
    model = Recorder()
    dc.evaluate(model, loader, (2,), CPU)
    seen, ids = model.seen[-1]
    assert seen.shape[1] == 1 and torch.equal(seen, x[:, [2]]) and ids == [2]
    dc.evaluate(model, loader, (2, 1, 0), CPU, ids=(0, 1, 2))               # read positionally
    seen, ids = model.seen[-1]
    assert torch.equal(seen, x[:, [2, 1, 0]]) and ids == [0, 1, 2]


def test_channel_draws_keep_all_with_probability_one_minus_p_and_otherwise_a_proper_subset():
    g = torch.Generator().manual_seed(0)
    draws = [dc.draw_channels(3, 0.75, g) for _ in range(4000)]
    full = sum(len(d) == 3 for d in draws) / len(draws)
    assert abs(full - 0.25) < 0.03
    proper = [tuple(sorted(d)) for d in draws if len(d) < 3]
    for combo in dc.combinations(3)[1:]:                                    # each of the 6 about equally often
        assert abs(proper.count(combo) / len(proper) - 1 / 6) < 0.03
    assert all(len(set(d)) == len(d) for d in draws)
    assert {tuple(sorted(dc.draw_channels(3, 0.0, g))) for _ in range(50)} == {(0, 1, 2)}
    assert all(len(dc.draw_channels(3, 1.0, g)) < 3 for _ in range(50))


def test_augmentation_flips_and_crops_each_image_from_its_padded_self():
    x = images(8)
    out = dc.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(8):
        windows = [padded[i, :, r:r + 16, c:c + 16] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_the_temperature_anneals_from_its_start_to_one_over_the_first_tenth():
    net = dc.build(model_args(), 3, 10)
    for step, expected in ((0, 30.0), (50, 15.5), (100, 1.0), (900, 1.0)):
        dc.set_temperature(net, step, 1000, 30.0)
        assert net.stem.generator.temperature == pytest.approx(expected)


def test_the_combinations_are_every_non_empty_subset_largest_first():
    assert [dc.combination_name(c, 3) for c in dc.combinations(3)] == ["RGB", "RG", "RB", "GB", "R", "G", "B"]
    assert len(dc.combinations(4)) == 15


# ----------------------------------------------------------------------------- training through the command line

def run_cli(tmp_path, *flags):
    return dc.main([*TINY, "--out", str(tmp_path), *flags])


def test_the_dynamic_model_learns_shapes_and_is_told_apart_from_chance(tmp_path):
    results = run_cli(tmp_path, "--models", "dynamic", "--steps", "150", "--eval-every", "75", "--name", "learn",
                      "--split-sizes", "1024,256,256", "--no-augment", "--channel-dropout", "0.5", "--lr", "5e-3")
    final = results["dynamic"]
    records = [json.loads(line) for line in (tmp_path / "dynconv/learn/dynamic/metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert sum(train[-20:]) / 20 < 0.75 * sum(train[:20]) / 20
    assert final["accuracy"]["RGB"] > 0.3                                           # ten classes: chance is 0.1
    assert set(final["accuracy"]) == {"RGB", "RG", "RB", "GB", "R", "G", "B"}
    assert final["accuracy"]["R"] > 0.15                                           # R alone, after 150 steps


def test_every_combination_trains_the_shared_network_on_the_mean_of_all_seven_losses(tmp_path):
    torch.manual_seed(0)
    net = dc.build(model_args(), 3, 10)               # training mode: each call normalises by its own batch
    with torch.no_grad():
        net.backbone.body[-1].weight.mul_(30)         # logits far from 0, so the subsets' losses differ clearly
    x, y = images(6), torch.arange(6)
    every = argparse.Namespace(model="dynamic", every_combination=True)
    drawn = argparse.Namespace(model="dynamic", every_combination=False)
    with torch.no_grad():
        expected = sum(F.cross_entropy(net(x[:, list(c)], c), y) for c in dc.combinations(3)).item() / 7
        assert dc.training_loss(net, x, y, (2, 0), every).item() == pytest.approx(expected, rel=1e-5)
        one = dc.training_loss(net, x, y, (2, 0), drawn).item()
    assert one == pytest.approx(F.cross_entropy(net(x[:, [2, 0]], (2, 0)), y).item(), rel=1e-5)
    assert abs(one - expected) > 0.1
    run_cli(tmp_path, "--models", "zero", "--steps", "4", "--eval-every", "4", "--name", "every", "--every-combination")
    records = [json.loads(line) for line in (tmp_path / "dynconv/every/zero/metrics.jsonl").read_text().splitlines()]
    assert [r["channels"] for r in records if r["split"] == "train"] == [3] * 4      # no subset was drawn


def test_training_is_deterministic_and_a_killed_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    flags = ["--models", "dynamic", "zero", "--steps", "6", "--eval-every", "3"]
    straight = run_cli(tmp_path, *flags, "--name", "a")
    again = run_cli(tmp_path, *flags, "--name", "b")
    for model in ("dynamic", "zero"):
        assert straight[model]["accuracy"] == again[model]["accuracy"]
        assert straight[model]["test_loss"] == again[model]["test_loss"]

    save = common.Run.save_checkpoint

    def save_then_die(self, step, **state):
        save(self, step, **state)
        if step == 3:
            raise KeyboardInterrupt                                          # killed after its first checkpoint
    monkeypatch.setattr(common.Run, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_cli(tmp_path, *flags, "--name", "c")
    monkeypatch.setattr(common.Run, "save_checkpoint", save)
    capsys.readouterr()
    resumed = run_cli(tmp_path, *flags, "--name", "c")                       # picks up dynamic at step 3
    assert f"resuming {tmp_path / 'dynconv' / 'c' / 'dynamic'} at step 3" in capsys.readouterr().out
    for model in ("dynamic", "zero"):
        assert resumed[model]["test_loss"] == straight[model]["test_loss"]
    a = torch.load(tmp_path / "dynconv/a/dynamic/ckpt.pt", weights_only=False)["model"]
    c = torch.load(tmp_path / "dynconv/c/dynamic/ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_the_comparison_writes_its_tables_and_chart_and_reuses_finished_models(tmp_path, capsys):
    run_cli(tmp_path, "--models", "dynamic", "zero", "mean", "per-combination", "--steps", "2", "--eval-every", "2",
            "--name", "cmp")
    root = tmp_path / "dynconv" / "cmp"
    table = (root / "comparison.md").read_text()
    for expected in ("| dynamic |", "| per-combination |", "mean with channels missing", "FLOPs generator"):
        assert expected in table
    assert (root / "accuracy.png").stat().st_size > 1000 and (root / "dynamic" / "curves.png").exists()
    final = json.loads((root / "per-combination" / "final.json").read_text())
    assert final["parameters"]["generator"] == 0 and set(final["cost"]) == set(final["accuracy"])
    capsys.readouterr()
    run_cli(tmp_path, "--models", "zero", "--steps", "2", "--eval-every", "2", "--name", "cmp")
    assert "dynconv zero" not in capsys.readouterr().err                     # reused, not trained again
    with pytest.raises(SystemExit, match=re.escape("was made with --width 8; this sweep has 4")):
        run_cli(tmp_path, "--models", "zero", "--steps", "2", "--eval-every", "2", "--name", "cmp", "--width", "4")


def test_the_second_task_reports_the_accuracy_ratio(tmp_path):
    results = run_cli(tmp_path, "--models", "resnet34", "wide", "--steps", "1", "--eval-every", "1", "--name", "two")
    assert set(results["wide"]["accuracy"]) == {"RGB"}
    table = (tmp_path / "dynconv" / "two" / "comparison.md").read_text()
    ratio = results["wide"]["accuracy"]["RGB"] / results["resnet34"]["accuracy"]["RGB"]
    assert f"wide reaches {ratio:.1%} of resnet34's test accuracy" in table
    assert results["resnet34"]["parameters"]["stored"] > 21_000_000                # torchvision's ResNet-34


@pytest.mark.parametrize("flags, message", [
    (["--models", "dynamic", "vit"], "unknown --models vit; choose from"),
    (["--models", "zero", "zero"], "--models lists a model twice"),
    (["--channel-dropout", "1.5"], "--channel-dropout is a probability, got 1.5"),
    (["--kernel-size", "4"], "--kernel-size must be odd"),
    (["--temperature", "0.5"], "--temperature is where annealing to 1.0 starts"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--lr", "-1"], "--lr must not be negative, got -1.0"),
    (["--split-sizes", "64,0,64"], "--split-sizes takes three positive counts"),
    (["--resume"], "--resume needs the --name of the comparison"),
    (["--dataset", "list", "--data-dir", "/nonexistent"], "--data-dir /nonexistent is not a directory"),
])
def test_bad_flags_get_one_line_errors(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_cli(tmp_path, "--steps", "2", *flags)


def test_bad_channel_identities_and_missing_channels_for_rgb_models_get_clear_errors():
    layer = dc.DynamicConv2d(out_channels=4, kernel_size=3, identities=3)
    with pytest.raises(SystemExit, match="one distinct channel identity per input channel"):
        layer(images(2, 2), [0, 0])
    with pytest.raises(SystemExit, match="one distinct channel identity per input channel"):
        layer(images(2, 2), [0, 1, 2])
    with pytest.raises(SystemExit, match=re.escape("channel identities run from 0 to 2, got [0, 3]")):
        layer(images(2, 2), [0, 3])
    wide = dc.build(model_args(model="wide"), 3, 10)
    with pytest.raises(SystemExit, match="trained on all channels only"):
        wide(images(2, 2), [0, 1])


def test_a_checkpoint_of_other_model_flags_is_refused(tmp_path):
    run_cli(tmp_path, "--models", "zero", "--steps", "4", "--eval-every", "2", "--name", "m")
    args = dc.get_args([*TINY, "--out", str(tmp_path), "--steps", "4", "--width", "4"])
    args.model, args.name, args.resume = "zero", "m/zero", True
    with pytest.raises(SystemExit, match=re.escape("was made with --width 8; this run has --width 4")):
        dc.train(args)
