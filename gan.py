"""Generative adversarial network (DCGAN), with the objectives and balance tricks a course compares.

Papers: Goodfellow et al. 2014, "Generative Adversarial Nets", arXiv:1406.2661 (minimax and non-saturating);
Radford, Metz & Chintala 2016, "DCGAN", arXiv:1511.06434 (architecture, Adam beta1 = 0.5, N(0, 0.02) init);
Mao et al. 2017, "Least Squares GAN", arXiv:1611.04076; Lim & Ye 2017, "Geometric GAN", arXiv:1705.02894 (hinge
loss); Miyato et al. 2018, "Spectral Normalization", arXiv:1802.05957; Heusel et al. 2017, arXiv:1706.08500 (TTUR);
Salimans et al. 2016, arXiv:1606.03498 (one-sided label smoothing); Sonderby et al. 2017, arXiv:1610.04490
(instance noise); Mescheder, Geiger & Nowozin 2018, arXiv:1801.04406 (R1 penalty).

    python gan.py                                    # embedded shapes, 32px (see README for time and results)
    python gan.py --loss minimax                     # the saturating objective: watch G stall
    python gan.py --dataset cifar10 --steps 20000    # real images
    python gan.py --sample-only --name <run>         # samples and figures again from a run's checkpoint

Objective. A generator G maps z ~ N(0, I) to an image; a discriminator D maps an image to a logit l = D(x), its
probability of "real" being sigmoid(l). Goodfellow et al. play the two-player game

    min_G max_D V(D, G) = E_x[ log sigmoid(D(x)) ] + E_z[ log(1 - sigmoid(D(G(z)))) ].

For a fixed G the best D is D*(x) = p_data(x) / (p_data(x) + p_G(x)), and then V = 2 JS(p_data || p_G) - log 4:
G minimises the Jensen-Shannon divergence. Both networks are trained by alternating gradient steps with two
optimisers, `--d-steps` D steps per G step. `--loss` picks the pair of losses each minimises (every expectation
is a batch mean, and D's two terms are added: all logits 0 give log 2 + log 2 for the BCE forms):

    minimax  L_D = -log sigmoid(l_real) - log(1 - sigmoid(l_fake))       L_G = log(1 - sigmoid(l_fake))
    nonsat   L_D = as minimax                                            L_G = -log sigmoid(l_fake)
    hinge    L_D = max(0, 1 - l_real) + max(0, 1 + l_fake)                L_G = -l_fake
    ls       L_D = 1/2 (l_real - 1)^2 + 1/2 l_fake^2                      L_G = 1/2 (l_fake - 1)^2

with l_real = D(x), l_fake = D(G(z)), computed on logits (softplus / BCE-with-logits: stable, autocast-safe).
Why they behave differently: dL_G/dl_fake is -sigmoid(l_fake) for minimax, which vanishes exactly when D confidently
rejects the fakes (early in training), so G stalls; the non-saturating form (Goodfellow et al., Sec. 3) has
-(1 - sigmoid(l_fake)), close to -1 there: the same fixed point, strong gradients when G is bad. Hinge stops
pushing D once a sample is beyond the margin; least squares penalises fakes by their distance to the real target
even when they are on the right side (with targets -1, 1, 0 in place of these 0, 1, 1 its optimum
minimises a Pearson chi^2 divergence; Mao et al. use the 0-1 coding in their experiments, as here).

Balance tricks (flags): two learning rates (`--lr` for G, `--lr-d` for D: TTUR), `--d-steps`, one-sided label
smoothing (real target 0.9 instead of 1 in D's loss; fakes stay at 0), instance noise (Gaussian noise of std sigma on
every image D sees, sigma annealed linearly to 0), spectral normalisation of D's layers (each weight divided by
its largest singular value, so D is about 1-Lipschitz layer by layer; replaces D's batch norm), the R1 penalty
gamma/2 E_x ||grad_x D(x)||^2 on real images added to L_D, and an exponential moving average of G's weights for
sampling. Monitoring: D's outputs on real and fake, both losses and gradient norms every step; a warning when D
classifies every real and fake image correctly for WIN_STEPS steps in a row (D wins outright: G's gradients
carry little information), and when the pixel diversity of samples for fixed latents falls below COLLAPSE_RATIO
of the best it reached (mode collapse).

G's output layer, `--g-out`: DCGAN's generator draws the image with its last transposed convolution (`deconv`), from
features at half the image's size, so each output pixel is tanh of a linear function of a 2x2 patch of 16x16
features at 32px; `conv` (the default) adds one more up-block to full resolution and draws the image there with a
3x3 convolution, as SNGAN's standard CNN generator does (Miyato et al. 2018, Table 3). After the default 5,000
steps it raised the share of samples the reference classifier labels confidently from 35% to 54% at the same
Frechet distance (one seed each; README), for a step 1.19x slower.

Differences from DCGAN: sizes 16, 32 and 64 by the number of stride-2 layers (DCGAN: 64 only); G's output layer
(above); samples from an EMA of G in eval mode (batch norm with running statistics; DCGAN samples from G itself in
train mode).
"""
import argparse
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

