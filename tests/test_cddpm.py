"""cddpm.py: the condition's effect, the guidance formula, label dropout, unseen conditions, the sampler's math,
determinism, learning, checkpoints and the command line."""
import argparse
import copy
import json

import pytest
import torch

import cddpm

K = 4
TINY = dict(image_size=8, channels=16, channel_mult=(1, 2), blocks=1, attn_res=(4,), heads=2)


def tiny_model(cond="embedding", inject="scale-shift"):
    torch.manual_seed(0)
    model = cddpm.ConditionalUNet(K, in_channels=3, cond=cond, inject=inject, **TINY)
    for p in model.parameters():               # zero-initialised last convs hide the embeddings at init;
        torch.nn.init.normal_(p, std=0.05)     # random weights let the condition act
    return model.eval()


@pytest.mark.parametrize("cond", ["embedding", "onehot"])
@pytest.mark.parametrize("inject", ["shift", "scale-shift"])
def test_the_condition_changes_the_prediction(cond, inject):
    model = tiny_model(cond, inject)
    x, t = torch.randn(1, 3, 8, 8).expand(K + 1, -1, -1, -1), torch.full((K + 1,), 7)   # same x_t for every c
    with torch.no_grad():
        eps = model(x, t, cddpm.one_hot(torch.arange(K + 1), K))
    for a in range(K + 1):
        for b in range(a):
            assert (eps[a] - eps[b]).abs().max() > 1e-5, (a, b)          # far above float rounding


def test_parameter_counts_of_the_readme():
    """The default U-Net (one block per level, attention in the middle only) and the paper-shaped one."""
    count = lambda argv: sum(p.numel() for p in cddpm.build(cddpm.get_args(argv), 10, 3)[0].parameters())
    assert count([]) == 1_143_491 and count(["--blocks", "2", "--attn-res", "8"]) == 1_745_443


def quadrant_data(n=64):
    """Class y in 0..3: a white 4x4 square in quadrant y of a black 8x8 image."""
    y = torch.arange(n) % K
    x0 = -torch.ones(n, 3, 8, 8)
    for i in range(n):
        r, q = divmod(int(y[i]), 2)
        x0[i, :, 4 * r:4 * r + 4, 4 * q:4 * q + 4] = 1
    return x0, y


def bright_quadrant(x):
    return torch.stack([x[:, :, 4 * r:4 * r + 4, 4 * q:4 * q + 4].mean((1, 2, 3)) for r in (0, 1) for q in (0, 1)],
                       1).argmax(1)


@pytest.fixture(scope="module")
def trained():
    """A tiny conditional model trained for 300 steps on the quadrant data, and its losses."""
    torch.manual_seed(0)
    model, s = cddpm.ConditionalUNet(K, in_channels=3, **TINY), cddpm.Schedule(timesteps=100)
    x0, y = quadrant_data()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        l = cddpm.loss(model, x0, y, s, p_uncond=0.1, num_classes=K)
        opt.zero_grad()
        l.backward()
        opt.step()
        losses.append(l.item())
    return model.eval(), s, losses


def test_loss_falls_on_tiny_labelled_data(trained):
    losses = trained[2]
    assert sum(losses[-20:]) / 20 < 0.3 * sum(losses[:5]) / 5


def test_guided_samples_follow_the_label(trained):
    """Under the same noise, each label's sample puts its square in that label's quadrant."""
    model, s, _ = trained
    for seed in (0, 1):
        x = cddpm.sample(model, s, cddpm.one_hot(torch.arange(K), K), 8, guidance=2.0, sample_steps=20, seed=seed,
                         shared_noise=True)
        assert torch.equal(bright_quadrant(x), torch.arange(K))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_shared_noise_leaves_only_condition_and_guidance_to_differ(sampler):
    """The figures' rows: with shared noise, equal conditions give equal images and another condition another
    image, even with the ancestral sampler's fresh z at every step; per-image w equals one call per w."""
    model, s = tiny_model(), cddpm.Schedule(timesteps=20)
    kw = dict(sampler=sampler, eta=1.0, sample_steps=8, seed=4, shared_noise=True)
    x = cddpm.sample(model, s, cddpm.one_hot(torch.tensor([1, 1, 2]), K), 8, guidance=0.5, **kw)
    assert torch.allclose(x[0], x[1], atol=1e-6) and (x[0] - x[2]).abs().max() > 1e-3
    assert not torch.allclose(x[0], cddpm.sample(model, s, cddpm.one_hot(torch.tensor([1, 1]), K), 8, guidance=0.5,
                                                 **{**kw, "shared_noise": False})[1], atol=1e-3)
    c = cddpm.one_hot(torch.tensor([3, 3]), K)
    both = cddpm.sample(model, s, c, 8, guidance=torch.tensor([0.0, 3.0]), **kw)
    for i, w in enumerate([0.0, 3.0]):
        assert torch.allclose(both[i], cddpm.sample(model, s, c[:1], 8, guidance=w, **kw)[0], atol=1e-5)


