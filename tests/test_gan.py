"""gan.py and cgan.py: the objectives against their formulas, gradient behaviour, spectral norm, R1, latent paths,
learning on tiny data, the condition's effect, determinism, checkpoints and the command line. Tests that hold for
both files are parametrised over them, so a fix in one copy cannot silently miss the other."""
import argparse
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cgan
import common
import gan

BOTH = pytest.mark.parametrize("module", [gan, cgan], ids=["gan", "cgan"])
K = 10          # classes of the embedded shapes set


@pytest.fixture(autouse=True)
def quick_reference_classifier(monkeypatch):
    """The command-line tests measure samples with a reference classifier; a few steps of it are enough here."""
    monkeypatch.setitem(common.CLASSIFIER_STEPS, "shapes", 30)


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


L_REAL, L_FAKE = [0.5, -1.0, 2.0], [-0.3, 1.2, 0.0]
EXPECTED = {    # by hand, from the module docstring's table
    "minimax": (sum(-math.log(sigmoid(r)) for r in L_REAL) / 3 + sum(-math.log(1 - sigmoid(f)) for f in L_FAKE) / 3,
                sum(math.log(1 - sigmoid(f)) for f in L_FAKE) / 3),
    "nonsat": (sum(-math.log(sigmoid(r)) for r in L_REAL) / 3 + sum(-math.log(1 - sigmoid(f)) for f in L_FAKE) / 3,
               sum(-math.log(sigmoid(f)) for f in L_FAKE) / 3),
    "hinge": (sum(max(0, 1 - r) for r in L_REAL) / 3 + sum(max(0, 1 + f) for f in L_FAKE) / 3,
              -sum(L_FAKE) / 3),
    "ls": (sum(0.5 * (r - 1) ** 2 for r in L_REAL) / 3 + sum(0.5 * f ** 2 for f in L_FAKE) / 3,
           sum(0.5 * (f - 1) ** 2 for f in L_FAKE) / 3),
}


@BOTH
@pytest.mark.parametrize("kind", gan.LOSSES)
def test_each_loss_equals_its_formula(module, kind):
    l_real, l_fake = torch.tensor(L_REAL), torch.tensor(L_FAKE)
    d_expected, g_expected = EXPECTED[kind]
    assert module.d_loss(l_real, l_fake, kind).item() == pytest.approx(d_expected, rel=1e-5)
    assert module.g_loss(l_fake, kind).item() == pytest.approx(g_expected, rel=1e-5)


@BOTH
def test_zero_logits_and_label_smoothing(module):
    zeros = torch.zeros(5)
    assert module.d_loss(zeros, zeros, "nonsat").item() == pytest.approx(2 * math.log(2))   # two batch means added
    # one-sided smoothing: the real term is the BCE against 0.9, minimal at sigmoid(l) = 0.9; fakes keep target 0
    l = torch.tensor([math.log(9)])                                            # sigmoid = 0.9
    real_term = module.d_loss(l, torch.full((1,), -50.0), "nonsat", real_target=0.9).item()
    assert real_term == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), rel=1e-5)
    assert module.d_loss(l + 0.1, torch.full((1,), -50.0), "nonsat", real_target=0.9).item() > real_term


@BOTH
def test_the_non_saturating_gradient_survives_where_the_minimax_one_vanishes(module):
    """Early in training D rejects fakes confidently (l_fake << 0): log(1 - D) is flat there, -log D is not."""
    grads = {}
    for kind in ("minimax", "nonsat"):
        l_fake = torch.full((4,), -10.0, requires_grad=True)
        module.g_loss(l_fake, kind).backward()
        grads[kind] = l_fake.grad.abs().sum().item()
    assert grads["minimax"] == pytest.approx(sigmoid(-10), rel=1e-3)      # about 4.5e-5
    assert grads["nonsat"] == pytest.approx(1 - sigmoid(-10), rel=1e-3)   # about 1
    # the two generator losses move l_fake the same way: both gradients are negative
    for kind in ("minimax", "nonsat"):
        l_fake = torch.zeros(2, requires_grad=True)
        module.g_loss(l_fake, kind).backward()
        assert (l_fake.grad < 0).all()


def test_ac_gan_cross_entropy_takes_logits_not_probabilities():
    """A softmax before the cross-entropy would bound the loss below by log(1 + (K-1)/e) > 0 (PITFALLS)."""
    logits = torch.zeros(1, K)
    logits[0, 3] = 30.0
    c = common.one_hot(torch.tensor([3]), K)
    assert cgan.class_loss(logits, c).item() < 1e-6
    y = torch.randint(0, K, (6,))
    logits = torch.randn(6, K)
    assert torch.allclose(cgan.class_loss(logits, common.one_hot(y, K)), F.cross_entropy(logits, y))