MODEL_FLAGS = ("dataset", "image_size", "latent_dim", "g_channels", "g_out", "d_channels", "spectral_norm")
IMPLIED_FLAGS = {"g_out": "deconv"}     # model flags added later whose absence from a checkpoint means this value
LOSSES = ("minimax", "nonsat", "hinge", "ls")
INIT_STD = 0.02         # DCGAN: every weight drawn from N(0, 0.02^2)
LEAKY_SLOPE = 0.2       # DCGAN's LeakyReLU slope in D
WIN_STEPS = 200         # G steps of D separating everything before "D wins outright" is reported
COLLAPSE_RATIO = 0.5    # sample diversity falling below this share of its best is reported as collapse
MONITOR_EVERY = 100     # G steps between diversity checks
MONITOR_SAMPLES = 64    # fixed latents of the diversity check, the progress figure and the sample grids
BALANCE_PANELS = {"D output": ("d_real", "d_fake"), "loss": ("loss_d", "loss_g"),
                  "gradient norm": ("grad_norm_d", "grad_norm_g"), "pixel diversity / data's": ("pixel_diversity",)}


# ----------------------------------------------------------------------------- networks

def stride2_layers(image_size):
    """Stride-2 layers between 4x4 and image_size x image_size (3 for 32px)."""
    n = round(math.log2(image_size)) - 2 if image_size >= 16 else 0
    if image_size < 16 or 2 ** (n + 2) != image_size:
        common.fail(f"--image-size must be a power of two, at least 16 (the DCGAN stack halves it to 4), "
                    f"got {image_size}")
    return n


class Generator(nn.Module):
    """z (B, latent_dim) -> image (B, C, S, S) in [-1, 1]: a transposed convolution to 4x4, then stride-2
    transposed convolutions halving the channels and doubling the size, batch norm and ReLU between, tanh last.
    The image is drawn by a last transposed convolution from half-resolution features (g_out="deconv", DCGAN) or by
    a 3x3 convolution after one more up-block to full resolution (g_out="conv", SNGAN's standard CNN)."""

    def __init__(self, image_size=32, latent_dim=100, channels=64, out_channels=3, g_out="conv"):
        super().__init__()
        if g_out not in ("deconv", "conv"):
            common.fail(f"unknown --g-out {g_out!r}; choose deconv or conv")
        n = stride2_layers(image_size)
        c = channels * 2 ** (n - 1)
        layers = [nn.ConvTranspose2d(latent_dim, c, 4, stride=1, padding=0, bias=False),      # (B, c, 4, 4)
                  nn.BatchNorm2d(c), nn.ReLU()]
        for _ in range(n - 1 if g_out == "deconv" else n):    # conv: one more, to full resolution
            layers += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1, bias=False),     # (B, c/2, 2H, 2W)
                       nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        if g_out == "deconv":
            layers += [nn.ConvTranspose2d(c, out_channels, 4, stride=2, padding=1), nn.Tanh()]  # (B, C, S, S)
        else:
            layers += [nn.Conv2d(c, out_channels, 3, padding=1), nn.Tanh()]                      # (B, C, S, S)
        self.net = nn.Sequential(*layers)
        self.latent_dim = latent_dim
        init_weights(self)

    def forward(self, z):
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """image (B, C, S, S) -> logit (B,): stride-2 convolutions doubling the channels down to 4x4, LeakyReLU, batch
    norm after all but the first (none with spectral norm), and a 4x4 convolution to one logit."""

    def __init__(self, image_size=32, channels=64, in_channels=3, spectral_norm=False):
        super().__init__()
        n = stride2_layers(image_size)
        layers, c = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE)], channels
        for _ in range(n - 1):
            layers += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1, bias=spectral_norm),       # (B, 2c, H/2, W/2)
                       nn.Identity() if spectral_norm else nn.BatchNorm2d(2 * c), nn.LeakyReLU(LEAKY_SLOPE)]
            c *= 2
        self.features = nn.Sequential(*layers)                                                  # (B, c, 4, 4)
        self.head = nn.Conv2d(c, 1, 4, stride=1, padding=0)                                  # (B, 1, 1, 1)
        init_weights(self)
        if spectral_norm:           # after the initialisation, so that the power iteration starts from these weights
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x):
        return self.head(self.features(x)).flatten()


