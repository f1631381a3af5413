"""Conditional variational autoencoder p(x | y): the label fed to the encoder and the decoder.

Papers: Sohn, Lee & Yan 2015, "Learning Structured Output Representation using Deep Conditional Generative
Models" (the CVAE); Kingma et al. 2014, "Semi-Supervised Learning with Deep Generative Models", arXiv:1406.5298
(the M2 model's p(x | y, z), and its "analogies": style kept, class swapped); the VAE of vae.py (Kingma & Welling
2014; Higgins et al. 2017; Burgess et al. 2018), the same networks and objective as there.

    python cvae.py                              # embedded shapes, 32px (README: time and results)
    python cvae.py --cond onehot                # the one-hot vector itself instead of a learned embedding
    python cvae.py --sample-only --name <run>   # figures and metrics again from a run's checkpoint

Condition. A label y among K classes is the one-hot vector v = e_y in R^K. Any other v is a condition the model
never saw in training: a mix (1 - a) e_y + a e_y', a scaled 2 e_y, the zero vector. `--cond` turns v into the
vector c that both networks receive:
    embedding:  c = E^T v, a learned table E of K rows of --cond-dim numbers (for v = e_y the row E[y]); linear in
                v, so a mix of labels gives the same mix of their embeddings (the default);
    onehot:     c = v (K numbers).
The encoder q_phi(z | x, c) = N(mu_phi(x, c), diag sigma_phi^2(x, c)) gets c beside its convolutional features, the
decoder p_theta(x | z, c) gets [z, c] as its input; the prior stays p(z) = N(0, I) for every class.

Objective, per image, minimised (the batch mean of it), as in vae.py with y added:

    L(x, y) = E_{q(z|x,y)}[ -log p_theta(x | z, y) ] + beta KL(q_phi(z | x, y) || p(z))

KL_j = 1/2 (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2) summed over j; one reparameterised sample z = mu + sigma * eps;
the reconstruction term summed over the D = C*H*W values of x in [0, 1] (sums, not means, so beta keeps its
meaning: see vae.py):
    --recon bernoulli:  -log p(x | z, y) = sum_i softplus(l_i) - x_i l_i
    --recon gaussian:   -log p(x | z, y) = sum_i (x_i - m_i)^2 / (2 s^2) + 1/2 log(2 pi s^2),   s = --sigma
With --capacity, beta |KL - C_t| per image as in vae.py (Burgess et al.). beta = 1 gives the negative conditional ELBO, an
upper bound on -log p(x | y).

What z learns. The decoder is told y, so coding the class in z would cost KL for nothing: the KL term pushes z
to drop the class and keep what varies within a class (position, size, colours, rotation). That is what makes
sampling for a chosen class and swapping classes work (encode x with its own y, decode with another: the same
"style" as another shape). It is measured: a linear probe recovering y from mu(x, y) should do far worse on this
model's codes than on vae.py's (`class_probe_accuracy` in both final.json).

Evaluation: the test ELBO terms; the Frechet distance and conditional accuracy (the share of samples drawn for class
y that common.py's reference classifier labels y) of class-balanced prior samples, decoded as the mean image of
p(x | z, y), with z from N(0, I) and from the fitted prior below; what the classifier makes of the samples of each
unseen condition.

A prior fitted after training (`--prior-components K`, Ghosh et al. 2020's ex-post density estimation, the
second stage of Dai & Wipf 2019). The ELBO asks the aggregate posterior q(z | y) = E_x q(z | x, y) of each class to
match N(0, I), but it does not get there: the codes of a class fill the prior unevenly, so z ~ N(0, I) often lands
where few training codes lie, and the decoder draws a blurred average of the shapes around it (likely culprits:
poses that lie on a circle, like rotations, leave the circle's centre empty; README: lowering the prior's
temperature makes samples worse, not better). So besides the N(0, I) samples, the evaluation fits a mixture of K
full-covariance Gaussians by EM to the codes mu(x, y) of each class's training images, draws z from the mixture of
the class asked for and decodes it. The decoder is unchanged: this only samples z where the decoder was trained.
Memorising is the risk (one component per image would give back the training set), so the log-likelihood of the
validation codes is reported beside the training codes': K should be where the validation likelihood peaks.
The defaults serve this prior: d = 20 and s = 0.05 (twice vae.py's d, half its s) let the codes carry more detail
and the decoder draw sharper outlines from them, while the codes' distribution moves further from N(0, I), so
samples with z ~ N(0, I) get worse (README: both measured).

Differences from Sohn et al.: their prior p(z | x) is a network too (they predict outputs from partial inputs);
with a class label as the only condition, the fixed prior N(0, I) is the common choice (Kingma et al.'s M2).
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

MODEL_FLAGS = ("dataset", "image_size", "latent_dim", "channels", "hidden", "recon", "cond", "cond_dim",
               "num_classes")
RECONS = ("bernoulli", "gaussian")
CONDS = ("onehot", "embedding")
ACTIVE_VARIANCE = 0.01      # Burda et al.: a unit is active when Var_x(E_q[z_j]) exceeds this
FIGURE_COLUMNS = 8          # samples per row of the class, interpolation and unseen-condition figures
FIGURE_SAMPLES = 64         # samples timed for seconds_per_image (as vae.py's sample grid)
LOSS_PANELS = {"objective (minimised)": ("loss",), "reconstruction -log p(x|z,y)": ("recon",),
               "KL(q(z|x,y) || p(z))": ("kl",)}


# ----------------------------------------------------------------------------- networks

def stride2_layers(image_size):
    """Stride-2 layers between image_size x image_size and 4x4 (3 for 32px)."""
    n = round(math.log2(image_size)) - 2 if image_size >= 8 else 0
    if image_size < 8 or 2 ** (n + 2) != image_size:
        common.fail(f"--image-size must be a power of two, at least 8 (the encoder halves it to 4), got {image_size}")
    return n


class ConditionEncoder(nn.Module):
    """v (B, K) -> c: v itself (onehot), or E^T v with a learned table E (embedding); see the module docstring."""

    def __init__(self, num_classes, dim, kind):
        super().__init__()
        if kind not in CONDS:
            common.fail(f"unknown --cond {kind!r}; choose one of {', '.join(CONDS)}")
        self.table = nn.Parameter(torch.randn(num_classes, dim)) if kind == "embedding" else None
        self.dim = dim if kind == "embedding" else num_classes

    def forward(self, v):
        return v if self.table is None else v @ self.table


class Encoder(nn.Module):
    """x (B, C, S, S) in [-1, 1] and c (B, D_c) -> mu, logvar (B, d) each: stride-2 convolutions doubling the
    channels down to 4x4, then two linear layers on the features and c."""

    def __init__(self, image_size, latent_dim, channels, hidden, cond_dim, in_channels=3):
        super().__init__()
        layers, c_in = [], in_channels
        for i in range(stride2_layers(image_size)):
            layers += [nn.Conv2d(c_in, channels * 2 ** i, 4, stride=2, padding=1), nn.ReLU()]   # (B, c, H/2, W/2)
            c_in = channels * 2 ** i
        self.features = nn.Sequential(*layers, nn.Flatten())                                   # (B, c * 4 * 4)
        self.head = nn.Sequential(nn.Linear(c_in * 16 + cond_dim, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 2 * latent_dim))

    def forward(self, x, c):
        mu, logvar = self.head(torch.cat([self.features(x), c], 1)).chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """[z, c] (B, d + D_c) -> (B, C, S, S): the encoder mirrored, two linear layers to 4x4 and stride-2 transposed
    convolutions halving the channels. Outputs Bernoulli logits or Gaussian means (of pixels in [0, 1])."""

    def __init__(self, image_size, latent_dim, channels, hidden, cond_dim, out_channels=3):
        super().__init__()
        n = stride2_layers(image_size)
        c = channels * 2 ** (n - 1)
        self.head = nn.Sequential(nn.Linear(latent_dim + cond_dim, hidden), nn.ReLU(), nn.Linear(hidden, c * 16),
                                  nn.ReLU(), nn.Unflatten(1, (c, 4, 4)))                        # (B, c, 4, 4)
        layers = []
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.ReLU()]      # (B, c/2, 2H, 2W)
            c //= 2
        self.body = nn.Sequential(*layers, nn.ConvTranspose2d(c, out_channels, 4, stride=2, padding=1))

    def forward(self, z, c):
        return self.body(self.head(torch.cat([z, c], 1)))


class CVAE(nn.Module):
    def __init__(self, num_classes, image_size=32, latent_dim=10, channels=32, hidden=256, cond="embedding",
                 cond_dim=64, image_channels=3):
        super().__init__()
        self.cond = ConditionEncoder(num_classes, cond_dim, cond)
        self.encoder = Encoder(image_size, latent_dim, channels, hidden, self.cond.dim, image_channels)
        self.decoder = Decoder(image_size, latent_dim, channels, hidden, self.cond.dim, image_channels)
        self.latent_dim, self.num_classes = latent_dim, num_classes

    def encode(self, x, v):
        return self.encoder(x, self.cond(v))

    def decode(self, z, v):
        return self.decoder(z, self.cond(v))

    def forward(self, x, v, generator=None):
        """Decoder output for one reparameterised sample z ~ q(z|x,y), and q's mu and logvar."""
        c = self.cond(v)
        mu, logvar = self.encoder(x, c)
        return self.decoder(reparameterise(mu, logvar, generator), c), mu, logvar