@BOTH
def test_spectral_norm_keeps_the_top_singular_value_near_one(module):
    torch.manual_seed(0)
    kwargs = dict(num_classes=K) if module is cgan else {}
    D = module.Discriminator(image_size=16, channels=8, spectral_norm=True, **kwargs).train()
    args = (torch.randn(16, 3, 16, 16),) + ((common.one_hot(torch.arange(16) % K, K),) if module is cgan else ())
    with torch.no_grad():
        for _ in range(30):               # each training-mode forward runs one power iteration per layer
            D(*args)
    D.eval()
    layers = [m for m in D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) >= 3
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.02)
        raw = torch.linalg.matrix_norm(m.parametrizations.weight.original.detach().flatten(1), ord=2).item()
        assert abs(raw - 1) > 0.1          # the normalisation did something


@BOTH
def test_r1_penalty_of_a_linear_discriminator_is_its_squared_weight_norm(module):
    w = torch.randn(3 * 4 * 4)

    def linear_d(x, *c):
        logit = x.flatten(1) @ w
        return (logit, None) if module is cgan else logit

    x = torch.randn(5, 3, 4, 4)
    penalty, *_ = module.r1_penalty(linear_d, x, common.one_hot(torch.zeros(5, dtype=torch.long), K)) \
        if module is cgan else module.r1_penalty(linear_d, x)
    assert penalty.item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


def test_interpolation_paths():
    torch.manual_seed(0)
    z1, z2 = torch.randn(100), torch.randn(100)
    alphas = torch.linspace(0, 1, 11)
    for path in (gan.lerp, gan.slerp):
        zs = path(z1, z2, alphas)
        assert torch.allclose(zs[0], z2, atol=1e-5) and torch.allclose(zs[-1], z1, atol=1e-5)
    # orthogonal ends of equal norm: the chord's midpoint is 1/sqrt(2) as long, the arc's keeps the norm
    e1, e2 = torch.zeros(100), torch.zeros(100)
    e1[0], e2[1] = 10.0, 10.0
    half = torch.tensor([0.5])
    assert gan.lerp(e1, e2, half).norm().item() == pytest.approx(10 / math.sqrt(2), rel=1e-5)
    assert gan.slerp(e1, e2, half).norm().item() == pytest.approx(10.0, rel=1e-5)
    assert torch.allclose(gan.slerp(e1, e2, half)[0, :2], torch.tensor([10 / math.sqrt(2)] * 2), atol=1e-4)


def test_projection_discriminator_is_linear_in_the_condition():
    """D(x, c) = psi(phi(x)) + (V^T c) . sum phi(x): a mix of two one-hots gives the mix of their logits, and the
    difference between two classes is (V_a - V_b) . sum phi(x)."""
    torch.manual_seed(0)
    D = cgan.Discriminator(K, image_size=16, channels=8, d_cond="projection").eval()
    x = torch.randn(1, 3, 16, 16)
    e = common.one_hot(torch.arange(K), K)
    with torch.no_grad():
        la, lb, lmix = (D(x, c[None])[0] for c in (e[2], e[5], 0.3 * e[2] + 0.7 * e[5]))
        pooled = D.features(x).sum(dim=(2, 3))[0]
        V = D.embed.weight                                           # (features, K)
    assert torch.allclose(lmix, 0.3 * la + 0.7 * lb, atol=1e-5)
    assert torch.allclose(la - lb, (V[:, 2] - V[:, 5]) @ pooled, atol=1e-4)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_network_shapes_and_output_range(size):
    G, D = gan.Generator(size, latent_dim=10, channels=8), gan.Discriminator(size, channels=8)
    x = G(torch.randn(3, 10))
    assert x.shape == (3, 3, size, size) and x.abs().max() <= 1
    assert D(x).shape == (3,)
    Gc = cgan.Generator(K, size, latent_dim=10, channels=8, g_cond="concat")
    Dc = cgan.Discriminator(K, size, channels=8, d_cond="acgan")
    logit, class_logits = Dc(Gc(torch.randn(3, 10), common.one_hot(torch.arange(3), K)), common.one_hot(torch.arange(3), K))
    assert logit.shape == (3,) and class_logits.shape == (3, K)


