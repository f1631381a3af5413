"""Variational autoencoder with a weighted KL term (beta-VAE), and what beta does to the latent space.

Papers: Kingma & Welling 2014, "Auto-Encoding Variational Bayes", arXiv:1312.6114 (the ELBO, reparameterisation,
closed-form KL in App. B); Higgins et al. 2017, "beta-VAE", ICLR (beta); Burgess et al. 2018, "Understanding
disentangling in beta-VAE", arXiv:1804.03599 (capacity annealing); Hoffman & Johnson 2016, "ELBO surgery" and
Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs", arXiv:1802.04942 (the total-correlation
decomposition, the mutual information gap); Burda, Grosse & Salakhutdinov 2016, arXiv:1509.00519 (active units).

    python vae.py                              # beta = 1 on the embedded shapes, 32px (README: time and results)
    python vae.py --beta 16                    # a strongly weighted KL: fewer, more independent latents
    python vae.py --sweep-beta 1,4,16          # one run per beta, then every metric plotted against beta
    python vae.py --sample-only --name <run>   # figures and metrics again from a run's checkpoint

Model. A latent z in R^d with prior p(z) = N(0, I); a decoder p_theta(x | z); an encoder
q_phi(z | x) = N(mu_phi(x), diag sigma_phi^2(x)) whose network outputs mu and logvar = log sigma^2 (unconstrained;
exp makes the variance positive).

Objective, per image, minimised (the batch mean of it):

    L(x) = E_{q(z|x)}[ -log p_theta(x | z) ] + beta KL(q_phi(z | x) || p(z))

With beta = 1 this is the negative ELBO, an upper bound on -log p(x) (it is what `neg_elbo` reports, whatever
the training beta). The KL of two Gaussians is in closed form (Kingma & Welling, App. B), per dimension j:

    KL_j = 1/2 (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2),   KL = sum_j KL_j

The expectation is estimated with one sample, reparameterised as z = mu + sigma * eps, eps ~ N(0, I), so the
gradient reaches mu and sigma through z. The reconstruction term is a sum over the D = C*H*W values of the image,
with pixels scaled to x in [0, 1]:

    --recon bernoulli:  -log p(x | z) = sum_i softplus(l_i) - x_i l_i      (BCE on the decoder's logits l)
    --recon gaussian:   -log p(x | z) = sum_i (x_i - m_i)^2 / (2 s^2) + 1/2 log(2 pi s^2),   s = --sigma fixed

Sums, not means: averaging the reconstruction over pixels while the KL is summed over z would silently divide the
reconstruction by D, i.e. multiply beta by D (3,072 at 32px), so beta would lose its meaning. Both terms are in
nats per image. The Bernoulli likelihood treats grey levels as probabilities: it is the usual choice (Higgins et
al.), but not a normalised density for x strictly inside (0, 1), and its minimum is the targets' entropy, not 0
(the continuous Bernoulli fixes the normalisation, Loaiza-Ganem & Cunningham 2019). For the Gaussian, s is the
exchange rate between the terms: the reconstruction weight is 1 / (2 s^2), so halving s is like dividing beta by 4.

Capacity annealing (Burgess et al., Eq. 2), with --capacity C_max > 0:

    L(x) = E_q[ -log p(x | z) ] + beta |KL(q(z | x) || p(z)) - C_t|,   C_t = C_max min(1, step / --capacity-steps)

a KL budget that grows, so the latent space opens one factor at a time (Burgess et al. use beta, their gamma, 1000).
|KL - C_t| is taken per image, as their Eq. 2 is written (much public code takes |batch-mean KL - C_t|, a looser
constraint).

Why a large beta makes the latent components uncorrelated and independent. Averaged over the data, the KL term
splits (Hoffman & Johnson 2016; Chen et al. 2018, Eq. 2) into

    E_x KL(q(z|x) || p(z)) = I_q(x; z) + TC(q(z)) + sum_j KL(q(z_j) || p(z_j))

where q(z) = E_x q(z | x) is the aggregate posterior and TC(q(z)) = KL(q(z) || prod_j q(z_j)) its total
correlation, zero exactly when the components are independent. beta weights all three: a large beta pushes q(z)
towards the factorised prior (small TC: independent components) but also squeezes the information I(x; z), so
reconstructions blur and unneeded dimensions switch off (KL_j -> 0). What is measured on the test set:
  * active units: dimensions with Var_x(mu_j(x)) > 0.01 (Burda et al.), and KL_j per dimension;
  * the correlation matrix of codes z ~ q(z|x) sampled once per image (samples of q(z)), its mean absolute
    off-diagonal, and the Gaussian total correlation -1/2 log det R (the TC of a Gaussian with that correlation
    matrix R: 0 iff uncorrelated); the same correlation on the means mu(x) for comparison, where switched-off
    dimensions (mu ~ 0 up to tiny variations) can look strongly correlated with one another though they carry
    nothing: the samples are dominated by their unit noise and show what q(z) really is;
  * on shapes, the mutual information gap (Chen et al., Sec. 4.1): for each generative factor v_k, the
    difference between the two largest I(mu_j; v_k) over latent dimensions j, divided by the entropy H(v_k), then
    averaged over factors: 1 when one dimension alone captures each factor, 0 when none or several do. Estimated
    from histograms of mu_j (MIG_BINS equal-width bins) and of the factor (classes, or MIG_BINS bins).

Differences from the papers: 32px colour images (Higgins et al.: 64px dSprites); the encoder and decoder are
Burgess et al.'s with channels doubling per stride-2 layer (they keep 32) and one hidden linear layer of 256
(they have two); MIG from histograms of the means
(Chen et al. integrate over q(z|x)), as is common practice; rotation is left out of MIG, since it is undefined
for circles and rings and only defined modulo the symmetry for the regular shapes.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

MODEL_FLAGS = ("dataset", "image_size", "latent_dim", "channels", "hidden", "recon")
OBJECTIVE_FLAGS = ("beta", "sigma", "capacity", "capacity_steps")
RECONS = ("bernoulli", "gaussian")
ACTIVE_VARIANCE = 0.01      # Burda et al.: a unit is active when Var_x(E_q[z_j]) exceeds this
MIG_BINS = 20               # histogram bins for MIG (as disentanglement_lib, Locatello et al. 2019)
MIG_FACTORS = ("class", "fg_hue", "bg_hue", "scale", "x", "y")   # rotation: see the module docstring
TRAVERSAL_RANGE = 3.0       # latent traversals sweep z_j over [-3, 3]: +-3 standard deviations of the prior
FIGURE_SAMPLES = 64
LOSS_PANELS = {"objective (minimised)": ("loss",), "reconstruction -log p(x|z)": ("recon",),
               "KL(q(z|x) || p(z))": ("kl",)}


# ----------------------------------------------------------------------------- networks

def stride2_layers(image_size):
    """Stride-2 layers between image_size x image_size and 4x4 (3 for 32px)."""
    n = round(math.log2(image_size)) - 2 if image_size >= 8 else 0
    if image_size < 8 or 2 ** (n + 2) != image_size:
        common.fail(f"--image-size must be a power of two, at least 8 (the encoder halves it to 4), got {image_size}")
    return n


class Encoder(nn.Module):
    """x (B, C, S, S) in [-1, 1] -> mu, logvar (B, d) each: stride-2 convolutions doubling the channels down to
    4x4, then two linear layers."""

    def __init__(self, image_size, latent_dim, channels, hidden, in_channels=3):
        super().__init__()
        layers, c_in = [], in_channels
        for i in range(stride2_layers(image_size)):
            layers += [nn.Conv2d(c_in, channels * 2 ** i, 4, stride=2, padding=1), nn.ReLU()]   # (B, c, H/2, W/2)
            c_in = channels * 2 ** i
        self.features = nn.Sequential(*layers, nn.Flatten())                                   # (B, c * 4 * 4)
        self.head = nn.Sequential(nn.Linear(c_in * 16, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))

    def forward(self, x):
        mu, logvar = self.head(self.features(x)).chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """z (B, d) -> (B, C, S, S): the encoder mirrored, two linear layers to 4x4 and stride-2 transposed
    convolutions halving the channels. Outputs Bernoulli logits or Gaussian means (of pixels in [0, 1])."""

    def __init__(self, image_size, latent_dim, channels, hidden, out_channels=3):
        super().__init__()
        n = stride2_layers(image_size)
        c = channels * 2 ** (n - 1)
        self.head = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, c * 16), nn.ReLU(),
                                  nn.Unflatten(1, (c, 4, 4)))                                   # (B, c, 4, 4)
        layers = []
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.ReLU()]      # (B, c/2, 2H, 2W)
            c //= 2
        self.body = nn.Sequential(*layers, nn.ConvTranspose2d(c, out_channels, 4, stride=2, padding=1))

    def forward(self, z):
        return self.body(self.head(z))


class VAE(nn.Module):
    def __init__(self, image_size=32, latent_dim=10, channels=32, hidden=256, image_channels=3):
        super().__init__()
        self.encoder = Encoder(image_size, latent_dim, channels, hidden, image_channels)
        self.decoder = Decoder(image_size, latent_dim, channels, hidden, image_channels)
        self.latent_dim = latent_dim

    def forward(self, x, generator=None):
        """Decoder output for one reparameterised sample z ~ q(z|x), and q's mu and logvar."""
        mu, logvar = self.encoder(x)
        return self.decoder(reparameterise(mu, logvar, generator)), mu, logvar