# ----------------------------------------------------------------------------- objective

def reparameterise(mu, logvar, generator=None):
    """z = mu + sigma * eps with eps ~ N(0, I) (from `generator` if given) and sigma = exp(logvar / 2)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps


def kl_per_dimension(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2), per dimension: (B, d)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def reconstruction_nll(out, x, kind, sigma=0.1):
    """-log p(x | z, y) summed over the image's values, per image (B,); x in [-1, 1] is mapped to [0, 1]."""
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


# ----------------------------------------------------------------------------- training

def build(args, num_classes, channels):
    return CVAE(num_classes, args.image_size, args.latent_dim, args.channels, args.hidden, args.cond, args.cond_dim,
                channels)


def check_flags(args):
    if args.recon not in RECONS:
        common.fail(f"unknown --recon {args.recon!r}; choose one of {', '.join(RECONS)}")
    if args.cond not in CONDS:
        common.fail(f"unknown --cond {args.cond!r}; choose one of {', '.join(CONDS)}")
    if args.beta < 0 or args.sigma <= 0 or args.capacity < 0 or args.capacity_steps < 1:
        common.fail("need --beta >= 0, --sigma > 0, --capacity >= 0 and --capacity-steps >= 1")
    if args.latent_dim < 1 or args.cond_dim < 1:
        common.fail("--latent-dim and --cond-dim must be at least 1")
    if args.fid_samples == 1 or args.fid_samples < 0 or args.eval_every < 1 or args.unseen_samples < 1:
        common.fail("need --fid-samples 0 or at least 2, --eval-every >= 1 and --unseen-samples >= 1")
    if args.prior_components < 0:
        common.fail(f"--prior-components must be 0 (off) or at least 1, got {args.prior_components}")
    stride2_layers(args.image_size)