@BOTH
@pytest.mark.parametrize("size", [16, 32, 64])
def test_output_layer_reads_full_or_half_resolution_features(module, size):
    """--g-out conv (SNGAN's standard CNN): G's last hidden layer is already at the image's size and a 3x3
    convolution draws the image from it; deconv (DCGAN's): the last hidden layer is at half the size and a transposed
    convolution draws the image."""
    for out, hidden, layer in (("conv", size, nn.Conv2d), ("deconv", size // 2, nn.ConvTranspose2d)):
        args = module.get_args(["--image-size", str(size), "--latent-dim", "10", "--g-channels", "8", "--g-out", out])
        G = module.build(args, K, 3)[0] if module is cgan else module.build(args, 3)[0]
        seen = []
        last_norm = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        last_norm.register_forward_hook(lambda m, inputs, output: seen.append(output.shape[-1]))
        z = torch.randn(2, 10)
        x = G(z, common.one_hot(torch.arange(2), K)) if module is cgan else G(z)
        assert x.shape == (2, 3, size, size) and x.abs().max() <= 1
        output_layer = [m for m in G.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
        assert seen == [hidden] and type(output_layer) is layer


@BOTH
def test_checkpoint_from_before_g_out_loads_as_deconv(module, tmp_path):
    """A checkpoint whose args lack g_out (made before the flag) is DCGAN's output layer: it loads with
    --g-out deconv, and without that flag the run stops with a one-line error naming it."""
    module.train(module.get_args(cli(tmp_path, "--steps", "2", "--eval-every", "2", "--g-out", "deconv",
                                     "--fid-samples", "0")))
    path = tmp_path / module.__name__ / "t" / "ckpt.pt"
    state = torch.load(path, weights_only=False)
    del state["args"]["g_out"]
    torch.save(state, path)
    module.main(cli(tmp_path, "--sample-only", "--g-out", "deconv", "--fid-samples", "0"))
    with pytest.raises(SystemExit, match="was made with --g-out deconv; this run has --g-out conv"):
        module.main(cli(tmp_path, "--sample-only"))


def test_default_parameter_counts():
    for g_out, g_parameters in (("deconv", 1_068_931), ("conv", 1_099_555)):     # deconv: older checkpoints' layout
        G, D = gan.build(gan.get_args(["--g-out", g_out]), 3)
        assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (g_parameters,
                                                                                                     663_361)
    for g_out, g_parameters in (("deconv", 364_547), ("conv", 399_267)):     # deconv: what older checkpoints hold
        G, D = cgan.build(cgan.get_args(["--g-out", g_out]), K, 3)
        assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (g_parameters,
                                                                                                     576_139)


def tiny_data(n=64, size=16):
    """Class 0 a red square on black, class 1 a blue one; the cGAN must learn which colour goes with which label."""
    x = torch.full((n, 3, size, size), -1.0)
    y = torch.arange(n) % 2
    x[:, :, 4:12, 4:12] = torch.where(y[:, None, None, None] == 0, torch.tensor([0.9, -0.9, -0.9])[:, None, None],
                                      torch.tensor([-0.9, -0.9, 0.9])[:, None, None])
    return x, y


def tiny_args(module, **overrides):
    args = module.get_args(["--image-size", "16", "--latent-dim", "16", "--g-channels", "16", "--d-channels", "16",
                            "--amp", "off"])      # float32: these tests compare with exact formulas
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@BOTH
def test_a_few_steps_move_the_samples_towards_the_data(module):
    """Starting from grey noise, 150 G steps bring the samples' mean image close to the tiny dataset's."""
    torch.manual_seed(0)
    x, y = tiny_data()
    args = tiny_args(module, lr=1e-3, lr_d=1e-3)
    G, D = module.build(args, 2, 3) if module is cgan else module.build(args, 3)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(0.5, 0.999))
    c = common.one_hot(y, 2)

    def mean_image_error():
        with torch.no_grad():
            fake = G.eval()(torch.randn(256, 16), common.one_hot(torch.arange(256) % 2, 2)) if module is cgan \
                else G.eval()(torch.randn(256, 16))
        G.train()
        return (fake.mean(0) - x.mean(0)).abs().mean().item()

    before = mean_image_error()
    for _ in range(150):
        if module is cgan:
            module.d_step(G, D, opt_d, x, c, args, 0.0)
            module.g_step(G, D, opt_g, c, args, 0.0)
        else:
            module.d_step(G, D, opt_d, x, args, 0.0)
            module.g_step(G, D, opt_g, len(x), args, 0.0, x.device)
    assert mean_image_error() < 0.4 * before


@pytest.mark.parametrize("g_cond, d_cond", [("cbn", "projection"), ("concat", "concat"), ("cbn", "acgan")])
def test_the_condition_steers_the_generator_to_its_class(g_cond, d_cond):
    """After training on red-for-0 / blue-for-1, samples for label 0 are redder than bluer and those for 1 the
    opposite."""
    torch.manual_seed(0)
    x, y = tiny_data()
    args = tiny_args(cgan, g_cond=g_cond, d_cond=d_cond, lr=1e-3, lr_d=1e-3)
    G, D = cgan.build(args, 2, 3)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(0.5, 0.999))
    c = common.one_hot(y, 2)
    for _ in range(200):
        cgan.d_step(G, D, opt_d, x, c, args, 0.0)
        cgan.g_step(G, D, opt_g, c, args, 0.0)
    z = torch.randn(64, 16)
    with torch.no_grad():
        red_minus_blue = [(lambda im: (im[:, 0] - im[:, 2]).mean().item())(G.eval()(z, common.one_hot(
            torch.full((64,), label), 2))) for label in (0, 1)]
    assert red_minus_blue[0] > 0.3 and red_minus_blue[1] < -0.3


def test_discriminator_alone_separates_and_generator_alone_fools_a_frozen_d():
    torch.manual_seed(0)
    x, _ = tiny_data()
    args = tiny_args(gan)
    G, D = gan.build(args, 3)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    for _ in range(30):
        stats = gan.d_step(G, D, opt_d, x, args, 0.0)
    assert stats["d_acc"].item() == 1.0 and stats["loss_d"].item() < 0.1
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    frozen = copy.deepcopy(D.state_dict())
    losses = [gan.g_step(G, D, opt_g, len(x), args, 0.0, x.device)["loss_g"].item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    weights = [k for k, _ in D.named_parameters()]                 # G's steps leave D's weights as they were
    assert all(torch.equal(frozen[k], D.state_dict()[k]) for k in weights)
    assert all(p.requires_grad for p in D.parameters())


def test_balance_monitor_warns_when_d_wins_and_when_diversity_collapses(capsys):
    monitor = gan.BalanceMonitor(real_diversity=10.0)
    for step in range(gan.WIN_STEPS - 1):
        monitor.d_step(step, 1.0)
    assert "wins outright" not in capsys.readouterr().out
    monitor.d_step(gan.WIN_STEPS, 1.0)
    monitor.d_step(gan.WIN_STEPS + 1, 1.0)
    assert capsys.readouterr().out.count("wins outright") == 1      # once per episode
    assert monitor.diversity(100, 2.0) == pytest.approx(0.2)        # low from the start: no drop, no warning
    monitor.diversity(200, 8.0)
    monitor.diversity(300, 7.0)
    assert "collapse" not in capsys.readouterr().out
    monitor.diversity(400, 3.0)                                     # below half of the best, 0.8
    assert "fell to 0.30 of the data's, from 0.80" in capsys.readouterr().out


def test_cgan_monitor_warns_when_the_classes_differ_but_their_samples_do_not(capsys):
    """A G that draws one image per class keeps the diversity over all classes at the data's (the classes differ):
    cgan's monitor also compares the diversity within classes with it, and warns once per episode."""
    monitor = cgan.BalanceMonitor(real_diversity=10.0, real_within_class=8.0)
    assert monitor.diversity(100, 10.0, 6.0) == pytest.approx((1.0, 0.75))
    assert "whatever z" not in capsys.readouterr().out
    assert monitor.diversity(200, 10.0, 1.6) == pytest.approx((1.0, 0.2))     # 0.2 < 0.25 x 1.0
    assert "within-class diversity 0.20 of the data's, 1.00 over all classes" in capsys.readouterr().out
    monitor.diversity(300, 10.0, 1.6)
    assert "whatever z" not in capsys.readouterr().out                        # the same episode
    monitor.diversity(400, 10.0, 4.0)                                         # 0.5: over
    monitor.diversity(500, 4.0, 0.4)                                          # 0.05 < 0.25 x 0.4: a new episode
    assert capsys.readouterr().out.count("whatever z") == 1
    # shares of the data's are compared, not raw distances: the data's own classes may be alike within
    monitor = cgan.BalanceMonitor(real_diversity=10.0, real_within_class=2.0)
    assert monitor.diversity(100, 10.0, 1.6) == pytest.approx((1.0, 0.8))     # raw: 1.6 < 0.25 x 10
    assert "whatever z" not in capsys.readouterr().out


def test_cgan_training_feeds_the_monitor_the_fixed_samples_diversity_within_classes(tmp_path, monkeypatch, capsys):
    """One latent for all the fixed samples (as from a G that ignores z): each class is one image repeated, so
    their diversity within classes is 0 and the run warns, while over all classes it is not 0."""
    monkeypatch.setattr(cgan, "MONITOR_EVERY", 1)
    monkeypatch.setattr(cgan, "latents", lambda n, dim, seed, device="cpu": torch.zeros(n, dim, device=device))
    cgan.train(cgan.get_args(cli(tmp_path, "--steps", "2", "--eval-every", "2", "--fid-samples", "0")))
    assert "G drawing one image per class whatever z" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "cgan" / "t" / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in rows if "within_class_pixel_diversity" in r]
    assert len(checks) == 2 and all(r["within_class_pixel_diversity"] < 1e-6 for r in checks)
    assert all(r["pixel_diversity"] > 0 for r in checks)


def test_within_class_diversity_is_nan_without_two_images_of_a_class():
    assert math.isnan(cgan.within_class_diversity(torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2])))


