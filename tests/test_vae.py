"""vae.py and cvae.py: the objective against its closed forms (KL, reparameterisation, per-image sums, beta and
capacity), the latent-space measures against constructed codes (correlation of samples against means, Gaussian
total correlation, MIG), learning on tiny data, the condition's effect, determinism, checkpoints, the beta sweep and
the command line. Tests that hold for both files are parametrised over them."""
import argparse
import copy
import json
import math

import pytest
import torch

import common
import cvae
import vae

BOTH = pytest.mark.parametrize("module", [vae, cvae], ids=["vae", "cvae"])
K = 10          # classes of the embedded shapes set


@pytest.fixture(autouse=True)
def quick_reference_classifier(monkeypatch):
    """The command-line tests measure samples with a reference classifier; a few steps of it are enough here."""
    monkeypatch.setitem(common.CLASSIFIER_STEPS, "shapes", 30)


def gaussian_log_density(z, mu, var):
    return -0.5 * (math.log(2 * math.pi) + var.log() + (z - mu) ** 2 / var)


@BOTH
def test_analytic_kl_matches_a_monte_carlo_estimate(module):
    """KL(q || p) = E_q[log q(z) - log p(z)], estimated from 400,000 reparameterised samples."""
    mu, logvar = torch.tensor([[0.0, 1.5, -0.7]]), torch.tensor([[0.0, -1.0, 0.8]])
    z = module.reparameterise(mu.expand(400_000, -1), logvar.expand(400_000, -1), torch.Generator().manual_seed(0))
    log_q = gaussian_log_density(z, mu, logvar.exp())
    log_p = gaussian_log_density(z, torch.zeros(1), torch.ones(1))
    monte_carlo = (log_q - log_p).mean(0)
    analytic = module.kl_per_dimension(mu, logvar)[0]
    assert analytic[0].item() == 0.0
    assert torch.allclose(monte_carlo, analytic, atol=0.01), (monte_carlo, analytic)


@BOTH
def test_reparameterised_sample_has_the_stated_mean_and_variance_and_passes_gradients(module):
    mu = torch.tensor([1.0, -2.0]).repeat(200_000, 1).requires_grad_(True)
    logvar = torch.tensor([math.log(4.0), math.log(0.25)]).repeat(200_000, 1).requires_grad_(True)
    z = module.reparameterise(mu, logvar, torch.Generator().manual_seed(1))
    assert torch.allclose(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.01)
    assert torch.allclose(z.var(0), torch.tensor([4.0, 0.25]), rtol=0.02)
    z.sum().backward()                       # dz/dmu = 1; dz/dlogvar = eps sigma / 2
    assert torch.equal(mu.grad, torch.ones_like(mu))
    assert torch.allclose(logvar.grad, (z - mu).detach() / 2, atol=1e-5)      # dz/dlogvar = sigma eps / 2
    again = module.reparameterise(mu, logvar, torch.Generator().manual_seed(1))
    assert torch.equal(z, again)


@BOTH
def test_beta_scales_only_the_kl_term_and_capacity_targets_c(module):
    recon, kl = torch.tensor([100.0, 50.0]), torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    for beta in (0.0, 1.0, 4.0, 16.0):
        assert torch.allclose(module.objective(recon, kl, beta) - recon, beta * kl.sum(1))
    assert torch.allclose(module.objective(recon, kl, 10.0, capacity=2.0), recon + 10 * torch.tensor([1.0, 1.5]))
    args = argparse.Namespace(capacity=20.0, capacity_steps=100)
    assert [module.capacity_at(s, args) for s in (0, 50, 100, 500)] == [0.0, 10.0, 20.0, 20.0]
    assert module.capacity_at(10, argparse.Namespace(capacity=0.0, capacity_steps=100)) is None