def check_classes(args, num_classes):
    if num_classes < 2:
        common.fail(f"--dataset {args.dataset} has {num_classes} class; a conditional VAE needs labels")
    if not all(0 <= y < num_classes for y in args.interpolate) or len(args.interpolate) != 2:
        common.fail(f"--interpolate takes two class indices between 0 and {num_classes - 1}, got {args.interpolate}")


@torch.no_grad()
def evaluate(model, loader, args, device):
    """Mean reconstruction term, KL and negative conditional ELBO (beta = 1) per image, with seeded samples of z."""
    model.eval()
    g = torch.Generator(device).manual_seed(0)      # the same eps at every evaluation: a smooth curve
    totals, n = {"recon": 0.0, "kl": 0.0}, 0
    for x, y in loader:
        x, v = x.to(device), common.one_hot(y, model.num_classes).to(device)
        with common.autocast(args.amp, device):
            out, mu, logvar = model(x, v, g)
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
    data = common.load_data(args)
    check_classes(args, data.num_classes)
    args.num_classes = data.num_classes
    run = common.Run("cvae", args, reopen=args.sample_only)
    model = build(args, data.num_classes, data.channels).to(device)
    parameters = {"encoder": common.count_parameters(model.encoder),
                  "decoder": common.count_parameters(model.decoder), "condition": common.count_parameters(model.cond)}
    print(f"encoder: {parameters['encoder']:,} parameters, decoder: {parameters['decoder']:,} parameters, "
          f"condition: {parameters['condition']:,}")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type in ("cuda", "cpu"))   # one kernel
    scaler = common.grad_scaler(args.amp, device)
    steps, start = common.total_steps(args, data.train), 0
    state = run.load_checkpoint(MODEL_FLAGS, device)
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start = state["step"]
    if args.sample_only:
        return run, model, data, parameters, device, start
    net = common.distribute(model, args, device)      # what the training step calls (see common.distribute)
    batches = common.forever(data.train)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="cvae")
    for step in bar:
        model.train()
        x, y = next(batches)
        x, v = x.to(device), common.one_hot(y, data.num_classes).to(device)
        with common.autocast(args.amp, device):
            out, mu, logvar = net(x, v)
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


