"""ddpm.py: the forward process and posterior in closed form, the samplers' identities, learning, determinism,
checkpoints and the command line."""
import json

import pytest
import torch
import torch.nn.functional as F

import cddpm
import common
import ddpm

TINY = dict(image_size=8, channels=16, channel_mult=(1, 2), blocks=1, attn_res=(4,), heads=2)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return ddpm.UNet(in_channels=3, **{**TINY, **overrides}).eval()


def test_forward_marginal_matches_closed_form():
    torch.manual_seed(0)
    s = ddpm.Schedule(timesteps=100)
    x0, t = torch.full((200_000,), 0.7), torch.full((200_000,), 40)
    xt = ddpm.q_sample(x0, t, s)
    assert abs(xt.mean() - s.alpha_bar[40].sqrt() * 0.7) < 0.01
    assert abs(xt.var() - (1 - s.alpha_bar[40])) < 0.01


def test_stepping_the_chain_matches_q_sample():
    """x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z, applied t+1 times, has q(x_t | x_0)'s mean and variance."""
    torch.manual_seed(0)
    s = ddpm.Schedule(timesteps=50, kind="cosine")
    x = torch.full((100_000,), -0.5)
    for t in range(31):
        x = (1 - s.betas[t]).sqrt() * x + s.betas[t].sqrt() * torch.randn_like(x)
    assert abs(x.mean() - s.alpha_bar[30].sqrt() * -0.5) < 0.01
    assert abs(x.var() - (1 - s.alpha_bar[30])) < 0.01


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [100, 1000])
def test_schedules(kind, timesteps):
    s = ddpm.Schedule(timesteps, kind)
    ab = s.alpha_bar
    assert (ab > 0).all() and (ab < 1).all() and (ab[1:] < ab[:-1]).all()
    assert ab[-1] < 1e-3 if kind == "cosine" else ab[-1] < 1e-4        # x_T is close to pure noise for any T
    assert s.alpha_bar_prev[0] == 1 and torch.equal(s.alpha_bar_prev[1:], ab[:-1])
    if kind == "linear":
        assert s.betas[0] == pytest.approx(1e-4 * 1000 / timesteps) and s.betas[-1] == pytest.approx(0.02 * 1000 / timesteps)


def test_posterior_is_the_gaussian_conditional():
    """q(x_{t-1} | x_t, x_0) by Bayes from q(x_t | x_{t-1}) q(x_{t-1} | x_0), in one dimension."""
    s = ddpm.Schedule(timesteps=100)
    t = torch.tensor([30])
    x0, xt = torch.tensor(0.4).view(1, 1, 1, 1), torch.tensor(-0.3).view(1, 1, 1, 1)
    beta, ab_prev = s.betas[30].double(), s.alpha_bar[29].double()
    # product of N(x; sqrt(ab_prev) x0, 1 - ab_prev) and N(xt; sqrt(1 - beta) x, beta) as a Gaussian in x
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    mean = (ab_prev.sqrt() * 0.4 / (1 - ab_prev) + (1 - beta).sqrt() * -0.3 / beta) / precision
    got_mean, got_var = ddpm.q_posterior(x0, xt, t, s)
    assert got_mean.item() == pytest.approx(mean.item(), rel=1e-4)
    assert got_var.item() == pytest.approx((1 / precision).item(), rel=1e-4)


def test_timestep_sequences():
    for spacing in ("uniform", "quadratic"):
        ts = ddpm.timestep_sequence(1000, 50, spacing)
        assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and (ts[1:] < ts[:-1]).all()
    trailing = ddpm.timestep_sequence(1000, 50, "trailing")
    assert trailing[0] == 999 and trailing[-1] == 19 and len(trailing) == 50
    assert torch.equal(ddpm.timestep_sequence(100, 100), torch.arange(99, -1, -1))
    with pytest.raises(SystemExit, match="--sample-steps must be between 1 and --timesteps 100"):
        ddpm.timestep_sequence(100, 101)