@BOTH
def test_reconstruction_terms_are_per_image_sums_of_the_stated_likelihoods(module):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    out = torch.randn(2, 3, 4, 4, generator=g)
    target = (x + 1) / 2
    bce = torch.nn.functional.softplus(out) - target * out           # softplus(l) - x l, on logits
    assert torch.allclose(module.reconstruction_nll(out, x, "bernoulli"), bce.flatten(1).sum(1), atol=1e-5)
    gauss = -torch.distributions.Normal(out, 0.2).log_prob(target)
    assert torch.allclose(module.reconstruction_nll(out, x, "gaussian", sigma=0.2), gauss.flatten(1).sum(1),
                          atol=1e-4)
    # a sum, not a mean: four times the pixels, four times the term (a mean would multiply beta by the pixel count)
    tiled = lambda t: t.repeat(1, 1, 2, 2)
    for kind in ("bernoulli", "gaussian"):
        assert torch.allclose(module.reconstruction_nll(tiled(out), tiled(x), kind),
                              4 * module.reconstruction_nll(out, x, kind), rtol=1e-5)
    # the Bernoulli term is minimal at logits matching the targets, and its minimum is their entropy, not 0
    best = torch.logit(target.clamp(1e-6, 1 - 1e-6))
    floor = -(target * target.log() + (1 - target) * (1 - target).log()).flatten(1).sum(1)
    assert torch.allclose(module.reconstruction_nll(best, x, "bernoulli"), floor, rtol=1e-3)
    assert (module.reconstruction_nll(best + 0.1, x, "bernoulli") > floor).all()
    with pytest.raises(SystemExit, match="unknown --recon 'laplace'"):
        module.reconstruction_nll(out, x, "laplace")


def tiny_data(n=32, size=8):
    """Class 0 an all-red image, class 1 an all-blue one, with a bright square at a random place."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    colour = torch.where(y[:, None] == 0, torch.tensor([0.8, -0.8, -0.8]), torch.tensor([-0.8, -0.8, 0.8]))
    x = colour[:, :, None, None].expand(n, 3, size, size).clone()
    for i, (r, c) in enumerate(torch.randint(0, size - 2, (n, 2), generator=g).tolist()):
        x[i, :, r:r + 2, c:c + 2] = 1.0
    return x, y


def fit(module, steps, **flags):
    """Train on tiny_data for `steps` full-batch Adam steps; returns the model, its args and the negative ELBO (beta 1,
    fixed eps) before and after."""
    args = module.get_args(["--image-size", "8", "--latent-dim", "4", "--channels", "8", "--hidden", "32",
                            *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]])
    torch.manual_seed(0)
    model = module.build(args, 2, 3) if module is cvae else module.build(args, 3)
    x, y = tiny_data()
    inputs = (x, common.one_hot(y, 2)) if module is cvae else (x,)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def neg_elbo():
        with torch.no_grad():
            out, mu, logvar = model(*inputs, torch.Generator().manual_seed(0))
            return (module.reconstruction_nll(out, x, args.recon, args.sigma)
                    + module.kl_per_dimension(mu, logvar).sum(1)).mean().item()

    before = neg_elbo()
    for _ in range(steps):
        out, mu, logvar = model(*inputs)
        loss = module.objective(module.reconstruction_nll(out, x, args.recon, args.sigma),
                                module.kl_per_dimension(mu, logvar), args.beta).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, args, before, neg_elbo()


@BOTH
@pytest.mark.parametrize("recon", vae.RECONS)
def test_loss_falls_on_tiny_data(module, recon):
    """More than half the way from the untrained model's negative ELBO to the likelihood's floor (its value for a
    perfect reconstruction at zero KL: the targets' entropy for Bernoulli, D/2 log(2 pi s^2) for the Gaussian)."""
    _, args, before, after = fit(module, 150, recon=recon)
    target = (tiny_data()[0] + 1) / 2
    if recon == "bernoulli":
        floor = torch.distributions.Bernoulli(probs=target).entropy().sum((1, 2, 3)).mean().item()
    else:
        floor = target[0].numel() / 2 * math.log(2 * math.pi * args.sigma ** 2)
    assert after < before - 0.5 * (before - floor), (before, after, floor)


@pytest.mark.parametrize("cond", cvae.CONDS)
def test_cvae_decoder_follows_the_label(cond):
    """Trained on red = class 0, blue = class 1, the same prior sample z decodes red under e_0 and blue under e_1.
    Bernoulli likelihood: its weaker reconstruction weight keeps the posteriors near the prior within 150 steps, so
    prior samples decode to images (with the Gaussian's s = 0.1 that takes longer)."""
    model, args, _, _ = fit(cvae, 150, cond=cond, cond_dim=4, recon="bernoulli")
    z = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    red = cvae.decode(model, z, common.one_hot(torch.zeros(16, dtype=torch.long), 2), args.recon)
    blue = cvae.decode(model, z, common.one_hot(torch.ones(16, dtype=torch.long), 2), args.recon)
    means = [red[:, 0].mean().item(), red[:, 2].mean().item(), blue[:, 0].mean().item(), blue[:, 2].mean().item()]
    assert means[0] > 0.3 > means[1] + 0.6 and means[3] > 0.3 > means[2] + 0.6, means


def test_embedding_condition_is_linear_in_the_condition_vector():
    cond = cvae.ConditionEncoder(4, 6, "embedding")
    e = common.one_hot(torch.arange(4), 4)
    mix = 0.3 * e[0] + 0.7 * e[2]
    assert torch.allclose(cond(mix[None])[0], 0.3 * cond.table[0] + 0.7 * cond.table[2])
    assert torch.equal(cvae.ConditionEncoder(4, 6, "onehot")(mix[None])[0], mix)
    assert torch.allclose(common.interpolate(1, 3, [0.0, 0.25, 1.0], 4)[1], torch.tensor([0.0, 0.75, 0.0, 0.25]))


TRUE_MIXTURE = (torch.tensor([0.3, 0.7]).log().double(), torch.tensor([[-3.0, 0.0], [2.0, 1.0]]).double(),
                torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.6, 0.0], [-0.3, 1.2]]]).double())