# ----------------------------------------------------------------------------- sampling and figures

@torch.no_grad()
def decode(model, z, v, kind):
    model.eval()
    return mean_image(model.decode(z, v.to(z.device)), kind).cpu()


@torch.no_grad()
def sample(model, v, seed, kind, device, shared_latents=False):
    """Mean images of p(x | z, v) for each condition vector in v (N, K), z ~ N(0, I) seeded with `seed`; with
    shared_latents, one z for all of them."""
    z = torch.randn(1 if shared_latents else len(v), model.latent_dim, generator=torch.Generator().manual_seed(seed))
    z = z.expand(len(v), -1).to(device)
    return torch.cat([decode(model, zb, vb, kind) for zb, vb in zip(z.split(500), v.split(500))])


@torch.no_grad()
def encode_dataset(model, dataset, device, batch_size=500):
    """Means mu(x, y) and labels of a split's dataset, in its own order (not the loader's shuffled one, so that
    what is fitted to the codes does not depend on the data order)."""
    model.eval()
    mus, labels = [], []
    for start in range(0, len(dataset), batch_size):
        x, y = dataset[torch.arange(start, min(start + batch_size, len(dataset)))]
        mus.append(model.encode(x.to(device), common.one_hot(y, model.num_classes).to(device))[0].float().cpu())
        labels.append(y)
    return torch.cat(mus), torch.cat(labels)


# ----------------------------------------------------------------------------- a prior fitted after training