def test_the_monitors_real_images_are_a_seeded_sample_of_every_class_of_a_split_stored_class_by_class():
    labels = torch.arange(10).repeat_interleave(100)                 # 1,000 images, class by class
    split = common.ImageArray(labels.to(torch.uint8)[:, None, None, None].expand(-1, 1, 2, 2), labels)
    images, sampled = cgan.random_images(split, 100)
    assert len(sampled) == 100 and len(sampled.unique()) == 10
    assert torch.equal(images[:, 0, 0, 0], sampled.float() / 127.5 - 1)          # each image with its own label
    assert torch.equal(cgan.random_images(split, 100)[1], sampled)
    assert len(cgan.random_images(split, 5000)[1]) == 1000


@BOTH
def test_instance_noise_and_ema(module):
    torch.manual_seed(0)
    x = torch.zeros(100_000)
    assert module.with_noise(x, 0.0) is x
    assert module.with_noise(x, 0.3).std().item() == pytest.approx(0.3, rel=0.02)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    module.update_ema(a, b, 0.0)
    assert torch.equal(a.weight, b.weight)


def cli(tmp_path, *extra):
    return ["--image-size", "16", "--latent-dim", "8", "--g-channels", "8", "--d-channels", "8",
            "--split-sizes", "64,32,32", "--batch-size", "16", "--fid-samples", "40", "--out", str(tmp_path),
            "--name", "t", *extra]