# ----------------------------------------------------------------------------- objective

def reparameterise(mu, logvar, generator=None):
    """z = mu + sigma * eps with eps ~ N(0, I) (from `generator` if given) and sigma = exp(logvar / 2)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps


def kl_per_dimension(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2), per dimension: (B, d)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def reconstruction_nll(out, x, kind, sigma=0.1):
    """-log p(x | z) summed over the image's values, per image (B,); x in [-1, 1] is mapped to [0, 1]."""
    target = (x.float() + 1) / 2
    out = out.float()
    if kind == "bernoulli":         # out: logits; BCE with logits is softplus(l) - x l, stable for any l
        nll = F.binary_cross_entropy_with_logits(out, target, reduction="none")
    elif kind == "gaussian":        # out: means
        nll = (target - out).pow(2) / (2 * sigma ** 2) + 0.5 * math.log(2 * math.pi * sigma ** 2)
    else:
        common.fail(f"unknown --recon {kind!r}; choose one of {', '.join(RECONS)}")
    return nll.flatten(1).sum(1)


def objective(recon, kl, beta, capacity=None):
    """Per image (B,): recon + beta KL, or recon + beta |KL - C| with a capacity C (Burgess et al.)."""
    kl = kl.sum(1)
    return recon + beta * (kl if capacity is None else (kl - capacity).abs())