def fit_mixture(x, components, iterations=200, tolerance=1e-3, seed=0):
    """A Gaussian mixture p(z) = sum_k w_k N(z; m_k, S_k) fitted to the rows of x (N, d) by EM
    (Dempster et al. 1977), in float64. Means start at `components` distinct rows drawn with `seed`, covariances
    at the data's. Every iteration sets the responsibilities r_nk = w_k N(x_n; m_k, S_k) / p(x_n) (E step), then
    w_k = sum_n r_nk / N, m_k = sum_n r_nk x_n / sum_n r_nk and S_k = the r-weighted covariance around m_k (M step).
    Each iteration raises the mean log-likelihood (1/N) sum_n log p(x_n) (EM's guarantee, but for the ridge's
    small effect); the fit stops once an iteration raises it by less than `tolerance` nats (about 50 iterations
    on the codes here), or after `iterations`.
    A ridge of 1e-4 I on every covariance keeps it invertible when a component holds fewer than d + 1 points.
    Returns log w (K,), m (K, d) and the Cholesky factors of S (K, d, d)."""
    x = x.double()
    n, d = x.shape
    if n < components:
        common.fail(f"--prior-components {components} needs at least as many codes per class, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ridge = 1e-4 * torch.eye(d, dtype=x.dtype)
    means, covariances = x[order[:components]], (torch.cov(x.T) + ridge).expand(components, d, d)
    log_weights = torch.full((components,), -math.log(components), dtype=x.dtype)
    previous = -math.inf
    for _ in range(iterations):
        log_joint = mixture_log_joint(x, log_weights, means, torch.linalg.cholesky(covariances))   # (N, K)
        log_likelihood = log_joint.logsumexp(1, keepdim=True)                                      # log p(x_n)
        mean = log_likelihood.mean().item()
        if mean - previous < tolerance:
            break
        previous = mean
        r = (log_joint - log_likelihood).exp()
        mass = r.sum(0) + 1e-12                     # an emptied component keeps weight ~0 rather than dividing by 0
        log_weights, means = (mass / n).log(), (r.T @ x) / mass[:, None]
        centred = x - means[:, None, :]                                                              # (K, N, d)
        covariances = (r.T[:, :, None] * centred).mT @ centred / mass[:, None, None] + ridge
    return log_weights, means, torch.linalg.cholesky(covariances)


def mixture_log_joint(x, log_weights, means, scale_trils):
    """log w_k + log N(x_n; m_k, L_k L_k^T) for every row n and component k: (N, K). With u = L_k^-1 (x_n - m_k),
    log N = -1/2 |u|^2 - sum_i log (L_k)_ii - d/2 log 2 pi (one triangular solve per component for all rows)."""
    x = x.double()
    u = torch.linalg.solve_triangular(scale_trils, (x - means[:, None, :]).mT, upper=False)          # (K, d, N)
    log_det = scale_trils.diagonal(dim1=-2, dim2=-1).log().sum(-1)                                  # (K,)
    log_normal = -0.5 * u.pow(2).sum(1) - log_det[:, None] - 0.5 * x.shape[1] * math.log(2 * math.pi)
    return (log_normal + log_weights[:, None]).T


def class_log_likelihood(mixtures, codes, labels):
    """Mean log p(z_n | y_n) of codes under their classes' mixtures, in nats per code."""
    return sum(mixture_log_joint(codes[labels == y], *mixtures[y]).logsumexp(1).sum().item()
               for y in labels.unique().tolist()) / len(labels)


def sample_mixture(mixture, n, generator):
    """n draws from a mixture: a component k with probability w_k, then m_k + L_k eps with eps ~ N(0, I)."""
    log_weights, means, scale_trils = mixture
    k = torch.multinomial(log_weights.exp(), n, replacement=True, generator=generator)
    eps = torch.randn(n, means.shape[1], 1, generator=generator, dtype=means.dtype)
    return (means[k] + (scale_trils[k] @ eps)[..., 0]).float()


def fit_class_priors(model, data, components, device):
    """A mixture fitted to the codes mu(x, y) of each class's training images (ex-post density estimation: Ghosh
    et al. 2020; Dai & Wipf 2019's second stage), and the mean log-likelihood of training and validation codes."""
    train_mu, train_y = encode_dataset(model, data.train.dataset, device)
    val_mu, val_y = encode_dataset(model, data.val.dataset, device)
    fewest = int(torch.bincount(train_y, minlength=model.num_classes).min())
    if fewest < 2:
        common.fail(f"a class has {fewest} training images, too few to fit a prior to; use --prior-components 0")
    if fewest < components:
        print(f"--prior-components {components}: a class has {fewest} training codes, fitting {fewest} per class "
              "(about a component per code: such a prior gives back near-copies of training images)")
        components = fewest
    mixtures = [fit_mixture(train_mu[train_y == y], components) for y in range(model.num_classes)]
    # far more likely training codes than validation codes would mean the mixture memorises images
    return mixtures, {"components": components, "train": class_log_likelihood(mixtures, train_mu, train_y),
                      "validation": class_log_likelihood(mixtures, val_mu, val_y)}


@torch.no_grad()
def sample_fitted(model, mixtures, labels, seed, kind, device):
    """Mean images of p(x | z, y) for each label, with z drawn from the class's fitted mixture (seeded)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(len(labels), model.latent_dim)
    for y in labels.unique().tolist():
        rows = (labels == y).nonzero().flatten()
        z[rows] = sample_mixture(mixtures[y], len(rows), g)
    v = common.one_hot(labels, model.num_classes)
    return torch.cat([decode(model, zb.to(device), vb, kind) for zb, vb in zip(z.split(500), v.split(500))])


def figures(run, model, data, args, device, quality, suffix):
    """Rows per class, the interpolation between two classes' conditions, the unseen conditions and class swaps;
    returns what the reference classifier makes of the unseen conditions' samples."""
    k, names = data.num_classes, data.classes
    columns = [str(i) for i in range(FIGURE_COLUMNS)]
    # one row per class; column j uses the same z in every row
    rows = [sample(model, common.one_hot(torch.full((FIGURE_COLUMNS,), y), k), args.seed + 1, args.recon, device)
            for y in range(k)]
    run.save_grid(torch.cat(rows), f"samples{suffix}.png", nrow=FIGURE_COLUMNS)
    # (1 - alpha) e_a + alpha e_b with z fixed along each row
    a, b = args.interpolate
    alphas = torch.linspace(0, 1, 9).tolist()
    rows = [sample(model, common.interpolate(a, b, alphas, k), args.seed + 2 + r, args.recon, device, shared_latents=True)
            for r in range(4)]
    run.save_labelled_grid(rows, f"interpolation{suffix}.png", [f"z{r}" for r in range(4)],
                           [f"{alpha:.2f}" for alpha in alphas],
                           f"condition (1 - alpha) e_{names[a]} + alpha e_{names[b]}, z fixed per row")
    # unseen condition vectors: a row each (columns share z across rows), and the classifier's verdict on them
    unseen, rows = {}, []
    for name, vector in common.unseen_conditions(k, args.seed).items():
        images = sample(model, vector.expand(args.unseen_samples, -1), args.seed + 1, args.recon, device)
        rows.append(images[:FIGURE_COLUMNS])
        shares = torch.bincount(quality.predict(images), minlength=k).float() / len(images)
        unseen[name] = {names[i]: round(shares[i].item(), 3) for i in shares.argsort(descending=True)[:3]}
        print(f"unseen condition {name}: classified as {unseen[name]}")
    labels = [f"{name}: {', '.join(f'{c} {s:.0%}' for c, s in list(v.items())[:2])}" for name, v in unseen.items()]
    run.save_labelled_grid(rows, f"unseen_conditions{suffix}.png", labels, columns,
                           "condition vectors never seen in training (classifier's verdict on "
                           f"{args.unseen_samples} samples each)")
    # class swap: encode a test image of each class with its own label, decode with every label
    x_all, y_all = data.test.dataset[torch.arange(min(len(data.test.dataset), 1000))]
    picks = [int((y_all == y).nonzero()[0]) for y in range(k) if (y_all == y).any()]
    rows = []
    for i in picks:
        x, v = x_all[i:i + 1].to(device), common.one_hot(y_all[i:i + 1], k).to(device)
        with torch.no_grad():
            mu, _ = model.encode(x, v)
        rows.append(torch.cat([x.cpu(), decode(model, mu.expand(k, -1), common.one_hot(torch.arange(k), k), args.recon)]))
    run.save_labelled_grid(rows, f"class_swap{suffix}.png", [names[int(y_all[i])] for i in picks],
                           ["input", *names], "z = mu(x, y) of the input, decoded with every class")
    return unseen


def fitted_prior_metrics(model, mixtures, log_likelihood, quality, data, args, device):
    """Frechet distance, conditional accuracy and diversity of --fid-samples class-balanced samples whose z come
    from the fitted mixtures, and the mixtures' log-likelihoods."""
    labels = torch.arange(args.fid_samples) % data.num_classes
    samples = sample_fitted(model, mixtures, labels, args.seed, args.recon, device)
    correct = quality.predict(samples) == labels
    return {"components_per_class": log_likelihood["components"],
            "log_likelihood_train_codes": log_likelihood["train"],
            "log_likelihood_validation_codes": log_likelihood["validation"],
            "frechet_distance": quality.frechet(samples), "conditional_accuracy": correct.float().mean().item(),
            "conditional_accuracy_per_class": {name: round(correct[labels == y].float().mean().item(), 3)
                                               for y, name in enumerate(data.classes)},
            "diversity": quality.diversity(samples)}


def report(run, model, data, parameters, device, steps, args):
    """Test ELBO terms, figures, the class information left in z, and the Frechet distance and conditional accuracy
    of --fid-samples class-balanced prior samples."""
    suffix = f"_seed{args.seed}" if args.sample_only else ""
    metrics = {}
    if not args.sample_only:
        test = evaluate(model, data.test, args, device)
        run.log(steps, "test", **test)
        metrics.update({f"test_{k}": v for k, v in test.items()})
        run.plot_panels(LOSS_PANELS, "terms.png")
        run.plot_losses("neg_elbo", "neg_elbo.png")
    mu, labels = encode_dataset(model, data.test.dataset, device)
    fit_mu, fit_labels = encode_dataset(model, data.val.dataset, device)    # the probe learns on validation codes
    metrics["active_units"] = int((mu.var(0) > ACTIVE_VARIANCE).sum())
    metrics["class_probe_accuracy"] = common.linear_probe(fit_mu, fit_labels, mu, labels)
    x = data.test.dataset[torch.arange(16) % len(data.test.dataset)]
    with torch.no_grad():
        out, _, _ = model(x[0].to(device), common.one_hot(x[1], data.num_classes).to(device),
                          torch.Generator(device).manual_seed(args.seed))
    recon = mean_image(out, args.recon).cpu()
    run.save_grid(torch.cat([x[0][:8], recon[:8], x[0][8:], recon[8:]]), f"reconstructions{suffix}.png")
    quality = common.SampleQuality(args, data, device, metric=args.metric)
    metrics["unseen_conditions"] = figures(run, model, data, args, device, quality, suffix)
    start = time.perf_counter()
    sample(model, common.one_hot(torch.arange(FIGURE_SAMPLES) % data.num_classes, data.num_classes), args.seed, args.recon,
           device)
    metrics["seconds_per_image"] = (time.perf_counter() - start) / FIGURE_SAMPLES
    if args.fid_samples:
        labels = torch.arange(args.fid_samples) % data.num_classes
        samples = sample(model, common.one_hot(labels, data.num_classes), args.seed, args.recon, device)
        metrics["frechet_distance"] = quality.frechet(samples)
        correct = quality.predict(samples) == labels
        metrics["conditional_accuracy"] = correct.float().mean().item()
        metrics["conditional_accuracy_per_class"] = {name: round(correct[labels == y].float().mean().item(), 3)
                                                     for y, name in enumerate(data.classes)}
        metrics["diversity"] = quality.diversity(samples)
        metrics["frechet_note"] = quality.describe(args.fid_samples) + ", class-balanced"
    if args.fid_samples and args.prior_components:
        mixtures, log_likelihood = fit_class_priors(model, data, args.prior_components, device)
        metrics["fitted_prior"] = fitted_prior_metrics(model, mixtures, log_likelihood, quality, data, args, device)
        rows = sample_fitted(model, mixtures, torch.arange(data.num_classes).repeat_interleave(FIGURE_COLUMNS),
                             args.seed + 1, args.recon, device)
        run.save_grid(rows, f"samples_fitted_prior{suffix}.png", nrow=FIGURE_COLUMNS)
    return run.finish(parameters, f"sampling{suffix}.json" if args.sample_only else "final.json",
                      step=steps, **metrics)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Conditional VAE p(x | y) (Sohn et al. 2015): the label into the encoder "
                                            "and the decoder; class samples, interpolation, unseen conditions")
    # 18,000 steps, three times vae.py's: class-specific outlines come late (README: 72.7% at 6,000, 90.6% at 18,000)
    common.add_shared_flags(p, batch_size=64, lr=1e-3, steps=18_000, eval_every=1000, image_size=32)
    g = p.add_argument_group("model")
    g.add_argument("--latent-dim", type=int, default=20,
                   help="dimension d of z (20: sharper samples from the fitted prior than vae.py's 10; README)")
    g.add_argument("--channels", type=int, default=32, help="channels of the first conv layer, doubled per layer")
    g.add_argument("--hidden", type=int, default=256, help="width of the linear layers (Burgess et al.: 256)")
    g.add_argument("--cond", default="embedding",
                   help="condition vector c: embedding (E^T v, default: the better conditional accuracy, README) or "
                        "onehot (v itself)")
    g.add_argument("--cond-dim", type=int, default=64,
                   help="--cond embedding: dimension of the label embedding (64: better than 16 on shapes, README)")
    g = p.add_argument_group("objective")
    g.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (1: the conditional ELBO)")
    g.add_argument("--recon", default="gaussian",
                   help="likelihood p(x|z,y): gaussian (default: sharper, more latents used on shapes; README) "
                        "or bernoulli (logits)")
    g.add_argument("--sigma", type=float, default=0.05,
                   help="--recon gaussian: fixed std s of p(x|z,y), pixels in [0, 1]; weight 1/(2 s^2) (0.05: sharper "
                        "than vae.py's 0.1, for the fitted prior; README)")
    g.add_argument("--capacity", type=float, default=0.0,
                   help="C_max in nats for capacity annealing beta |KL - C_t| (Burgess et al.); 0: off")
    g.add_argument("--capacity-steps", type=int, default=5000, help="optimiser steps over which C_t rises to C_max")
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--interpolate", type=lambda s: tuple(int(v) for v in s.split(",")), default=(0, 1),
                   help="two class indices a,b for the condition interpolation figure")
    g.add_argument("--unseen-samples", type=int, default=200, help="samples per unseen condition for its verdict")
    g.add_argument("--sample-only", action="store_true",
                   help="figures and metrics again from run --name's checkpoint (default: the latest run) for --seed")
    g.add_argument("--fid-samples", type=int, default=1000, help="class-balanced prior samples for the Frechet "
                                                                 "distance and conditional accuracy; 0: skip")
    g.add_argument("--metric", default="classifier", help="Frechet features: classifier (offline) or inception")
    g.add_argument("--prior-components", type=int, default=64,
                   help="also sample z from a K-component Gaussian mixture per class fitted to the training codes "
                        "after training (README: why); 0, or --fid-samples 0: only the N(0, I) prior")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    trained = train(args)
    if common.is_main():                              # under torchrun, rank 0 alone reports
        report(*trained, args)


if __name__ == "__main__":
    main()