@BOTH
def test_sampling_is_deterministic_under_a_seed(module, tmp_path):
    run, ema, *_ = module.train(module.get_args(cli(tmp_path, "--steps", "2", "--eval-every", "2")))
    if module is cgan:
        c = common.one_hot(torch.arange(6) % K, K)
        a, again, other = (cgan.generate(ema, c, s, "cpu") for s in (1, 1, 2))
    else:
        a, again, other = (gan.generate(ema, 6, s, "cpu") for s in (1, 1, 2))
    assert torch.equal(a, again) and not torch.equal(a, other)


@pytest.mark.parametrize("d_cond", ["acgan", "projection", "concat"])
def test_pick_keeps_the_candidate_d_calls_its_class_most_clearly(d_cond):
    """--pick n: candidate j of every sample is G's image for the j-th draw of one latent stream seeded with the
    seed (the first draw is generate's), and the sample kept is the candidate with the largest margin of D's class
    evidence, in eval mode, for its label over the best other class (not its own evidence alone, nor the
    smallest margin). D gets larger weights than DCGAN's initial ones, so that its margins are far from equal."""
    torch.manual_seed(0)
    G, D = cgan.Generator(3, 16, latent_dim=8, channels=8), cgan.Discriminator(3, 16, channels=8, d_cond=d_cond)
    for layer in D.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(layer.weight, std=0.3)
    G_eval, D_eval = copy.deepcopy(G).eval(), copy.deepcopy(D).eval()
    c = common.one_hot(torch.arange(20) % 3, 3)
    y = c.argmax(1)
    stream = torch.Generator().manual_seed(5)
    with torch.no_grad():
        candidates = torch.stack([G_eval(torch.randn(20, 8, generator=stream), c) for _ in range(4)])  # (4, 20, ...)
        evidence = torch.stack([cgan.class_evidence(D_eval, x, 3) for x in candidates])                 # (4, 20, 3)
    label = y[None, :, None].expand(4, -1, 1)
    own = evidence.gather(2, label)[..., 0]
    margin = own - evidence.scatter(2, label, -math.inf).amax(2)
    rows, tolerance = torch.arange(20), 1e-4 * margin.abs().mean()
    picked = cgan.pick(G.train(), D.train(), c, 4, 5, "cpu", batch_size=7)       # pick puts both in eval mode
    which = (picked[None] - candidates).flatten(2).abs().amax(2).argmin(0)      # the candidate each pick is
    assert torch.allclose(picked, candidates[which, rows])
    assert (margin[which, rows] >= margin.amax(0) - tolerance).all()
    # the fixture can tell: keeping the largest evidence for y alone would lose on some rows
    assert (margin[own.argmax(0), rows] < margin.amax(0) - tolerance).any()
    assert torch.equal(cgan.pick(G, D, c, 1, 5, "cpu"), cgan.generate(G, c, 5, "cpu"))
    if d_cond == "acgan":                                                       # the class head's logits
        assert torch.equal(cgan.class_evidence(D_eval, candidates[0], 3), D_eval(candidates[0], c)[1])