def init_weights(module):
    """DCGAN's initialisation: conv weights ~ N(0, 0.02^2), batch-norm scales ~ N(1, 0.02^2), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, INIT_STD)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- objectives

def d_loss(l_real, l_fake, kind, real_target=1.0):
    """L_D for logits of real and fake batches (see the module docstring); real_target < 1 is label smoothing."""
    if kind in ("minimax", "nonsat"):
        return (F.binary_cross_entropy_with_logits(l_real, torch.full_like(l_real, real_target))
                + F.binary_cross_entropy_with_logits(l_fake, torch.zeros_like(l_fake)))
    if kind == "hinge":
        return F.relu(1 - l_real).mean() + F.relu(1 + l_fake).mean()
    if kind == "ls":
        return 0.5 * (l_real - real_target).pow(2).mean() + 0.5 * l_fake.pow(2).mean()
    common.fail(f"unknown --loss {kind!r}; choose one of {', '.join(LOSSES)}")


def g_loss(l_fake, kind):
    """L_G for D's logits of a fake batch (see the module docstring)."""
    if kind == "minimax":
        return -F.softplus(l_fake).mean()            # log(1 - sigmoid(l)) = -softplus(l)
    if kind == "nonsat":
        return F.softplus(-l_fake).mean()            # -log sigmoid(l) = softplus(-l)
    if kind == "hinge":
        return -l_fake.mean()
    if kind == "ls":
        return 0.5 * (l_fake - 1).pow(2).mean()
    common.fail(f"unknown --loss {kind!r}; choose one of {', '.join(LOSSES)}")


def d_output(logits, kind):
    """What the balance plot shows as D(x): the probability sigmoid(l) for the BCE losses, the raw output
    otherwise (hinge: a margin score, ls: a regression towards 1 for real, 0 for fake)."""
    return torch.sigmoid(logits) if kind in ("minimax", "nonsat") else logits


def d_accuracy(l_real, l_fake, kind):
    """Share of real and fake images on D's correct side of its decision threshold (0.5 for ls, logit 0 else)."""
    threshold = 0.5 if kind == "ls" else 0.0
    return 0.5 * ((l_real > threshold).float().mean() + (l_fake < threshold).float().mean())


def r1_penalty(discriminator, x):
    """R1 = E_x ||grad_x D(x)||^2 on real images (Mescheder et al., Eq. 9 without gamma/2); returns it and D(x)."""
    x = x.detach().requires_grad_(True)
    logits = discriminator(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)   # the penalty is differentiated again
    return grad.pow(2).flatten(1).sum(1).mean(), logits


def with_noise(x, sigma):
    """Instance noise: D sees x + sigma eps, for real and fake alike."""
    return x + sigma * torch.randn_like(x) if sigma > 0 else x


# ----------------------------------------------------------------------------- sampling and latent interpolation