def capacity_at(step, args):
    """C_t = C_max min(1, step / capacity_steps), or None without capacity annealing."""
    if not args.capacity:
        return None
    return args.capacity * min(1.0, step / args.capacity_steps)


def mean_image(out, kind):
    """The decoder's mean image in [-1, 1]: sigmoid(logits) for Bernoulli, the mean for Gaussian."""
    p = torch.sigmoid(out) if kind == "bernoulli" else out
    return (2 * p.float() - 1).clamp(-1, 1)


# ----------------------------------------------------------------------------- latent-space analysis

def correlation(codes):
    """Pearson correlation matrix of the columns of codes (N, d); a constant column correlates 0 with the rest."""
    c = codes.double() - codes.double().mean(0)
    standardised = c / c.pow(2).mean(0).sqrt().clamp(min=1e-30)   # a constant column stays all zeros
    return (standardised.T @ standardised / len(c)).fill_diagonal_(1.0)


def mean_abs_off_diagonal(r):
    d = len(r)
    return ((r.abs().sum() - r.diagonal().abs().sum()) / (d * (d - 1))).item()


def gaussian_total_correlation(r):
    """TC of a Gaussian with correlation matrix R: sum_j H(z_j) - H(z) = -1/2 log det R (nats; 0 iff R = I)."""
    return (-0.5 * torch.logdet(r)).item()