def test_ddim_with_eta_one_on_all_steps_is_ancestral_ddpm():
    model, s = tiny_model(), ddpm.Schedule(timesteps=30)
    kw = dict(n=4, image_size=8, sample_steps=30, seed=3)
    a = ddpm.sample(model, s, sampler="ddim", eta=1.0, **kw)
    b = ddpm.sample(model, s, sampler="ddpm", variance="beta_tilde", **kw)
    assert torch.allclose(a, b, atol=1e-4)


class PointOracle(torch.nn.Module):
    """The ideal eps-prediction when all data is one image x*: eps = (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t)."""

    def __init__(self, target, schedule):
        super().__init__()
        self.target, self.schedule = torch.nn.Parameter(target), schedule

    def forward(self, x, t, x0_estimate=None):       # exact: no use for a previous guess of x_0
        ab = self.schedule.alpha_bar[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.target) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler, eta, spacing", [("ddpm", 0, "uniform"), ("ddpm", 0, "quadratic"),
                                                   ("ddim", 1, "uniform"), ("ddim", 0, "trailing")])
def test_skipped_steps_keep_the_forward_marginals(sampler, eta, spacing):
    """With an exact model of one-image data, every kept x_s of a respaced chain (10 of 1000 steps) must be
    distributed as q(x_s | x*) = N(sqrt(ab_s) x*, (1 - ab_s) I). Taking a skipped step's variance from the
    original one-step beta_t (instead of 1 - ab_t / ab_s) leaves far too little noise and fails this."""
    s = ddpm.Schedule(timesteps=1000)
    target = torch.linspace(-0.8, 0.8, 48).view(1, 3, 4, 4)
    oracle = PointOracle(target, s)
    x, trajectory = ddpm.sample(oracle, s, 4000, 4, sampler=sampler, eta=eta, spacing=spacing, sample_steps=10,
                                seed=0, keep_every=1)
    assert torch.allclose(x, target.expand_as(x), atol=1e-4)              # the chain ends at x*
    assert len(trajectory) == 11 and trajectory[0][0] == 999 and trajectory[-1][0] == -1
    for t, xt in trajectory[1:-1]:
        ab = s.alpha_bar[t]
        assert torch.allclose(xt.mean(0), ab.sqrt() * target[0], atol=0.06), t
        assert abs(xt.var(0).mean() / (1 - ab) - 1) < 0.03, t


def test_sampler_is_deterministic_under_a_seed_and_in_range():
    model, s = tiny_model(), ddpm.Schedule(timesteps=20)
    for sampler in ("ddim", "ddpm"):
        a = ddpm.sample(model, s, 3, 8, sampler=sampler, sample_steps=10, eta=0.5, seed=1)
        assert torch.equal(a, ddpm.sample(model, s, 3, 8, sampler=sampler, sample_steps=10, eta=0.5, seed=1))
        assert not torch.equal(a, ddpm.sample(model, s, 3, 8, sampler=sampler, sample_steps=10, eta=0.5, seed=2))
        assert a.shape == (3, 3, 8, 8) and a.abs().max() <= 1


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_predictions_invert_to_the_true_x0_and_eps(pred):
    torch.manual_seed(0)
    x0, eps, ab = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4), torch.tensor(0.3)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[pred]
    got_x0, got_eps = ddpm.predict_x0_eps(out, xt, ab, pred, clip=False)
    assert torch.allclose(got_x0, x0, atol=1e-5) and torch.allclose(got_eps, eps, atol=1e-5)


def test_clipping_rederives_eps_from_the_clipped_x0():
    xt, ab = torch.full((1, 1, 1, 1), 2.0), torch.tensor(0.5)
    x0, eps = ddpm.predict_x0_eps(torch.full((1, 1, 1, 1), -3.0), xt, ab, "eps", clip=True)
    assert x0.item() == 1.0
    assert torch.allclose(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, xt)     # still consistent with x_t