def latents(n, latent_dim, seed, device="cpu"):
    """z ~ N(0, I) from a generator seeded with `seed`: the same seed gives the same latents."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)


def lerp(z1, z2, alphas):
    """z = a z1 + (1 - a) z2 for each a: (D,), (D,), (A,) -> (A, D)."""
    a = alphas[:, None]
    return a * z1 + (1 - a) * z2


def slerp(z1, z2, alphas):
    """Spherical interpolation from z2 (a = 0) to z1 (a = 1) along the great circle, with the norms interpolated
    linearly. Gaussian latents in high dimension lie near the sphere of radius sqrt(D); straight-line midpoints
    are shorter (1/sqrt(2) as long for orthogonal ends) and so atypical for G (White 2016, arXiv:1609.04468)."""
    u1, u2 = z1 / z1.norm(), z2 / z2.norm()
    theta = torch.arccos((u1 * u2).sum().clamp(-1, 1))
    a = alphas[:, None]
    if theta < 1e-4:                                   # (nearly) parallel ends: the arc is the segment
        direction = lerp(u1, u2, alphas)
    else:
        direction = (torch.sin(a * theta) * u1 + torch.sin((1 - a) * theta) * u2) / torch.sin(theta)
    return direction * lerp(z1.norm()[None], z2.norm()[None], alphas)


@torch.no_grad()
def generate(generator, n, seed, device, batch_size=500):
    """n images from G (in eval mode) for latents seeded with `seed`."""
    generator.eval()
    z = latents(n, generator.latent_dim, seed, device)
    return torch.cat([generator(b).float().cpu() for b in z.split(batch_size)])


def pixel_diversity(images):
    """Mean pairwise L2 distance between the images of a batch (the collapse monitor's signal)."""
    flat = images.flatten(1).float()
    return torch.pdist(flat).mean().item()


# ----------------------------------------------------------------------------- training

def build(args, channels):
    return (Generator(args.image_size, args.latent_dim, args.g_channels, channels, args.g_out),
            Discriminator(args.image_size, args.d_channels, channels, args.spectral_norm))


def check_flags(args):
    if args.loss not in LOSSES:
        common.fail(f"unknown --loss {args.loss!r}; choose one of {', '.join(LOSSES)}")
    if args.g_out not in ("deconv", "conv"):
        common.fail(f"unknown --g-out {args.g_out!r}; choose deconv or conv")
    if args.label_smoothing and args.loss == "hinge":
        common.fail("--label-smoothing changes the real target of a BCE or least-squares D; hinge has no target")
    if not 0 <= args.label_smoothing < 1 or args.d_steps < 1 or args.instance_noise < 0 or args.r1 < 0:
        common.fail("need 0 <= --label-smoothing < 1, --d-steps >= 1, --instance-noise >= 0 and --r1 >= 0")
    if args.fid_samples == 1 or args.fid_samples < 0 or args.eval_every < 1 or not 0 <= args.ema < 1:
        common.fail("need --fid-samples 0 or at least 2, --eval-every >= 1 and 0 <= --ema < 1")
    stride2_layers(args.image_size)


def d_step(G, D, opt_d, x, args, sigma, scaler=None):
    """One step on L_D (+ gamma/2 R1) for a real batch x and a fresh fake batch; returns the step's statistics.
    loss_d is the adversarial term alone (what validation measures); the penalties are logged beside it.
    `scaler`: --amp fp16's gradient scaler (see common.grad_scaler); none in full precision."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    z = torch.randn(len(x), G.latent_dim, device=x.device)
    with torch.no_grad():
        fake = G(z)
    with common.autocast(args.amp, x.device):
        if args.r1:
            penalty, l_real = r1_penalty(D, with_noise(x, sigma))
        else:
            penalty, l_real = torch.zeros((), device=x.device), D(with_noise(x, sigma))
        l_fake = D(with_noise(fake, sigma))
        adversarial = d_loss(l_real.float(), l_fake.float(), args.loss, 1 - args.label_smoothing)
        loss = adversarial + args.r1 / 2 * penalty
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt_d)                        # the logged gradient norm is the true one
    scaler.step(opt_d)
    scaler.update()
    return dict(loss_d=adversarial, d_real=d_output(l_real, args.loss).mean(),
                d_fake=d_output(l_fake, args.loss).mean(),
                d_acc=d_accuracy(l_real, l_fake, args.loss), grad_norm_d=grad_norm(D), r1=penalty)


def g_step(G, D, opt_g, batch_size, args, sigma, device, scaler=None):
    """One step on L_G for a fresh fake batch; D's weights are frozen for it (no gradients computed for them)."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    D.requires_grad_(False)
    z = torch.randn(batch_size, args.latent_dim, device=device)
    with common.autocast(args.amp, device):
        loss = g_loss(D(with_noise(G(z), sigma)).float(), args.loss)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt_g)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    return dict(loss_g=loss, grad_norm_g=grad_norm(G))