def discretise(values, bins):
    """Equal-width bins over each column's range: (N, d) floats -> (N, d) integers in [0, bins)."""
    lo, hi = values.min(0).values, values.max(0).values
    return ((values - lo) / (hi - lo).clamp(min=1e-12) * bins).long().clamp(max=bins - 1)


def entropy(a):
    """H(a) in nats of a discrete variable given as (N,) integers."""
    p = torch.bincount(a).double() / len(a)
    p = p[p > 0]
    return -(p * p.log()).sum().item()


def mutual_information(a, b):
    """I(a; b) in nats of two discrete variables (N,) integers, from their joint histogram."""
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= len(a)
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    kept = joint > 0
    return (joint[kept] * (joint[kept] / outer[kept]).log()).sum().item()


def mutual_information_gap(codes, factors, names, bins=MIG_BINS):
    """MIG (Chen et al. 2018): mean over factors k of (I(z_j*; v_k) - I(z_j'; v_k)) / H(v_k), j* and j' the two
    dimensions most informative about v_k. Returns (MIG, {factor: gap}, normalised MI matrix (d, factors))."""
    z = discretise(codes, bins)
    gaps, columns = {}, []
    for k, name in enumerate(names):
        v = factors[:, k].long() if name == "class" else discretise(factors[:, k:k + 1], bins)[:, 0]
        mi = torch.tensor([mutual_information(z[:, j], v) for j in range(z.shape[1])]) / entropy(v)
        top2 = mi.topk(2).values
        gaps[name] = (top2[0] - top2[1]).item()
        columns.append(mi)
    return sum(gaps.values()) / len(gaps), gaps, torch.stack(columns, 1)


@torch.no_grad()
def encode_dataset(model, loader, device, seed=0):
    """mu, logvar and one z ~ q(z|x) per image (seeded), labels and (shapes only) the generative factors."""
    model.eval()
    g = torch.Generator(device).manual_seed(seed)
    out = {"mu": [], "logvar": [], "z": [], "label": [], "factors": []}
    for x, y, *factors in loader:
        mu, logvar = model.encoder(x.to(device))
        out["mu"].append(mu.float().cpu())
        out["logvar"].append(logvar.float().cpu())
        out["z"].append(reparameterise(mu.float(), logvar.float(), g).cpu())
        out["label"].append(y)
        out["factors"] += factors
    return {k: torch.cat(v) for k, v in out.items() if v}


def latent_analysis(codes):
    """Active units, KL per dimension, correlations of sampled codes and of means, Gaussian TC and (with the
    generative factors) MIG; see the module docstring. Returns (metrics, arrays for the figures)."""
    kl = kl_per_dimension(codes["mu"], codes["logvar"]).mean(0)
    r_samples, r_means = correlation(codes["z"]), correlation(codes["mu"])
    metrics = {"kl_per_dim": kl.tolist(), "active_units": int((codes["mu"].var(0) > ACTIVE_VARIANCE).sum()),
               "corr_offdiag_samples": mean_abs_off_diagonal(r_samples),
               "corr_offdiag_means": mean_abs_off_diagonal(r_means),
               "gaussian_tc_samples": gaussian_total_correlation(r_samples)}
    arrays = {"kl": kl, "r_samples": r_samples, "r_means": r_means}
    if "factors" in codes:
        columns = [common.FACTOR_NAMES.index(n) for n in MIG_FACTORS]
        mig, gaps, mi = mutual_information_gap(codes["mu"], codes["factors"][:, columns], MIG_FACTORS)
        metrics.update(mig=mig, mig_per_factor=gaps)
        arrays["mi"] = mi
    return metrics, arrays