def test_autoguidance_extrapolates_from_the_guide_through_the_model():
    model, guide = tiny_model(), tiny_model()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 15])
    with torch.no_grad():
        out, weak = model(x, t), guide(x, t)
        assert torch.allclose(ddpm.Autoguided(model, guide, 2.5)(x, t), weak + 2.5 * (out - weak), atol=1e-5)
        assert torch.allclose(ddpm.Autoguided(model, guide, 1.0)(x, t), out, atol=1e-5)     # w = 1: the model alone
        assert torch.allclose(ddpm.Autoguided(model, guide, 0.0)(x, t), weak, atol=1e-5)    # w = 0: the guide alone
        assert torch.allclose(ddpm.Autoguided(model, model, 3.0)(x, t), out, atol=1e-5)     # no gap, no guidance


def test_model_shapes_time_dependence_and_default_size():
    model = tiny_model()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 500])
    assert model(x, t).shape == x.shape
    for p in model.parameters():               # zero-initialised last convs make the output time-independent
        torch.nn.init.normal_(p, std=0.05)     # at init; randomise to see the time embedding at work
    assert not torch.allclose(model(x, torch.tensor([1, 1])), model(x, torch.tensor([900, 900])))
    paper = tiny_model(inject="shift")         # the paper's block: the embedding added before the GroupNorm
    for p in paper.parameters():
        torch.nn.init.normal_(p, std=0.05)
    assert not torch.allclose(paper(x, torch.tensor([1, 1])), paper(x, torch.tensor([900, 900])))
    count = lambda argv: sum(p.numel() for p in ddpm.build(ddpm.get_args(argv), 3)[0].parameters())
    paper_shape = ["--blocks", "2", "--attn-res", "8"]
    assert count([]) == 1_142_083 and count(paper_shape) == 1_744_035            # the README's counts
    assert count(paper_shape + ["--inject", "shift"]) == 1_624_323               # AdaGN: twice the projection


def test_adagn_scales_and_shifts_the_normalised_features():
    """With the embedding's projection fixed to a known (s, b), a block computes GroupNorm(h) (1 + s) + b; the
    paper's block, GroupNorm(h + b), loses b's mean over each group of channels."""
    torch.manual_seed(0)
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    s, b = torch.linspace(-0.5, 0.5, 16), torch.linspace(1.0, 2.0, 16)
    for scale_shift in (True, False):
        block = ddpm.ResBlock(16, 16, 8, 0.0, scale_shift).eval()
        torch.nn.init.normal_(block.conv2.weight, std=0.1)
        torch.nn.init.zeros_(block.emb.weight)             # the projection is its bias alone: (s, b) or b
        block.emb.bias.data = torch.cat([s, b]) if scale_shift else b
        h = block.conv1(F.silu(block.norm1(x)))
        s_, b_ = s[:, None, None], b[:, None, None]
        inner = block.norm2(h) * (1 + s_) + b_ if scale_shift else block.norm2(h + b_)
        expected = (x + block.conv2(F.silu(inner))) * ddpm.RES_SCALE
        assert torch.allclose(block(x, emb), expected, atol=1e-5)
    uniform_shift = torch.nn.GroupNorm(ddpm.GROUPS, 16)
    assert torch.allclose(uniform_shift(h + 3.0), uniform_shift(h), atol=1e-5)    # a shift the norm removes entirely