def grad_norm(module):
    return torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])


@torch.no_grad()
def update_ema(ema, model, decay):
    """theta_ema <- d theta_ema + (1 - d) theta. Batch-norm running statistics are copied from G: they belong to
    G's current weights, not to the average, an approximation that holds while the weights move slowly (BigGAN
    recomputes them for the averaged weights instead)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


@torch.no_grad()
def evaluate_d(G, D, loader, args, device, max_batches=20):
    """L_D, L_G and D's outputs on held-out real images and fresh fakes (seeded): a D that only memorised the
    training images scores held-out images as it scores fakes. Copies of G and D run in train mode, so batch norm
    uses batch statistics as in training, and the originals' running statistics stay as they were."""
    G, D = copy.deepcopy(G).train(), copy.deepcopy(D).train()
    totals, n, g = {}, 0, torch.Generator(device).manual_seed(1)    # the same fakes at every evaluation
    for b, (x, *_) in enumerate(loader):
        if b == max_batches:
            break
        x = x.to(device)
        l_real, l_fake = D(x).float(), D(G(torch.randn(len(x), G.latent_dim, generator=g, device=device))).float()
        stats = dict(loss_d=d_loss(l_real, l_fake, args.loss), loss_g=g_loss(l_fake, args.loss),
                     d_real=d_output(l_real, args.loss).mean(), d_fake=d_output(l_fake, args.loss).mean())
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(x)
        n += len(x)
    return {k: v / n for k, v in totals.items()}


class BalanceMonitor:
    """Warns (once per episode) when D wins outright, or when the samples' diversity drops below COLLAPSE_RATIO
    of the best it reached (G collapsing onto a few modes); see the module docstring."""

    def __init__(self, real_diversity):
        self.real_diversity, self.best, self.won_for = real_diversity, 0.0, 0
        self.warned_win = self.warned_collapse = False

    def d_step(self, step, accuracy):
        self.won_for = self.won_for + 1 if accuracy >= 0.99 else 0
        if self.won_for >= WIN_STEPS and not self.warned_win:
            tqdm.write(f"warning: step {step}: D has separated every real and fake image for {WIN_STEPS} steps "
                       "(D wins outright); try --label-smoothing, --instance-noise, --r1 or a lower --lr-d")
        self.warned_win = self.won_for >= WIN_STEPS

    def diversity(self, step, diversity):
        """Records the pixel diversity of the fixed-latent samples; returns it as a share of the data's."""
        ratio = diversity / self.real_diversity
        self.best = max(self.best, ratio)
        collapsed = ratio < COLLAPSE_RATIO * self.best
        if collapsed and not self.warned_collapse:
            tqdm.write(f"warning: step {step}: sample diversity fell to {ratio:.2f} of the data's, from "
                       f"{self.best:.2f} (mode collapse?)")
        self.warned_collapse = collapsed
        return ratio