# ----------------------------------------------------------------------------- training

def build(args, channels):
    return VAE(args.image_size, args.latent_dim, args.channels, args.hidden, channels)


def check_flags(args):
    if args.recon not in RECONS:
        common.fail(f"unknown --recon {args.recon!r}; choose one of {', '.join(RECONS)}")
    if args.beta < 0 or args.sigma <= 0 or args.capacity < 0 or args.capacity_steps < 1:
        common.fail("need --beta >= 0, --sigma > 0, --capacity >= 0 and --capacity-steps >= 1")
    if args.latent_dim < 2:
        common.fail("--latent-dim must be at least 2 (correlations and MIG compare dimensions)")
    if args.fid_samples == 1 or args.fid_samples < 0 or args.eval_every < 1:
        common.fail("need --fid-samples 0 or at least 2, and --eval-every >= 1")
    stride2_layers(args.image_size)


def data_fields(args):
    return ("image", "label", "factors") if args.dataset == "shapes" else ("image", "label")


@torch.no_grad()
def evaluate(model, loader, args, device):
    """Mean reconstruction term, KL and negative ELBO (beta = 1) per image, with seeded samples of z."""
    model.eval()
    g = torch.Generator(device).manual_seed(0)      # the same eps at every evaluation: a smooth curve
    totals, n = {"recon": 0.0, "kl": 0.0}, 0
    for x, *_ in loader:
        x = x.to(device)
        with common.autocast(args.amp, device):
            out, mu, logvar = model(x, g)
        totals["recon"] += reconstruction_nll(out, x, args.recon, args.sigma).sum().item()
        totals["kl"] += kl_per_dimension(mu.float(), logvar.float()).sum().item()
        n += len(x)
    metrics = {k: v / n for k, v in totals.items()}
    metrics["neg_elbo"] = metrics["recon"] + metrics["kl"]
    return metrics


def train(args):
    check_flags(args)
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    data = common.load_data(args, fields=data_fields(args))
    run = common.Run("vae", args, reopen=args.sample_only)
    model = build(args, data.channels).to(device)
    parameters = {"encoder": common.count_parameters(model.encoder),
                  "decoder": common.count_parameters(model.decoder)}
    print(f"encoder: {parameters['encoder']:,} parameters, decoder: {parameters['decoder']:,} parameters")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = common.grad_scaler(args.amp, device)
    steps, start = common.total_steps(args, data.train), 0
    state = run.load_checkpoint(MODEL_FLAGS, device)
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start = state["step"]
    if args.sample_only:        # the figures' titles and sampling json report the objective it was trained with
        for key in OBJECTIVE_FLAGS:
            setattr(args, key, state["args"][key])
        return run, model, data, parameters, device, start
    net = common.distribute(model, args, device)      # what the training step calls (see common.distribute)
    batches = common.forever(data.train)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="vae")
    for step in bar:
        model.train()
        x, *_ = next(batches)
        x = x.to(device)
        with common.autocast(args.amp, device):
            out, mu, logvar = net(x)
        recon = reconstruction_nll(out, x, args.recon, args.sigma)
        kl = kl_per_dimension(mu.float(), logvar.float())
        capacity = capacity_at(step, args)
        loss = objective(recon, kl, args.beta, capacity).mean()
        common.check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        stats = dict(loss=loss.item(), recon=recon.mean().item(), kl=kl.sum(1).mean().item())
        stats["neg_elbo"] = stats["recon"] + stats["kl"]
        if capacity is not None:
            stats["capacity"] = capacity
        run.log(step + 1, "train", **stats)
        bar.set_postfix(loss=f"{stats['loss']:.1f}", recon=f"{stats['recon']:.1f}", kl=f"{stats['kl']:.2f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            common.check_replicas(model, step + 1)
            if common.is_main():
                val = evaluate(model, data.val, args, device)
                run.log(step + 1, "val", **val)
                tqdm.write(f"step {step + 1}: validation -ELBO {val['neg_elbo']:.2f} = reconstruction "
                           f"{val['recon']:.2f} + KL {val['kl']:.2f} nats per image")
                run.save_checkpoint(step + 1, model=model.state_dict(), optimizer=opt.state_dict(),
                                    scaler=scaler.state_dict())
    return run, model, data, parameters, device, steps


# ----------------------------------------------------------------------------- figures

@torch.no_grad()
def decode(model, z, kind):
    model.eval()
    return mean_image(model.decoder(z), kind).cpu()


@torch.no_grad()
def sample(model, n, seed, kind, device):
    """Mean images of p(x | z) for z ~ N(0, I) drawn from a generator seeded with `seed`."""
    z = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    return torch.cat([decode(model, b, kind) for b in z.split(500)])


def traversal_figure(run, model, x, analysis, args, suffix="", points=9):
    """Each row varies one z_j over [-3, 3] with the others at mu(x) of a test image; rows by falling KL_j, labelled
    with KL_j and (on shapes) the factor z_j shares most information with."""
    mu, _ = model.encoder(x[None])
    values = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, points)
    order = analysis["kl"].argsort(descending=True).tolist()
    rows, labels = [], []
    for j in order:
        z = mu.repeat(points, 1)
        z[:, j] = values.to(z.device)
        rows.append(decode(model, z, args.recon))
        label = f"z{j}  KL {analysis['kl'][j]:.2f}"
        if "mi" in analysis:
            k = int(analysis["mi"][j].argmax())
            label += f"  {MIG_FACTORS[k]} ({analysis['mi'][j, k]:.2f})"
        labels.append(label)
    run.save_labelled_grid(rows, f"traversals{suffix}.png", labels, [f"{v:.1f}" for v in values.tolist()],
                           f"beta {args.beta:g}: latent traversals (rows by KL; factor with the largest normalised MI)")