def test_loss_falls_on_a_tiny_batch():
    torch.manual_seed(0)
    model, s = ddpm.UNet(in_channels=3, **TINY), ddpm.Schedule(timesteps=100)
    x0 = torch.zeros(16, 3, 8, 8)
    x0[:, :, 2:6, 2:6] = 1                     # a white square on black
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss = ddpm.loss(model, x0, s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_min_snr_weighs_each_t_by_min_snr_gamma_in_x0_space_whatever_the_network_predicts(pred):
    """Min-SNR: every parametrisation's error is a multiple of the x_0 error, ||eps - eps^||^2 = SNR ||x_0 - x_0^||^2 and
    ||v - v^||^2 = (SNR + 1) ||x_0 - x_0^||^2, so the weights make all three min(SNR_t, gamma) ||x_0 - x_0^||^2."""
    s, gamma = ddpm.Schedule(timesteps=1000), 5.0
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    miss = torch.linspace(0.05, 0.2, 64)          # a different x_0 error per image, so weights must pair with images
    seen = []

    def model(xt, t, x0_estimate=None):          # predicts x_0 + miss, expressed as the target `pred` names
        seen.append(t)
        ab = ddpm.expand(s.alpha_bar, t)
        x0_hat = x0 + miss[:, None, None, None]
        eps_hat = (xt - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
        return {"eps": eps_hat, "x0": x0_hat, "v": ab.sqrt() * eps_hat - (1 - ab).sqrt() * x0_hat}[pred]

    torch.manual_seed(0)
    weighted = ddpm.loss(model, x0, s, pred, min_snr=gamma)
    ab = s.alpha_bar[seen[0]]
    snr = ab / (1 - ab)
    assert snr.max() > gamma > snr.min()                        # both sides of the clamp are drawn
    assert weighted.item() == pytest.approx((miss ** 2 * snr.clamp(max=gamma)).mean().item(), rel=1e-4)
    torch.manual_seed(0)
    unweighted = ddpm.loss(model, x0, s, pred)                  # min_snr = 0: L_simple, the same t
    assert torch.equal(seen[0], seen[1])
    per_t = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[pred]
    assert unweighted.item() == pytest.approx((miss ** 2 * per_t).mean().item(), rel=1e-4)


def test_lognormal_timesteps_put_edms_noise_levels_on_four_fifths_of_the_batch():
    """P(sigma_t <= c) for the drawn t is 0.8 Phi((ln c - mean) / std) + 0.2 (the uniform share's), where
    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): EDM's ln sigma ~ N(-1.2, 1.2^2), rounded to the nearest t."""
    assert ddpm.get_args([]).t_dist == "lognormal"
    s = ddpm.Schedule(timesteps=1000)
    sigma = ((1 - s.alpha_bar.double()) / s.alpha_bar.double()).sqrt()
    torch.manual_seed(0)
    t = torch.cat([ddpm.sample_timesteps(10_000, s, "lognormal", "cpu") for _ in range(5)])
    assert t.min() >= 0 and t.max() <= 999
    normal = torch.distributions.Normal(ddpm.LOGNORMAL_MEAN, ddpm.LOGNORMAL_STD)
    for threshold in (0.1, 0.3, 1.0, 3.0, 10.0):
        expected = ((1 - ddpm.UNIFORM_SHARE) * normal.cdf(torch.tensor(threshold).log())
                    + ddpm.UNIFORM_SHARE * (sigma <= threshold).double().mean())
        assert (sigma[t] <= threshold).double().mean().item() == pytest.approx(expected.item(), abs=0.01), threshold


def test_uniform_timesteps_are_l_simples_and_validation_stays_uniform_whatever_training_draws():
    """--t-dist uniform draws t as torch.randint did before the flag; evaluate() (validation and test loss) uses
    uniform t under either setting, so the losses of runs with different --t-dist compare."""
    s = ddpm.Schedule(timesteps=100)
    torch.manual_seed(3)
    drawn = ddpm.sample_timesteps(500, s, "uniform", "cpu")
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.randint(0, 100, (500,)))
    model = tiny_model()
    batches = [(torch.rand(4, 3, 8, 8) * 2 - 1, torch.zeros(4)) for _ in range(2)]
    losses = [ddpm.evaluate(model, batches, s, ddpm.get_args(["--t-dist", dist, "--amp", "off"]),
                            torch.device("cpu"))
              for dist in ("uniform", "lognormal")]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("dist", ["uniform", "lognormal"])
def test_training_draws_t_from_t_dist_and_validation_and_test_from_the_uniform(tmp_path, monkeypatch, dist):
    drawn = []
    draw = ddpm.sample_timesteps
    monkeypatch.setattr(ddpm, "sample_timesteps", lambda n, s, d, device: drawn.append(d) or draw(n, s, d, device))
    ddpm.main(cli(tmp_path, "--steps", "2", "--eval-every", "2", "--t-dist", dist))
    assert drawn[:2] == [dist, dist] and len(drawn) > 2 and set(drawn[2:]) == {"uniform"}


def test_a_self_conditioned_unet_reads_its_previous_guess_and_a_plain_one_ignores_it():
    x, t, guess = torch.randn(2, 3, 8, 8), torch.tensor([3, 15]), torch.rand(2, 3, 8, 8) * 2 - 1
    plain, model, guide = tiny_model(), tiny_model(self_cond=True), tiny_model(self_cond=True)
    assert (plain.stem.in_channels, model.stem.in_channels) == (3, 6)        # x_t, then x_t and the guess
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
        assert torch.equal(plain(x, t, guess), plain(x, t))
        assert torch.equal(model(x, t), model(x, t, torch.zeros_like(x)))    # no guess yet: zeros
        assert not torch.allclose(model(x, t, guess), model(x, t), atol=1e-3)
        out, weak = model(x, t, guess), guide(x, t, guess)                 # autoguidance hands both the guess
        assert torch.allclose(ddpm.Autoguided(model, guide, 2.5)(x, t, guess), weak + 2.5 * (out - weak), atol=1e-5)


def test_self_conditioning_trains_half_the_batches_on_the_networks_own_detached_guess():
    s, x0 = ddpm.Schedule(timesteps=100), torch.rand(4, 3, 4, 4) * 2 - 1
    calls = []

    def model(xt, t, x0_estimate=None):         # an eps prediction whose implied x_0 leaves [-1, 1]
        calls.append((xt, t, x0_estimate, torch.is_grad_enabled()))
        return 3 * xt

    with_guess = 0
    for seed in range(40):
        calls.clear()
        torch.manual_seed(seed)
        plain = ddpm.loss(model, x0, s)
        calls.clear()
        torch.manual_seed(seed)
        conditioned = ddpm.loss(model, x0, s, self_cond=True)
        if len(calls) == 1:                     # the coin said no guess: the plain loss, the same draws
            assert calls[0][2] is None and conditioned.item() == plain.item()
            continue
        with_guess += 1
        (xt, t, first_guess, first_grad), (xt2, t2, guess, grad) = calls
        assert first_guess is None and not first_grad and grad                  # the guess carries no gradient
        assert torch.equal(xt, xt2) and torch.equal(t, t2)
        expected = ddpm.predict_x0_eps(3 * xt, xt, ddpm.expand(s.alpha_bar, t), "eps", clip=True)[0]
        assert torch.allclose(guess, expected) and guess.abs().max() <= 1      # its own x_0, clipped
    assert 10 <= with_guess <= 30


class GuessRecorder(torch.nn.Module):
    """eps = 3 x_t, whose implied x_0 changes every step and leaves [-1, 1]; records (x_t, t, the guess it is given)."""
    def __init__(self):
        super().__init__()
        self.weight, self.calls = torch.nn.Parameter(torch.tensor(3.0)), []

    def forward(self, x, t, x0_estimate=None):
        self.calls.append((x, t, x0_estimate))
        return self.weight * x

    def check_each_guess_is_the_last_steps_clipped_x0(self, schedule):
        assert self.calls[0][2] is None                                      # the first step has no guess yet
        for (x, t, _), (_, _, guess) in zip(self.calls, self.calls[1:]):
            x0 = ddpm.predict_x0_eps(3 * x, x, ddpm.expand(schedule.alpha_bar, t), "eps", clip=True)[0]
            assert torch.allclose(guess, x0) and guess.abs().max() <= 1


@pytest.mark.parametrize("sampler,clip", [("ddim", True), ("ddpm", True), ("ddim", False)])
def test_the_sampler_hands_a_self_conditioned_network_its_previous_x0_clipped(sampler, clip):
    s, recorder = ddpm.Schedule(timesteps=100), GuessRecorder()
    with torch.no_grad():
        ddpm.sample(recorder, s, 2, 8, sampler=sampler, sample_steps=5, clip=clip)
    assert len(recorder.calls) == 5
    recorder.check_each_guess_is_the_last_steps_clipped_x0(s)           # clipped even with clip off: as trained


def test_a_negative_min_snr_gamma_is_refused():
    with pytest.raises(SystemExit, match="--min-snr is the weighting's gamma"):
        ddpm.get_args(["--min-snr", "-5"])


@pytest.mark.parametrize("script", [ddpm, cddpm])
def test_the_unets_layout_is_nchw_only_under_autocast_on_a_cpu(script, monkeypatch):
    """bench/ddpm_speed.py: channels_last speeds float32 but slows bf16 on a CPU; GPUs take channels_last."""
    args = script.get_args([])
    assert args.amp == "auto"
    for amp, native, device, layout in (("off", True, "cpu", torch.channels_last),
                                        ("bf16", False, "cpu", torch.contiguous_format),
                                        ("auto", True, "cpu", torch.contiguous_format),
                                        ("auto", False, "cpu", torch.channels_last),   # a CPU that emulates bf16
                                        ("bf16", True, "cuda", torch.channels_last)):
        monkeypatch.setattr(common, "native_bf16", lambda device, native=native: native)
        args.amp = amp
        assert script.memory_format(args, torch.device(device)) == layout, (amp, native, device)


def cli(tmp_path, *extra):
    return ["--image-size", "8", "--channels", "16", "--channel-mult", "1,2", "--blocks", "1", "--attn-res", "4",
            "--heads", "2", "--split-sizes", "64,16,16", "--timesteps", "20", "--sample-steps", "5", "--batch-size", "8", "--fid-samples", "0",
            "--out", str(tmp_path), "--name", "t", *extra]


@pytest.mark.parametrize("script", [ddpm, cddpm])
def test_training_runs_in_the_layout_memory_format_picks_and_resumes_in_the_other(tmp_path, script):
    extra = ("--unseen-samples", "4", "--guidance-sweep", "0,2") if script is cddpm else ()
    run = tmp_path / script.__name__ / "t"
    for amp, steps, channels_last in (("off", "1", True), ("bf16", "2", False)):    # saved in NHWC, resumed in NCHW
        script.main(cli(tmp_path, *extra, "--steps", steps, "--eval-every", "1", "--amp", amp,
                        *(("--resume",) if amp == "bf16" else ())))
        state = torch.load(run / "ckpt.pt", weights_only=False)
        assert state["step"] == int(steps)
        assert state["model"]["stem.weight"].is_contiguous(memory_format=torch.channels_last) == channels_last, amp
    # the resumed optimizer's moments follow the new layout (common.load_optimizer_state), as fused AdamW needs
    moments = [v for per_param in state["optimizer"]["state"].values() for v in per_param.values() if v.dim() == 4]
    assert moments and all(v.is_contiguous() for v in moments)


@pytest.mark.parametrize("script", [ddpm, cddpm])
def test_samples_come_from_the_raw_weights_by_default_and_from_their_average_with_ema(tmp_path, script):
    extra = ("--unseen-samples", "4", "--guidance-sweep", "0") if script is cddpm else ()
    for ema, name in ((None, "raw"), ("0.9", "ema")):
        script.main(cli(tmp_path, *extra, "--steps", "3", "--eval-every", "3", "--name", name,
                        *(("--ema", ema) if ema else ())))
        state = torch.load(tmp_path / script.__name__ / name / "ckpt.pt", weights_only=False)
        same = all(torch.equal(state["ema"][k], v) for k, v in state["model"].items())
        assert same == (ema is None), name


def test_cli_resume_and_sample_only(tmp_path):
    ddpm.main(cli(tmp_path, "--steps", "2", "--eval-every", "2"))
    run = tmp_path / "ddpm" / "t"
    for f in ("ckpt.pt", "samples.png", "reverse_process.png", "loss.png", "final.json", "args.json"):
        assert (run / f).exists(), f
    first = torch.load(run / "ckpt.pt", weights_only=False)
    assert first["step"] == 2
    ddpm.main(cli(tmp_path, "--steps", "4", "--eval-every", "2", "--resume"))
    second = torch.load(run / "ckpt.pt", weights_only=False)
    assert second["step"] == 4 and not torch.equal(first["model"]["stem.weight"], second["model"]["stem.weight"])
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    records = {f: (run / f).read_text() for f in ("args.json", "metrics.jsonl", "final.json")}
    ddpm.main(cli(tmp_path, "--sample-only", "--sampler", "ddpm"))
    assert torch.load(run / "ckpt.pt", weights_only=False)["step"] == 4
    assert records == {f: (run / f).read_text() for f in records}          # the training run's records are kept
    sampled = json.loads((run / "sampling_ddpm5_beta_tilde_autoguide2.json").read_text())
    assert sampled["step"] == 4 and "seconds_per_image" in sampled and "test_loss" not in sampled
    assert all((run / f"{kind}_ddpm5_beta_tilde_autoguide2.png").exists() for kind in ("samples", "reverse_process"))
    with pytest.raises(SystemExit, match="was made with --channels 16; this run has --channels 32"):
        ddpm.main(cli(tmp_path, "--resume", "--channels", "32"))
    with pytest.raises(SystemExit, match="was made with --inject scale-shift; this run has --inject shift"):
        ddpm.main(cli(tmp_path, "--resume", "--inject", "shift"))
    with pytest.raises(SystemExit, match="was made with --self-cond False; this run has --self-cond True"):
        ddpm.main(cli(tmp_path, "--resume", "--self-cond"))
    records = {f: (run / f).read_text() for f in ("args.json", "metrics.jsonl")}
    with pytest.raises(SystemExit, match="was made with --t-dist lognormal; this run has --t-dist uniform"):
        ddpm.main(cli(tmp_path, "--steps", "6", "--resume", "--t-dist", "uniform"))
    assert records == {f: (run / f).read_text() for f in records}          # refused before it touched the run


def test_a_checkpoint_from_before_t_dist_resumes_only_with_the_uniform_t_it_was_trained_on(tmp_path):
    ddpm.main(cli(tmp_path, "--steps", "2", "--eval-every", "2", "--t-dist", "uniform"))
    path = tmp_path / "ddpm" / "t" / "ckpt.pt"
    old = torch.load(path, weights_only=False)
    del old["args"]["t_dist"]                     # as saved before --t-dist existed
    torch.save(old, path)
    with pytest.raises(SystemExit, match="was made with --t-dist uniform; this run has --t-dist lognormal"):
        ddpm.main(cli(tmp_path, "--steps", "3", "--eval-every", "3", "--resume"))
    ddpm.main(cli(tmp_path, "--sample-only"))     # sampling does not train, so any --t-dist will do
    ddpm.main(cli(tmp_path, "--steps", "3", "--eval-every", "3", "--resume", "--t-dist", "uniform"))
    assert torch.load(path, weights_only=False)["step"] == 3


def test_a_self_conditioned_run_trains_resumes_and_samples(tmp_path):
    ddpm.main(cli(tmp_path, "--steps", "2", "--eval-every", "2", "--self-cond"))
    ddpm.main(cli(tmp_path, "--steps", "3", "--eval-every", "3", "--self-cond", "--resume"))
    run = tmp_path / "ddpm" / "t"
    state = torch.load(run / "ckpt.pt", weights_only=False)
    assert state["step"] == 3 and state["model"]["stem.weight"].shape[1] == 6
    ddpm.main(cli(tmp_path, "--sample-only", "--self-cond"))
    assert (run / "samples_ddim5_eta0_autoguide2.png").exists()


def test_a_checkpoint_from_before_self_conditioning_resumes_as_a_plain_network(tmp_path):
    ddpm.main(cli(tmp_path, "--steps", "2", "--eval-every", "2"))
    path = tmp_path / "ddpm" / "t" / "ckpt.pt"
    old = torch.load(path, weights_only=False)
    del old["args"]["self_cond"]                  # as saved before --self-cond existed
    torch.save(old, path)
    ddpm.main(cli(tmp_path, "--steps", "3", "--eval-every", "3", "--resume"))
    assert torch.load(path, weights_only=False)["step"] == 3
    del old["args"]["inject"]                     # a flag whose older default differs is still refused
    torch.save(old, path)
    with pytest.raises(SystemExit, match="does not record --inject: it was made"):   # --inject alone, not --self-cond
        ddpm.main(cli(tmp_path, "--sample-only"))


def test_the_guide_averages_the_first_guide_at_of_the_training_steps_and_then_stays(tmp_path):
    same = ("--lr-decay", "0", "--amp", "off")          # the first steps then run alike in every run
    ddpm.main(cli(tmp_path, "--steps", "4", "--eval-every", "4", "--guide-at", "0.5", *same))
    for steps, name in (("1", "one"), ("2", "two")):
        ddpm.main(cli(tmp_path, "--steps", steps, "--eval-every", steps, "--guide-at", "1", *same, "--name", name))
    one, two, four = (torch.load(tmp_path / "ddpm" / n / "ckpt.pt", weights_only=False) for n in ("one", "two", "t"))
    close = lambda a, b: all(torch.allclose(a[k], v, atol=1e-6) for k, v in b.items())
    d = 2 / 11                                          # the EMA's ramped decay at the second step, (1 + 1) / (10 + 1)
    assert close(two["guide"], {k: d * v + (1 - d) * two["model"][k] for k, v in one["guide"].items()})
    assert close(four["guide"], two["guide"])           # frozen after step 2 of 4
    assert not close(four["guide"], four["model"])
    # resumed for longer, the run keeps the guide it has instead of averaging again up to 50% of the new total
    ddpm.main(cli(tmp_path, "--steps", "12", "--eval-every", "12", "--guide-at", "0.5", *same, "--resume"))
    assert close(torch.load(tmp_path / "ddpm" / "t" / "ckpt.pt", weights_only=False)["guide"], two["guide"])


def test_a_checkpoint_without_a_guide_samples_only_unguided(tmp_path):
    ddpm.main(cli(tmp_path, "--steps", "2", "--eval-every", "2"))
    path = tmp_path / "ddpm" / "t" / "ckpt.pt"
    state = torch.load(path, weights_only=False)
    del state["guide"]                                   # as a checkpoint made before --guide-at existed
    torch.save(state, path)
    with pytest.raises(SystemExit, match="holds no autoguidance guide.*sample it with --guidance 1"):
        ddpm.main(cli(tmp_path, "--sample-only"))
    with pytest.raises(SystemExit, match="holds no autoguidance guide"):        # before any training step
        ddpm.main(cli(tmp_path, "--steps", "4", "--eval-every", "2", "--resume"))
    assert torch.load(path, weights_only=False)["step"] == 2
    ddpm.main(cli(tmp_path, "--sample-only", "--guidance", "1"))
    assert (tmp_path / "ddpm" / "t" / "sampling_ddim5_eta0.json").exists()


def test_sampling_goes_through_the_guide(tmp_path):
    ddpm.main(cli(tmp_path, "--steps", "2", "--eval-every", "2"))
    run = tmp_path / "ddpm" / "t"
    for w in ("1", "3"):
        ddpm.main(cli(tmp_path, "--sample-only", "--guidance", w))
    assert (run / "samples_ddim5_eta0.png").read_bytes() != (run / "samples_ddim5_eta0_autoguide3.png").read_bytes()
    with pytest.raises(SystemExit, match="--guide-at is a fraction of the training steps"):
        ddpm.main(cli(tmp_path, "--steps", "2", "--guide-at", "0", "--name", "g0"))