def test_pick_is_on_by_default_only_with_the_class_head():
    assert cgan.get_args([]).pick == cgan.PICK_ACGAN == 16
    assert cgan.get_args(["--d-cond", "projection"]).pick == cgan.get_args(["--d-cond", "concat"]).pick == 1
    assert cgan.get_args(["--d-cond", "concat", "--pick", "4"]).pick == 4


@BOTH
def test_training_is_deterministic_under_a_seed(module, tmp_path):
    states = []
    for name in ("a", "b"):
        module.train(module.get_args(cli(tmp_path, "--steps", "3", "--eval-every", "3", "--name", name, "--r1", "1")))
        states.append(torch.load(tmp_path / module.__name__ / name / "ckpt.pt", weights_only=False))
    for key in ("generator", "discriminator", "ema"):
        for name, value in states[0][key].items():
            assert torch.equal(value, states[1][key][name]), (key, name)


@BOTH
def test_cli_resume_sample_only_and_mismatch(module, tmp_path):
    module.main(cli(tmp_path, "--steps", "2", "--eval-every", "2"))
    run = tmp_path / module.__name__ / "t"
    figures = ["ckpt.pt", "samples.png", "samples_000002.png", "progress.png", "balance.png", "loss_d.png",
               "loss_g.png", "args.json", "final.json"]
    figures += ["interpolation.png", "unseen_conditions.png"] if module is cgan else \
        ["interpolation_linear.png", "interpolation_spherical.png"]
    for f in figures:
        assert (run / f).exists(), f
    final = json.loads((run / "final.json").read_text())
    assert final["parameters"]["generator"] > 0 and 0 < final["diversity"] and final["frechet_distance"] > 0
    if module is cgan:
        assert 0 <= final["conditional_accuracy"] <= 1 and len(final["unseen_conditions"]) == 6
        assert final["within_class_diversity"] > 0 and 0 <= final["conditional_accuracy_unpicked"] <= 1
    first = torch.load(run / "ckpt.pt", weights_only=False)
    module.main(cli(tmp_path, "--steps", "4", "--eval-every", "2", "--resume"))
    second = torch.load(run / "ckpt.pt", weights_only=False)
    assert second["step"] == 4 and len(second["progress"]) == 2
    assert any(not torch.equal(v, second["generator"][k]) for k, v in first["generator"].items())
    module.main(cli(tmp_path, "--sample-only", "--seed", "3"))
    assert json.loads((run / "sampling_seed3.json").read_text())["step"] == 4
    with pytest.raises(SystemExit, match="was made with --g-channels 8; this run has --g-channels 16"):
        module.main(cli(tmp_path, "--resume", "--g-channels", "16"))