def test_mixture_samples_have_the_mixture_mean_and_covariance():
    """E z = sum_k w_k m_k and Cov z = sum_k w_k (S_k + m_k m_k^T) - E z E z^T."""
    log_w, m, L = TRUE_MIXTURE
    w = log_w.exp()
    mean = w @ m
    cov = torch.einsum("k,kij->ij", w, L @ L.mT + m[:, :, None] * m[:, None, :]) - mean[:, None] * mean[None, :]
    z = cvae.sample_mixture(TRUE_MIXTURE, 200_000, torch.Generator().manual_seed(0)).double()
    assert torch.allclose(z.mean(0), mean, atol=0.02) and torch.allclose(torch.cov(z.T), cov, atol=0.05)


def test_mixture_log_joint_is_log_weight_plus_the_gaussian_log_density():
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0)).double()
    log_w, m, L = TRUE_MIXTURE
    expected = torch.stack([log_w[k] + torch.distributions.MultivariateNormal(m[k], scale_tril=L[k]).log_prob(x)
                            for k in range(2)], 1)
    assert torch.allclose(cvae.mixture_log_joint(x, *TRUE_MIXTURE), expected)


def test_em_recovers_a_known_mixture_and_fits_its_data_at_least_as_well_as_the_truth():
    x = cvae.sample_mixture(TRUE_MIXTURE, 4000, torch.Generator().manual_seed(1))
    fit = cvae.fit_mixture(x, 2)
    order = fit[1][:, 0].argsort()                      # components matched to the truth by their first coordinate
    log_w, m, L = (t[order] for t in fit)
    assert torch.allclose(log_w.exp(), TRUE_MIXTURE[0].exp(), atol=0.03)
    assert torch.allclose(m, TRUE_MIXTURE[1], atol=0.1)
    assert torch.allclose(L @ L.mT, TRUE_MIXTURE[2] @ TRUE_MIXTURE[2].mT, atol=0.15)
    # maximum likelihood: on its own data no worse than the parameters that drew it
    assert cvae.class_log_likelihood([fit], x, torch.zeros(len(x), dtype=torch.long)) >= \
        cvae.class_log_likelihood([TRUE_MIXTURE], x, torch.zeros(len(x), dtype=torch.long))
    with pytest.raises(SystemExit, match="--prior-components 5000 needs at least as many codes per class"):
        cvae.fit_mixture(x, 5000)


def test_em_stops_once_an_iteration_gains_less_than_the_tolerance():
    x = cvae.sample_mixture(TRUE_MIXTURE, 2000, torch.Generator().manual_seed(2))
    labels = torch.zeros(len(x), dtype=torch.long)
    converged = cvae.class_log_likelihood([cvae.fit_mixture(x, 4, iterations=300, tolerance=0)], x, labels)
    stopped = cvae.class_log_likelihood([cvae.fit_mixture(x, 4)], x, labels)
    first = cvae.class_log_likelihood([cvae.fit_mixture(x, 4, iterations=1)], x, labels)
    assert converged - 0.01 < stopped <= converged + 1e-9 and first < converged - 0.05
    # a tolerance no iteration meets stops the fit after its first update
    assert all(torch.equal(a, b) for a, b in zip(cvae.fit_mixture(x, 4, tolerance=1e9),
                                                 cvae.fit_mixture(x, 4, iterations=1)))