def interpolation_figure(run, model, x1, x2, args, suffix="", points=10):
    """Rows from x1 to x2: the two images at the ends, decodings of (1 - a) mu(x1) + a mu(x2) between."""
    alphas = torch.linspace(0, 1, points, device=x1.device)[:, None]
    rows = []
    for a, b in zip(x1, x2):
        (mu_a, _), (mu_b, _) = model.encoder(a[None]), model.encoder(b[None])
        path = decode(model, (1 - alphas) * mu_a + alphas * mu_b, args.recon)
        rows.append(torch.cat([a[None].cpu(), path, b[None].cpu()]))
    run.save_grid(torch.cat(rows), f"interpolation{suffix}.png", nrow=points + 2)


def latent_figure(run, analysis, metrics, args, suffix=""):
    """KL per dimension, the correlation matrices of sampled codes and of means, and (shapes) MI with factors."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = 4 if "mi" in analysis else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8))
    d = len(analysis["kl"])
    axes[0].bar(range(d), analysis["kl"].numpy())
    axes[0].set(xlabel="latent dimension j", ylabel="KL_j (nats)",
                title=f"KL per dimension: {metrics['active_units']} active")
    for ax, key, what, value in ((axes[1], "r_samples", "sampled z ~ q(z|x)", metrics["corr_offdiag_samples"]),
                                 (axes[2], "r_means", "means mu(x)", metrics["corr_offdiag_means"])):
        im = ax.imshow(analysis[key].numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set(title=f"correlation of {what}\nmean |off-diagonal| {value:.3f}", xlabel="j", ylabel="j")
        fig.colorbar(im, ax=ax, fraction=0.046)
    if "mi" in analysis:
        im = axes[3].imshow(analysis["mi"].numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axes[3].set_xticks(range(len(MIG_FACTORS)), MIG_FACTORS, rotation=45, fontsize=7)
        axes[3].set(title=f"I(mu_j; v_k) / H(v_k): MIG {metrics['mig']:.3f}", ylabel="latent dimension j")
        fig.colorbar(im, ax=axes[3], fraction=0.046)
    fig.suptitle(f"beta = {args.beta:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(run.dir / f"latents{suffix}.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- evaluation and the beta sweep

def report(run, model, data, parameters, device, steps, args):
    """Test ELBO terms, latent analysis, figures, and the Frechet distance of --fid-samples prior samples."""
    suffix = f"_seed{args.seed}" if args.sample_only else ""
    metrics = {}
    if not args.sample_only:
        test = evaluate(model, data.test, args, device)
        run.log(steps, "test", **test)
        metrics.update({f"test_{k}": v for k, v in test.items()})
        run.plot_panels(LOSS_PANELS, "terms.png")
        run.plot_losses("neg_elbo", "neg_elbo.png")
    codes = encode_dataset(model, data.test, device, seed=args.seed)
    latent_metrics, analysis = latent_analysis(codes)
    metrics.update(latent_metrics)
    val_codes = encode_dataset(model, data.val, device, seed=args.seed)     # the probe learns on validation codes
    metrics["class_probe_accuracy"] = common.linear_probe(val_codes["mu"], val_codes["label"], codes["mu"],
                                                          codes["label"])
    x = data.test.dataset[torch.arange(24) % len(data.test.dataset)][0].to(device)   # 16 to reconstruct, 4 pairs
    with torch.no_grad():
        recon = mean_image(model(x[:16], torch.Generator(device).manual_seed(args.seed))[0], args.recon).cpu()
        traversal_figure(run, model, x[0], analysis, args, suffix)
        interpolation_figure(run, model, x[16:20], x[20:24], args, suffix)
    originals = x[:16].cpu()
    run.save_grid(torch.cat([originals[:8], recon[:8], originals[8:], recon[8:]]), f"reconstructions{suffix}.png")
    start = time.perf_counter()
    images = sample(model, FIGURE_SAMPLES, args.seed, args.recon, device)
    metrics["seconds_per_image"] = (time.perf_counter() - start) / FIGURE_SAMPLES
    run.save_grid(images, f"samples{suffix}.png")
    latent_figure(run, analysis, metrics, args, suffix)
    if args.fid_samples:
        quality = common.SampleQuality(args, data, device, metric=args.metric)
        samples = sample(model, args.fid_samples, args.seed, args.recon, device)
        metrics["frechet_distance"] = quality.frechet(samples)
        metrics["diversity"] = quality.diversity(samples)
        metrics["frechet_note"] = quality.describe(args.fid_samples)
    return run.finish(parameters, f"sampling{suffix}.json" if args.sample_only else "final.json",
                      step=steps, beta=args.beta, **metrics)


SWEEP_PANELS = (("test_recon", "reconstruction (nats/image)"), ("test_kl", "KL (nats/image)"),
                ("active_units", "active units"), ("corr_offdiag", "mean |off-diagonal correlation|"),
                ("gaussian_tc_samples", "Gaussian TC of sampled codes (nats)"), ("mig", "MIG"),
                ("frechet_distance", "Frechet distance of samples"))
SWEEP_TABLE = ("test_recon", "test_kl", "active_units", "corr_offdiag_samples", "corr_offdiag_means",
               "gaussian_tc_samples", "mig", "class_probe_accuracy", "frechet_distance")
SWEEP_FREE = {"name", "resume", "sweep_beta", "device", "num_workers", "out", "sample_only"}   # may differ per run


def sweep(args):
    """Train (or reuse, or resume) one run per beta under <out>/vae/<name>/beta<b>, then plot every metric
    against beta into <name>/beta_sweep.png and beta_sweep.json, and print a Markdown table by beta."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if args.sample_only:
        common.fail("--sweep-beta trains; to sample one of its runs again use --sample-only --name <sweep>/beta<b>")
    if common.world_size() > 1:
        common.fail("--sweep-beta runs in one process: start it with python, or each beta with torchrun")
    if min(args.sweep_beta) <= 0:
        common.fail("--sweep-beta needs betas above 0 (they are plotted on a log axis)")
    sweep_name = args.name or "beta-sweep"
    root = Path(args.out) / "vae" / sweep_name
    results = {}
    for beta in args.sweep_beta:
        directory = root / f"beta{beta:g}"
        run_args = argparse.Namespace(**{**vars(args), "beta": beta, "name": f"{sweep_name}/beta{beta:g}",
                                         "sweep_beta": None, "resume": (directory / "ckpt.pt").exists()})
        common.check_sweep_run(directory, run_args, SWEEP_FREE)
        if not (directory / "final.json").exists():
            report(*train(run_args), run_args)
        results[beta] = json.loads((directory / "final.json").read_text())
    betas = sorted(results)
    panels = [(k, t) for k, t in SWEEP_PANELS if k == "corr_offdiag" or k in results[betas[0]]]
    columns = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(2, columns, figsize=(3.6 * columns, 6.2), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        if key == "corr_offdiag":
            ax.plot(betas, [results[b]["corr_offdiag_samples"] for b in betas], "o-", label="sampled z")
            ax.plot(betas, [results[b]["corr_offdiag_means"] for b in betas], "s--", label="means mu")
            ax.legend(fontsize=7)
        else:
            ax.plot(betas, [results[b][key] for b in betas], "o-")
        ax.set(xscale="log", xlabel="beta", title=title)
        ax.title.set_fontsize(8)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(root / "beta_sweep.png", dpi=100)
    plt.close(fig)
    (root / "beta_sweep.json").write_text(json.dumps({f"{b:g}": results[b] for b in betas}, indent=2))
    keys = [k for k in SWEEP_TABLE if k in results[betas[0]]]
    print("| beta | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for b in betas:
        print(f"| {b:g} | " + " | ".join(f"{results[b][k]:.4g}" for k in keys) + " |")
    print(f"beta_sweep.png and beta_sweep.json written to {root}")
    return results


def get_args(argv=None):
    p = argparse.ArgumentParser(description="beta-VAE (Kingma & Welling 2014; Higgins et al. 2017) with latent-space "
                                            "analysis: active units, correlation of sampled codes, MIG")
    common.add_shared_flags(p, batch_size=64, lr=1e-3, steps=6000, eval_every=500, image_size=32)
    g = p.add_argument_group("model")
    g.add_argument("--latent-dim", type=int, default=10, help="dimension d of z (Higgins et al. on dSprites: 10)")
    g.add_argument("--channels", type=int, default=32, help="channels of the first conv layer, doubled per layer")
    g.add_argument("--hidden", type=int, default=256, help="width of the linear layers (Burgess et al.: 256)")
    g = p.add_argument_group("objective")
    g.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (1: the ELBO; Higgins et al.: 4+)")
    g.add_argument("--recon", default="gaussian",
                   help="likelihood p(x|z): gaussian (default: sharper, more latents used on shapes; README) "
                        "or bernoulli (logits)")
    g.add_argument("--sigma", type=float, default=0.1,
                   help="--recon gaussian: fixed std s of p(x|z), pixels in [0, 1]; weight 1/(2 s^2)")
    g.add_argument("--capacity", type=float, default=0.0,
                   help="C_max in nats for capacity annealing beta |KL - C_t| (Burgess et al.); 0: off")
    g.add_argument("--capacity-steps", type=int, default=5000, help="optimiser steps over which C_t rises to C_max")
    g.add_argument("--sweep-beta", type=lambda s: [float(b) for b in s.split(",")], default=None,
                   help="comma-separated betas: a run each (named <name>/beta<b>), then metrics against beta")
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--sample-only", action="store_true",
                   help="figures and metrics again from run --name's checkpoint (default: the latest run) for --seed")
    g.add_argument("--fid-samples", type=int, default=1000, help="prior samples for the Frechet distance; 0: skip")
    g.add_argument("--metric", default="classifier", help="Frechet features: classifier (offline) or inception")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    if args.sweep_beta:
        sweep(args)
    else:
        trained = train(args)
        if common.is_main():                          # under torchrun, rank 0 alone reports
            report(*trained, args)


if __name__ == "__main__":
    main()