@pytest.mark.parametrize("lr_decay, factors", [(0.0, [1, 1, 1, 1]), (0.5, [1, 1, 1, 0.5])])
def test_cgan_decays_both_learning_rates_over_the_last_steps(tmp_path, monkeypatch, lr_decay, factors):
    """The rates each update runs at, recorded when D's and G's steps are called: with --lr-decay 0.5 over 4 steps
    the last step (index 3) runs at lr_factor = (4 - 3) / 2 of each network's own peak, every D step of it too; the
    default is no decay."""
    assert cgan.get_args([]).lr_decay == 0
    seen = {"d": [], "g": []}
    d_step, g_step = cgan.d_step, cgan.g_step
    monkeypatch.setattr(cgan, "d_step", lambda G, D, opt, *a: seen["d"].append(opt.param_groups[0]["lr"]) or
                        d_step(G, D, opt, *a))
    monkeypatch.setattr(cgan, "g_step", lambda G, D, opt, *a: seen["g"].append(opt.param_groups[0]["lr"]) or
                        g_step(G, D, opt, *a))
    cgan.train(cgan.get_args(cli(tmp_path, "--steps", "4", "--eval-every", "4", "--lr", "3e-4", "--lr-d", "5e-4",
                                 "--d-steps", "2", "--lr-decay", str(lr_decay))))
    assert seen["g"] == pytest.approx([3e-4 * f for f in factors])
    assert seen["d"] == pytest.approx([5e-4 * f for f in factors for _ in range(2)])


@BOTH
def test_checkpoint_round_trip(module, tmp_path):
    """The EMA generator saved in ckpt.pt, loaded into a network rebuilt from the checkpoint's own args, makes the
    same images (and a freshly initialised one does not)."""
    run, ema, G, D, data, *_ = module.train(module.get_args(cli(tmp_path, "--steps", "3", "--eval-every", "3")))
    state = torch.load(run.ckpt_path, weights_only=False)
    saved_args = argparse.Namespace(**state["args"])
    fresh, _ = module.build(saved_args, data.num_classes, 3) if module is cgan else module.build(saved_args, 3)
    untrained = copy.deepcopy(fresh)
    fresh.load_state_dict(state["ema"])
    make = (lambda g: cgan.generate(g, common.one_hot(torch.arange(8) % K, K), 0, "cpu")) if module is cgan else \
        (lambda g: gan.generate(g, 8, 0, "cpu"))
    assert torch.equal(make(ema), make(fresh)) and not torch.allclose(make(ema), make(untrained), atol=1e-3)


@BOTH
def test_bad_flags_fail_clearly(module, tmp_path):
    with pytest.raises(SystemExit, match="--image-size must be a power of two"):
        module.main(cli(tmp_path, "--image-size", "24", "--steps", "1"))
    with pytest.raises(SystemExit, match="hinge has no target"):
        module.main(cli(tmp_path, "--loss", "hinge", "--label-smoothing", "0.1", "--steps", "1"))
    with pytest.raises(SystemExit, match="unknown --loss 'wgan'"):
        module.main(cli(tmp_path, "--loss", "wgan", "--steps", "1"))
    with pytest.raises(SystemExit, match="unknown --g-out 'pixelshuffle'"):    # before any data is loaded
        module.check_flags(module.get_args(cli(tmp_path, "--g-out", "pixelshuffle")))
    if module is cgan:
        with pytest.raises(SystemExit, match="--pick 0: need at least 1 candidate"):
            module.check_flags(module.get_args(cli(tmp_path, "--pick", "0")))
        with pytest.raises(SystemExit, match="unknown --d-cond 'sum'"):
            module.main(cli(tmp_path, "--d-cond", "sum", "--steps", "1"))
        with pytest.raises(SystemExit, match="--interpolate takes two class indices"):
            module.main(cli(tmp_path, "--interpolate", "0,12", "--steps", "1"))
        with pytest.raises(SystemExit, match="need --mode-seeking >= 0"):
            module.main(cli(tmp_path, "--mode-seeking", "-1", "--steps", "1"))
        with pytest.raises(SystemExit, match="at least 2 images per process"):
            module.main(cli(tmp_path, "--mode-seeking", "1", "--batch-size", "1", "--steps", "1"))


def test_ac_gan_classifier_learns_from_fakes_only_when_asked():
    """D's class term with --acgan-on-fakes 1, minus that with 0, is exactly lambda times the cross-entropy of the
    fake batch."""
    x, y = tiny_data(16)
    c = common.one_hot(y, 2)
    losses = {}
    for on_fakes in (0, 1):
        torch.manual_seed(0)
        args = tiny_args(cgan, d_cond="acgan", acgan_on_fakes=on_fakes, acgan_weight=2.5)
        G, D = cgan.build(args, 2, 3)
        opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
        torch.manual_seed(1)
        losses[on_fakes] = cgan.d_step(G, D, opt_d, x, c, args, 0.0)["class_loss_d"].item()
    torch.manual_seed(0)
    G, D = cgan.build(tiny_args(cgan, d_cond="acgan"), 2, 3)
    torch.manual_seed(1)
    with torch.no_grad():
        fake = G(torch.randn(16, G.latent_dim), c)
        D.train()(x, c)                                 # the real batch's pass, as in d_step (batch norm state)
        expected = cgan.class_loss(D(fake, c)[1], c).item()
    assert losses[1] - losses[0] == pytest.approx(args.acgan_weight * expected, rel=1e-4)