def train(args):
    check_flags(args)
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    data = common.load_data(args)
    run = common.Run("gan", args, reopen=args.sample_only)
    G, D = build(args, data.channels)
    G, D = G.to(device), D.to(device)
    ema = copy.deepcopy(G).requires_grad_(False)
    parameters = {"generator": common.count_parameters(G), "discriminator": common.count_parameters(D)}
    print(f"G: {parameters['generator']:,} parameters, D: {parameters['discriminator']:,} parameters")
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(args.beta1, 0.999))
    scaler_g, scaler_d = common.grad_scaler(args.amp, device), common.grad_scaler(args.amp, device)
    steps, start, progress = common.total_steps(args, data.train), 0, []
    state = run.load_checkpoint(MODEL_FLAGS, device, IMPLIED_FLAGS)
    if state:
        for module, key in ((G, "generator"), (D, "discriminator"), (ema, "ema"), (opt_g, "opt_g"), (opt_d, "opt_d"),
                            (scaler_g, "scaler_g"), (scaler_d, "scaler_d")):
            module.load_state_dict(state[key])
        start, progress = state["step"], state["progress"]
    if args.sample_only:
        return run, ema, G, D, data, parameters, device, start
    # What the training steps call (see common.distribute): D's step takes fakes from G without gradients, and
    # G's step runs D frozen, so each needs only the other's plain module.
    G_net, D_net = common.distribute(G, args, device), common.distribute(D, args, device)
    fixed_z = latents(MONITOR_SAMPLES, args.latent_dim, args.seed, device)
    monitor = BalanceMonitor(pixel_diversity(next(iter(data.val))[0][:MONITOR_SAMPLES]))
    batches = common.forever(data.train)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="gan")
    for step in bar:
        G.train(), D.train()
        sigma = args.instance_noise * max(0.0, 1 - step / steps)       # annealed linearly to 0
        for _ in range(args.d_steps):                                    # (1) update D: maximise V over D
            x, _ = next(batches)
            d_stats = d_step(G, D_net, opt_d, x.to(device), args, sigma, scaler_d)
        g_stats = g_step(G_net, D, opt_g, len(x), args, sigma, device, scaler_g)   # (2) update G
        update_ema(ema, G, min(args.ema, (1 + step) / (10 + step)))      # ramped up as in ddpm.py
        stats = {k: v.item() for k, v in {**d_stats, **g_stats}.items()}
        common.check_finite(stats["loss_d"] + stats["loss_g"], step)
        monitor.d_step(step + 1, stats["d_acc"])
        if (step + 1) % MONITOR_EVERY == 0:
            with torch.no_grad():
                stats["pixel_diversity"] = monitor.diversity(step + 1, pixel_diversity(G.eval()(fixed_z).cpu()))
        run.log(step + 1, "train", **stats)
        bar.set_postfix(D=f"{stats['loss_d']:.3f}", G=f"{stats['loss_g']:.3f}", Dx=f"{stats['d_real']:.2f}",
                        DGz=f"{stats['d_fake']:.2f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            common.check_replicas(G, step + 1)
            common.check_replicas(D, step + 1)
            if common.is_main():
                val = evaluate_d(G, D, data.val, args, device)
                run.log(step + 1, "val", **val)
                tqdm.write(f"step {step + 1}: validation L_D {val['loss_d']:.4f}, L_G {val['loss_g']:.4f}, "
                           f"D(x) {val['d_real']:.3f}, D(G(z)) {val['d_fake']:.3f}")
                with torch.no_grad():
                    samples = ema.eval()(fixed_z).cpu()
                run.save_grid(samples, f"samples_{step + 1:06d}.png")
                progress.append((step + 1, samples[:8]))             # samples over training: a row per evaluation
                run.save_grid(torch.cat([x for _, x in progress]), "progress.png")
                run.save_checkpoint(step + 1, generator=G.state_dict(), discriminator=D.state_dict(),
                                    ema=ema.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
                                    scaler_g=scaler_g.state_dict(), scaler_d=scaler_d.state_dict(),
                                    progress=progress)
    return run, ema, G, D, data, parameters, device, steps


# ----------------------------------------------------------------------------- figures and evaluation

def interpolation_figures(run, ema, args, device, pairs=4, points=10):
    """Rows of G(z) along the linear and the spherical path between pairs of latents (same pairs in both)."""
    z = latents(2 * pairs, args.latent_dim, args.seed + 1, device)
    alphas = torch.linspace(1, 0, points, device=device)              # from z1 (a = 1) to z2 (a = 0)
    for name, path in (("linear", lerp), ("spherical", slerp)):
        zs = torch.cat([path(z[2 * i], z[2 * i + 1], alphas) for i in range(pairs)])
        with torch.no_grad():
            run.save_grid(ema.eval()(zs).cpu(), f"interpolation_{name}.png", nrow=points)


def report(run, ema, G, D, data, parameters, device, steps, args):
    """Figures, the Frechet distance and diversity of --fid-samples EMA samples, and D's losses on the test split."""
    suffix = f"_seed{args.seed}" if args.sample_only else ""
    metrics = {}
    if not args.sample_only:
        test = evaluate_d(G, D, data.test, args, device, max_batches=None)
        run.log(steps, "test", **test)
        metrics.update({f"test_{k}": v for k, v in test.items()})
        run.plot_panels(BALANCE_PANELS, "balance.png", log_scale=("gradient norm",))
        for key in ("loss_d", "loss_g"):                     # train, validation and test curves
            run.plot_losses(key, f"{key}.png")
    start = time.perf_counter()
    images = generate(ema, 64, args.seed, device)
    metrics["seconds_per_image"] = (time.perf_counter() - start) / 64
    run.save_grid(images, f"samples{suffix}.png")
    interpolation_figures(run, ema, args, device)
    if args.fid_samples:
        quality = common.SampleQuality(args, data, device, metric=args.metric)
        samples = generate(ema, args.fid_samples, args.seed, device)
        metrics["frechet_distance"] = quality.frechet(samples)
        probs = torch.cat([quality.classifier(b.to(device)).softmax(1).cpu() for b in samples.split(250)])
        metrics["confident_share"] = (probs.max(1).values >= 0.9).float().mean().item()
        metrics["diversity"] = quality.diversity(samples)
        metrics["frechet_note"] = quality.describe(args.fid_samples)
    return run.finish(parameters, f"sampling{suffix}.json" if args.sample_only else "final.json",
                      step=steps, **metrics)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="DCGAN (Radford et al. 2016) with the minimax, non-saturating, hinge and "
                                            "least-squares objectives")
    common.add_shared_flags(p, batch_size=64, lr=2e-4, steps=5000, eval_every=500, image_size=32, amp="auto")
    g = p.add_argument_group("model")
    g.add_argument("--latent-dim", type=int, default=100, help="dimension of z (DCGAN: 100)")
    g.add_argument("--g-channels", type=int, default=64,
                   help="G's channels at half the image size (DCGAN: 128 at 64px, where its output layer reads them)")
    g.add_argument("--g-out", default="conv", help="G's output layer: deconv (DCGAN's: a transposed convolution from "
                                                   "half resolution) or conv (SNGAN's standard CNN: a 3x3 convolution "
                                                   "after one more up-block to full resolution; default, see README)")
    g.add_argument("--d-channels", type=int, default=64, help="D's channels after the first layer (DCGAN: 128 at 64px)")
    g = p.add_argument_group("objective and balance")
    g.add_argument("--loss", default="nonsat", help="minimax, nonsat (default, Goodfellow et al. Sec. 3), hinge or ls")
    g.add_argument("--lr-d", type=float, default=2e-4, help="D's learning rate (--lr is G's; DCGAN: 2e-4 for both; "
                                                           "TTUR: a larger one for D)")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 for both networks (DCGAN: 0.5)")
    g.add_argument("--d-steps", type=int, default=1, help="D steps per G step (--steps counts G steps)")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="one-sided: D's real target is 1 - this (0.1: 0.9)")
    g.add_argument("--instance-noise", type=float, default=0.0,
                   help="std of Gaussian noise on D's inputs at step 0, annealed linearly to 0 (images in [-1, 1])")
    g.add_argument("--spectral-norm", action="store_true", help="spectral normalisation of D's layers (no batch norm)")
    g.add_argument("--r1", type=float, default=0.0, help="gamma of the R1 penalty gamma/2 E||grad D(x)||^2; 0: off")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of G's weights used for sampling; 0: off")
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--sample-only", action="store_true",
                   help="figures and metrics again from run --name's checkpoint (default: the latest run) for --seed")
    g.add_argument("--fid-samples", type=int, default=1000, help="samples for the Frechet distance; 0: skip")
    g.add_argument("--metric", default="classifier", help="Frechet features: classifier (offline) or inception")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    trained = train(args)
    if common.is_main():                              # under torchrun, rank 0 alone reports
        report(*trained, args)


if __name__ == "__main__":
    main()