class Fixed(torch.nn.Module):
    """A stand-in network whose output is 1 for the null condition and 3 for any label: eps~ is known exactly."""

    num_classes = K

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, c):
        return torch.where(c[:, K].bool(), 1.0, 3.0).view(-1, 1, 1, 1).expand_as(x)


@pytest.mark.parametrize("w", [-1.0, 0.0, 0.5, 3.0])
def test_guidance_formula(w):
    x, t, c = torch.zeros(2, 3, 4, 4), torch.tensor([5, 5]), cddpm.one_hot(torch.tensor([0, 3]), K)
    assert torch.allclose(cddpm.guided_eps(Fixed(), x, t, c, w), torch.full_like(x, (1 + w) * 3 - w * 1))


def test_guidance_zero_is_the_conditional_model_and_minus_one_the_unconditional():
    model = tiny_model()
    x, t, c = torch.randn(3, 3, 8, 8), torch.tensor([2, 9, 17]), cddpm.one_hot(torch.tensor([0, 1, 3]), K)
    null = cddpm.one_hot(torch.full((3,), K), K)
    with torch.no_grad():
        assert torch.allclose(cddpm.guided_eps(model, x, t, c, 0.0), model(x, t, c), atol=1e-5)
        assert torch.allclose(cddpm.guided_eps(model, x, t, c, -1.0), model(x, t, null), atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.15, 0.5])
def test_label_dropout_rate(p):
    y = torch.randint(0, K, (200_000,))
    dropped = cddpm.drop_labels(y, K, p, torch.Generator().manual_seed(0))
    null = dropped == K
    assert abs(null.float().mean().item() - p) < 0.005
    assert torch.equal(dropped[~null], y[~null])                    # the kept labels are untouched


def test_the_loss_trains_the_null_condition_at_the_dropout_rate(monkeypatch):
    seen = []
    model = tiny_model()
    monkeypatch.setattr(model, "forward", lambda x, t, c: seen.append(c) or torch.zeros_like(x))
    torch.manual_seed(0)
    cddpm.loss(model, torch.zeros(4000, 3, 8, 8), torch.randint(0, K, (4000,)), cddpm.Schedule(20), 0.2, K)
    assert abs(seen[0][:, K].mean().item() - 0.2) < 0.02


def test_interpolation_endpoints_and_linearity():
    c = cddpm.interpolate(1, 3, [0.0, 0.25, 1.0], K)
    assert torch.equal(c[0], cddpm.one_hot(torch.tensor(1), K)) and torch.equal(c[2], cddpm.one_hot(torch.tensor(3), K))
    table, mlp = tiny_model("embedding").cond, tiny_model("onehot").cond
    with torch.no_grad():
        ends = table(c[[0, 2]])
        assert torch.allclose(ends[0], table.table.weight[1]) and torch.allclose(ends[1], table.table.weight[3])
        assert torch.allclose(table(c[1:2])[0], 0.75 * ends[0] + 0.25 * ends[1], atol=1e-6)   # a table is linear in c
        for p in mlp.parameters():
            torch.nn.init.normal_(p)           # weights of order 1, where SiLU is far from linear
        e = mlp(c)
        assert (e[1] - (0.75 * e[0] + 0.25 * e[2])).abs().max() > 0.1                       # an MLP is not


def test_unseen_conditions_are_not_training_conditions():
    seen = cddpm.one_hot(torch.arange(K + 1), K)
    for name, v in cddpm.unseen_conditions(K).items():
        assert v.shape == (K + 1,) and not (seen == v).all(1).any(), name


class PointOracle(torch.nn.Module):
    """The exact eps when all data is one image x* (whatever the condition)."""

    num_classes = K

    def __init__(self, target, schedule):
        super().__init__()
        self.target, self.schedule = torch.nn.Parameter(target), schedule

    def forward(self, x, t, c):
        ab = self.schedule.alpha_bar[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.target) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_samplers_reach_the_data_with_an_exact_model(sampler, eta):
    s = cddpm.Schedule(timesteps=1000)
    target = torch.linspace(-0.9, 0.9, 48).view(1, 3, 4, 4)
    c = cddpm.one_hot(torch.arange(8) % K, K)
    x = cddpm.sample(PointOracle(target, s), s, c, 4, guidance=2.0, sampler=sampler, eta=eta, sample_steps=10)
    assert torch.allclose(x, target.expand_as(x), atol=1e-4)