def test_fitted_prior_draws_each_label_from_its_own_mixture_under_a_seed():
    """With mixtures far apart (class 0 near z = -5, class 1 near +5) and a decoder that paints z_0 everywhere,
    every image drawn for label y shows class y's side, and the same seed gives the same images."""
    class PaintFirstLatent(torch.nn.Module):
        latent_dim, num_classes = 2, 2

        def decode(self, z, v):
            return ((z[:, :1] + 1) / 2)[:, :, None, None].expand(-1, 3, 4, 4)   # mean_image maps it back to z_0

    tight = torch.linalg.cholesky(0.01 * torch.eye(2, dtype=torch.double)).expand(1, 2, 2)
    mixtures = [(torch.zeros(1).double(), torch.tensor([[c, 0.0]]).double(), tight) for c in (-5.0, 5.0)]
    labels = torch.tensor([0, 1, 1, 0, 1])
    images = cvae.sample_fitted(PaintFirstLatent(), mixtures, labels, 0, "gaussian", "cpu")
    assert torch.equal(images[:, 0, 0, 0], 2.0 * labels - 1)              # clamped at -1 and +1
    assert torch.equal(images, cvae.sample_fitted(PaintFirstLatent(), mixtures, labels, 0, "gaussian", "cpu"))


def test_correlation_of_means_is_spurious_where_sampled_codes_are_not():
    """Two used dimensions (independent, sigma small) and two switched-off ones whose means share a tiny common
    wobble: the means call the dead pair perfectly correlated; the sampled codes, dominated by the posterior's unit
    noise, correctly show four uncorrelated dimensions."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    wobble = 1e-3 * torch.randn(n, generator=g)
    mu = torch.stack([torch.randn(n, generator=g), torch.randn(n, generator=g), wobble, wobble], 1)
    logvar = torch.tensor([math.log(0.01), math.log(0.01), 0.0, 0.0]).expand(n, -1)
    codes = {"mu": mu, "logvar": logvar, "z": vae.reparameterise(mu, logvar, g)}
    metrics, arrays = vae.latent_analysis(codes)
    assert metrics["active_units"] == 2
    assert arrays["r_means"][2, 3] > 0.99 and abs(arrays["r_samples"][2, 3]) < 0.03
    assert metrics["corr_offdiag_means"] > 5 * metrics["corr_offdiag_samples"]
    assert metrics["kl_per_dim"][2] == pytest.approx(0.0, abs=1e-6) and metrics["kl_per_dim"][0] > 1


def test_gaussian_total_correlation_closed_form():
    """For two Gaussians with correlation rho, TC = I(z1; z2) = -1/2 log(1 - rho^2)."""
    g = torch.Generator().manual_seed(0)
    for rho in (0.0, 0.5, 0.9):
        a, b = torch.randn(2, 100_000, generator=g)
        z = torch.stack([a, rho * a + math.sqrt(1 - rho ** 2) * b], 1)
        assert vae.gaussian_total_correlation(vae.correlation(z)) == pytest.approx(-0.5 * math.log(1 - rho ** 2),
                                                                                 abs=0.01)
    assert vae.correlation(torch.stack([torch.randn(100, generator=g), torch.zeros(100)], 1))[0, 1] == 0


def test_mutual_information_and_mig_on_constructed_codes():
    g = torch.Generator().manual_seed(0)
    n = 20_000
    a = torch.randint(0, 4, (n,), generator=g)
    assert vae.mutual_information(a, a) == pytest.approx(vae.entropy(a)) == pytest.approx(math.log(4), rel=1e-2)
    assert vae.mutual_information(a, torch.randint(0, 4, (n,), generator=g)) < 0.01
    factors = torch.stack([torch.randint(0, 10, (n,), generator=g).float(), torch.rand(n, generator=g)], 1)
    names = ("class", "x")
    noise = torch.randn(n, generator=g)
    # one dimension per factor (and a noise dimension): a gap near 1 for each
    aligned, gaps, mi = vae.mutual_information_gap(torch.stack([factors[:, 1], factors[:, 0], noise], 1), factors,
                                                   names)
    assert aligned > 0.9 and mi[1, 0] > 0.9 and mi[0, 1] > 0.9 and mi[2].max() < 0.05
    # the same factors rotated into both dimensions: each dimension knows something of both, no gap
    mixed = torch.stack([factors[:, 0] / 10 + factors[:, 1], factors[:, 0] / 10 - factors[:, 1], noise], 1)
    assert vae.mutual_information_gap(mixed, factors, names)[0] < 0.5 * aligned
    # a factor copied into two dimensions: both know all of it, so the gap is 0
    copied = torch.stack([factors[:, 1], factors[:, 1], factors[:, 0]], 1)
    assert vae.mutual_information_gap(copied, factors, names)[1]["x"] == pytest.approx(0.0, abs=1e-9)


def cli(module, tmp_path, *extra):
    return ["--image-size", "16", "--latent-dim", "4", "--channels", "8", "--hidden", "32", "--device", "cpu",
            "--split-sizes", "64,32,32", "--batch-size", "16", "--fid-samples", "40", "--out", str(tmp_path),
            "--name", "t", *(["--unseen-samples", "10", "--prior-components", "2"] if module is cvae else []), *extra]


def test_fp16_autocast_trains_with_its_gradient_scaler(tmp_path):
    run, *_ = vae.train(vae.get_args(cli(vae, tmp_path, "--steps", "3", "--eval-every", "3", "--amp", "fp16")))
    losses = [r["loss"] for r in run.metrics() if r["split"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert torch.load(run.ckpt_path, weights_only=False)["scaler"]["scale"] > 0   # {} for a disabled scaler


@BOTH
def test_sampling_and_training_are_deterministic_under_a_seed(module, tmp_path):
    states = []
    for name in ("a", "b"):
        run, model, *_ = module.train(module.get_args(cli(module, tmp_path, "--steps", "3", "--eval-every", "3",
                                                         "--name", name)))
        states.append(torch.load(run.ckpt_path, weights_only=False)["model"])
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
    if module is cvae:
        v = common.one_hot(torch.arange(6) % K, K)
        a, again, other = (cvae.sample(model, v, s, "gaussian", "cpu") for s in (1, 1, 2))
    else:
        a, again, other = (vae.sample(model, 6, s, "gaussian", "cpu") for s in (1, 1, 2))
    assert torch.equal(a, again) and not torch.equal(a, other)


@BOTH
def test_checkpoint_round_trip(module, tmp_path):
    """The model saved in ckpt.pt, loaded into a network rebuilt from the checkpoint's own args, decodes the same
    images (and a freshly initialised one does not)."""
    run, model, data, *_ = module.train(module.get_args(cli(module, tmp_path, "--steps", "3", "--eval-every", "3")))
    state = torch.load(run.ckpt_path, weights_only=False)
    saved_args = argparse.Namespace(**state["args"])
    fresh = module.build(saved_args, data.num_classes, 3) if module is cvae else module.build(saved_args, 3)
    untrained = copy.deepcopy(fresh)
    fresh.load_state_dict(state["model"])
    make = (lambda m: cvae.sample(m, common.one_hot(torch.arange(8) % K, K), 0, "gaussian", "cpu")) \
        if module is cvae else (lambda m: vae.sample(m, 8, 0, "gaussian", "cpu"))
    assert torch.equal(make(model), make(fresh)) and not torch.allclose(make(model), make(untrained), atol=1e-3)


@BOTH
def test_cli_resume_sample_only_and_mismatch(module, tmp_path):
    module.main(cli(module, tmp_path, "--steps", "2", "--eval-every", "2"))
    run = tmp_path / module.__name__ / "t"
    figures = ["ckpt.pt", "samples.png", "reconstructions.png", "terms.png", "neg_elbo.png", "loss.png",
               "args.json", "final.json"]
    figures += ["interpolation.png", "unseen_conditions.png", "class_swap.png"] if module is cvae else \
        ["interpolation.png", "traversals.png", "latents.png"]
    for f in figures:
        assert (run / f).exists(), f
    final = json.loads((run / "final.json").read_text())
    assert final["parameters"]["decoder"] > 0 and final["frechet_distance"] > 0
    assert final["test_neg_elbo"] == pytest.approx(final["test_recon"] + final["test_kl"])
    assert 0 <= final["class_probe_accuracy"] <= 1
    if module is cvae:
        assert 0 <= final["conditional_accuracy"] <= 1 and len(final["unseen_conditions"]) == 6
        fitted = final["fitted_prior"]
        assert fitted["components_per_class"] == 2 and 0 <= fitted["conditional_accuracy"] <= 1
        assert (run / "samples_fitted_prior.png").exists()
    else:
        assert len(final["kl_per_dim"]) == 4 and 0 <= final["mig"] <= 1 and set(final["mig_per_factor"]) == \
            set(vae.MIG_FACTORS)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    first = torch.load(run / "ckpt.pt", weights_only=False)
    module.main(cli(module, tmp_path, "--steps", "4", "--eval-every", "2", "--resume"))
    second = torch.load(run / "ckpt.pt", weights_only=False)
    assert second["step"] == 4
    assert any(not torch.equal(v, second["model"][k]) for k, v in first["model"].items())
    module.main(cli(module, tmp_path, "--sample-only", "--seed", "3", *(["--beta", "7"] if module is vae else [])))
    sampling = json.loads((run / "sampling_seed3.json").read_text())
    assert sampling["step"] == 4
    if module is vae:
        assert sampling["beta"] == 1.0                      # the trained objective's, not the command line's
    assert (run / "samples_seed3.png").exists()
    with pytest.raises(SystemExit, match="was made with --latent-dim 4; this run has --latent-dim 6"):
        module.main(cli(module, tmp_path, "--resume", "--latent-dim", "6"))


@BOTH
def test_bad_flags_fail_clearly(module, tmp_path):
    with pytest.raises(SystemExit, match="--image-size must be a power of two"):
        module.main(cli(module, tmp_path, "--image-size", "24", "--steps", "1"))
    with pytest.raises(SystemExit, match="unknown --recon 'laplace'"):
        module.main(cli(module, tmp_path, "--recon", "laplace", "--steps", "1"))
    with pytest.raises(SystemExit, match="need --beta >= 0"):
        module.main(cli(module, tmp_path, "--beta", "-1", "--steps", "1"))
    if module is cvae:
        with pytest.raises(SystemExit, match="unknown --cond 'table'"):
            module.main(cli(module, tmp_path, "--cond", "table", "--steps", "1"))
        with pytest.raises(SystemExit, match="--interpolate takes two class indices"):
            module.main(cli(module, tmp_path, "--interpolate", "0,12", "--steps", "1"))
        with pytest.raises(SystemExit, match="--prior-components must be 0"):
            module.main(cli(module, tmp_path, "--prior-components", "-1", "--steps", "1"))
    else:
        with pytest.raises(SystemExit, match="--latent-dim must be at least 2"):
            module.main(cli(module, tmp_path, "--latent-dim", "1", "--steps", "1"))


def test_beta_sweep_trains_each_beta_once_and_plots_against_beta(tmp_path):
    argv = cli(vae, tmp_path, "--steps", "2", "--eval-every", "2", "--fid-samples", "0", "--name", "sw",
               "--sweep-beta", "1,8")
    vae.main(argv)
    root = tmp_path / "vae" / "sw"
    assert (root / "beta_sweep.png").exists()
    sweep = json.loads((root / "beta_sweep.json").read_text())
    assert set(sweep) == {"1", "8"} and sweep["8"]["beta"] == 8.0
    stamp = (root / "beta8" / "final.json").stat().st_mtime_ns
    (root / "beta1" / "final.json").unlink()                 # as if killed after training beta 1
    vae.main(argv)                   # finished runs are reused, not trained again; the unfinished one is resumed
    assert (root / "beta8" / "final.json").stat().st_mtime_ns == stamp
    assert (root / "beta1" / "final.json").exists()
    assert json.loads((root / "beta1" / "args.json").read_text())["resume"] is True
    with pytest.raises(SystemExit, match="was made with --steps 2; this sweep has 3"):
        vae.main([*argv, "--steps", "3"])
    with pytest.raises(SystemExit, match="needs betas above 0"):
        vae.main([*argv, "--sweep-beta", "0,1"])
    with pytest.raises(SystemExit, match="--sweep-beta trains"):
        vae.main([*argv, "--sample-only"])


@pytest.mark.parametrize("cond", [None, "onehot", "embedding"])
def test_shapes_and_default_parameter_counts(cond):
    """Output shapes at 16 and 32 px, and the default networks' sizes (the README quotes them)."""
    module = vae if cond is None else cvae
    args = module.get_args([] if cond is None else ["--cond", cond])
    model = module.build(args, 3) if cond is None else module.build(args, K, 3)
    counts = {"encoder": common.count_parameters(model.encoder), "decoder": common.count_parameters(model.decoder)}
    expected = {None: (695_284, 694_627), "onehot": (702_984, 699_747), "embedding": (716_808, 713_571)}[cond]
    assert (counts["encoder"], counts["decoder"]) == expected
    for size in (16, 32):
        args.image_size = size
        model = module.build(args, 3) if cond is None else module.build(args, K, 3)
        x = torch.rand(5, 3, size, size) * 2 - 1
        inputs = (x,) if cond is None else (x, common.one_hot(torch.arange(5), K))
        out, mu, logvar = model(*inputs)
        assert out.shape == x.shape and mu.shape == logvar.shape == (5, 10 if cond is None else 20)