def test_mode_seeking_loss_equals_its_formula():
    """1 / (mean|G(z_1) - G(z_2)| / mean|z_1 - z_2| + eps) for a batch whose halves are the pairs, by hand."""
    fake = torch.tensor([[0.0, 1.0], [2.0, 2.0], [1.0, -1.0], [2.0, 4.0]])     # pairs (row 0, row 2), (row 1, row 3)
    z = torch.tensor([[0.0], [0.0], [1.0], [3.0]])
    image_distance = (1 + 2 + 0 + 2) / 4                                       # mean |fake[:2] - fake[2:]|
    latent_distance = (1 + 3) / 2                                              # mean |z[:2] - z[2:]|
    assert cgan.mode_seeking_loss(fake, z).item() == pytest.approx(1 / (image_distance / latent_distance + 1e-5))


def test_mode_seeking_pairs_conditions_and_spreads_each_class():
    """With --mode-seeking, G's batch repeats its first half's conditions in its second half, and G steps against a
    frozen D leave samples more varied within each class than the same steps without it."""
    x, y = tiny_data(16)
    c = common.one_hot(y, 2)
    first_conditions, spread = {}, {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        args = tiny_args(cgan, d_cond="acgan", mode_seeking=weight, lr=1e-3)
        G, D = cgan.build(args, 2, 3)

        def record(module, inputs, output, weight=weight):        # returns None: the output stays as it was
            first_conditions.setdefault(weight, inputs[1])
        hook = G.register_forward_hook(record)
        opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
        for _ in range(20):
            cgan.g_step(G, D, opt_g, c, args, 0.0)
        hook.remove()
        labels = torch.arange(64) % 2
        spread[weight] = cgan.within_class_diversity(cgan.generate(G, common.one_hot(labels, 2), 0, "cpu"), labels)
    assert torch.equal(first_conditions[0.0], c) and torch.equal(first_conditions[1.0], torch.cat([c[:8], c[:8]]))
    assert spread[1.0] > 1.2 * spread[0.0], spread


def test_within_class_diversity_ignores_differences_between_classes():
    """Two classes, each one image repeated: no diversity within a class, however different the classes are. And
    the mean pairwise distance within each class, averaged over the classes (not over all pairs), with classes of
    a single image left out and each class cut to its first max_per_class images."""
    zeros, ones = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    assert cgan.within_class_diversity(torch.cat([zeros, ones]), torch.tensor([0, 0, 0, 1, 1, 1])) == 0
    threes = torch.full((1, 1, 2, 2), 3.0)             # 6 from each zero image: sqrt(4 pixels x 3^2)
    images = torch.cat([zeros, threes, zeros[:1], ones[:1], ones[:1]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])      # class 0: 3 pairs at 0, 3 at 6; class 1: one pair at 2
    assert cgan.within_class_diversity(images, labels) == pytest.approx(((3 * 0 + 3 * 6) / 6 + 2) / 2)
    assert cgan.within_class_diversity(images, labels, max_per_class=2) == pytest.approx((0 + 2) / 2)


def test_final_json_within_class_diversity_is_the_samples_over_the_test_images(tmp_path):
    """final.json's within_class_diversity is that of the report's class-balanced EMA samples, picked by D (seeded,
    so drawn again here), divided by that of the whole test split; its _unpicked twin is that of G's samples as
    drawn."""
    args = cgan.get_args(cli(tmp_path, "--steps", "2", "--eval-every", "2"))
    run, ema, G, D, data, parameters, device, steps = cgan.train(args)
    final = cgan.report(run, ema, G, D, data, parameters, device, steps, args)
    labels = torch.arange(args.fid_samples) % K
    c = common.one_hot(labels, K)
    real, real_labels = (torch.cat(batches) for batches in zip(*data.test))
    real_within = cgan.within_class_diversity(real, real_labels)
    for key, samples in (("within_class_diversity", cgan.pick(ema, D, c, args.pick, args.seed, "cpu")),
                         ("within_class_diversity_unpicked", cgan.generate(ema, c, args.seed, "cpu"))):
        expected = cgan.within_class_diversity(samples, labels) / real_within
        assert final[key] == pytest.approx(expected, rel=1e-6), key