def test_sampling_is_deterministic_under_a_seed():
    model, s = tiny_model(), cddpm.Schedule(timesteps=20)
    c = cddpm.one_hot(torch.tensor([0, 1, 2]), K)
    for sampler in ("ddim", "ddpm"):
        kw = dict(guidance=1.5, sampler=sampler, sample_steps=8, eta=0.5)
        a = cddpm.sample(model, s, c, 8, seed=1, **kw)
        assert torch.equal(a, cddpm.sample(model, s, c, 8, seed=1, **kw))
        assert not torch.equal(a, cddpm.sample(model, s, c, 8, seed=2, **kw))
        assert a.shape == (3, 3, 8, 8) and a.abs().max() <= 1


def cli(tmp_path, *extra):
    return ["--image-size", "8", "--channels", "16", "--channel-mult", "1,2", "--blocks", "1", "--attn-res", "4",
            "--heads", "2", "--split-sizes", "64,16,16", "--timesteps", "20", "--sample-steps", "4",
            "--batch-size", "8", "--fid-samples", "20", "--unseen-samples", "4", "--guidance-sweep", "0,2",
            "--out", str(tmp_path), "--name", "t", *extra]


def test_cli_resume_sample_only_and_mismatch(tmp_path):
    cddpm.main(cli(tmp_path, "--steps", "2", "--eval-every", "2"))
    run = tmp_path / "cddpm" / "t"
    for f in ("ckpt.pt", "samples.png", "guidance_sweep.png", "interpolation.png", "unseen_conditions.png",
              "guidance.png", "loss.png", "args.json"):
        assert (run / f).exists(), f
    final = json.loads((run / "final.json").read_text())
    assert [r["guidance"] for r in final["guidance_sweep"]] == [0, 2]
    assert 0 <= final["best_conditional_accuracy"] <= 1 and len(final["unseen_conditions"]) == 5
    first = torch.load(run / "ckpt.pt", weights_only=False)
    cddpm.main(cli(tmp_path, "--steps", "4", "--eval-every", "2", "--resume"))
    second = torch.load(run / "ckpt.pt", weights_only=False)
    assert second["step"] == 4 and not torch.equal(first["model"]["stem.weight"], second["model"]["stem.weight"])
    cddpm.main(cli(tmp_path, "--sample-only", "--guidance", "3"))
    sampled = json.loads((run / "sampling_ddpm4_w3.json").read_text())
    assert sampled["step"] == 4 and "test_loss" not in sampled
    with pytest.raises(SystemExit, match="was made with --cond embedding; this run has --cond onehot"):
        cddpm.main(cli(tmp_path, "--resume", "--cond", "onehot"))


def test_checkpoint_round_trip(tmp_path):
    """The EMA weights saved in ckpt.pt, loaded into a model rebuilt from the checkpoint's own args, are the
    trained EMA weights and predict what they predict (and a freshly initialised model does not)."""
    run, ema, _, data, *_ = cddpm.train(cddpm.get_args(cli(tmp_path, "--steps", "3", "--eval-every", "3")))
    state = torch.load(run.ckpt_path, weights_only=False)
    fresh, _ = cddpm.build(argparse.Namespace(**state["args"]), data.num_classes, data.channels)
    untrained = copy.deepcopy(fresh)
    fresh.load_state_dict(state["ema"])
    assert state["step"] == 3
    for name, value in ema.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 10, 19])
    c = cddpm.one_hot(torch.tensor([0, 3, 7, data.num_classes]), data.num_classes)
    with torch.no_grad():
        assert torch.allclose(ema(x, t, c), fresh(x, t, c), atol=1e-5)
        assert not torch.allclose(ema(x, t, c), untrained(x, t, c), atol=1e-3)


def test_bad_flags_fail_clearly(tmp_path):
    with pytest.raises(SystemExit, match="--p-uncond must be in"):
        cddpm.get_args(["--p-uncond", "1"])
    with pytest.raises(SystemExit, match="--interpolate"):
        cddpm.main(cli(tmp_path, "--steps", "1", "--interpolate", "0,12"))
