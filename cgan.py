"""Class-conditional GAN p(x | y): the condition fed to both networks, three ways of conditioning D.

Papers: Mirza & Osindero 2014, "Conditional Generative Adversarial Nets", arXiv:1411.1784 (condition concatenated
to G's and D's inputs); Miyato & Koyama 2018, "cGANs with Projection Discriminator", arXiv:1802.05637;
Odena, Olah & Shlens 2017, "AC-GAN", arXiv:1610.09585; de Vries et al. 2017, arXiv:1707.00683 (conditional batch
norm); the DCGAN networks, objectives and balance tricks of gan.py (Radford et al. 2016; Goodfellow et al. 2014;
Mao et al. 2017; Miyato et al. 2018; Heusel et al. 2017; Salimans et al. 2016; Sonderby et al. 2017;
Mescheder et al. 2018), the same as there.

    python cgan.py                                   # embedded shapes, 16px, 13,000 steps (README: time, results)
    python cgan.py --d-cond projection               # projection D instead of the auxiliary classifier
    python cgan.py --g-cond concat --d-cond concat   # Mirza & Osindero's conditioning by concatenation
    python cgan.py --sample-only --name <run>        # samples and figures again from a run's checkpoint
    python cgan.py --sample-only --name <run> --pick 1   # the same, G's samples as drawn (no picking by D)

Condition. A label y among K classes is the one-hot vector c = e_y in R^K. Any other c is a condition the networks
never saw: a mix (1 - a) e_y + a e_y', a scaled 2 e_y, the zero vector. `--cond` maps c to a D_c-dim embedding,
as in cddpm.py:
    embedding:  cond(c) = E^T c, a learned table E of K rows (for c = e_y the row E[y]); linear in c.
    onehot:     cond(c) = W_2 ReLU(W_1 c + b_1) + b_2, an MLP on the one-hot vector; not linear in c.
G(z, c) gets it by `--g-cond`:
    concat:     the first layer sees [z, cond(c)] (Mirza & Osindero);
    cbn:        every batch norm becomes conditional, BN(h) (1 + gamma(cond(c))) + beta(cond(c)), gamma and beta
                linear maps per layer (de Vries et al.; the G of Miyato & Koyama).
G's output layer, `--g-out`: DCGAN's generator draws the image with its last transposed convolution (`deconv`), from
features at half the image's size, so each output pixel is tanh of a linear function of a 2x2 patch of 8x8
features at 16px; `conv` (the default) adds one more up-block to full resolution and draws the image there with a
3x3 convolution, as SNGAN's standard CNN generator does (Miyato et al. 2018, Table 3). At 16px that layer is where
fine detail such as a star's points gets drawn: 76% conditional accuracy against 68% after 13,000 steps at D's old
rate (one seed; README).
D(x, c) gets c by `--d-cond`:
    concat:     c as K constant feature maps beside the image channels (Mirza & Osindero);
    projection: D(x, c) = psi(phi(x)) + (V^T c) . sum_hw phi(x): the logit of an unconditional D plus the inner
                product of the class's learned vector with D's pooled features (Miyato & Koyama, Eq. 3); it
                follows from a log-linear model of p(y | x) and lets D compare the image with its class directly;
    acgan:      an unconditional adversarial logit plus K class logits from the same features (Odena et al.).

Objective. With l_real = D(x, c_x) and l_fake = D(G(z, c), c), L_D and L_G are gan.py's `--loss` pairs (minimax,
nonsat, hinge, ls), each a batch mean, D's two terms added:
    nonsat   L_D = -log sigmoid(l_real) - log(1 - sigmoid(l_fake))      L_G = -log sigmoid(l_fake)
and likewise for the others (see gan.py's docstring for all four and why they behave differently). Fakes are drawn
for the labels of the real batch, so D sees each class equally often on both sides. For acgan the class logits k(x)
add cross-entropies (logits into F.cross_entropy, no softmax first) with weight lambda (`--acgan-weight`):
    L_D += lambda CE(k(x), y)                              L_G += lambda CE(k(G(z, c)), y)
so D's classifier learns the classes from real images only and G must make images it labels y. Odena et al.
(Eqs. 2-3) also train D's classifier on fakes, L_D += lambda CE(k(G(z, c)), y) (`--acgan-on-fakes`): then D and
G can agree on any code that separates the fakes. On shapes they agreed on colour (a colour per class, shapes
left as blobs): 25% conditional accuracy by a classifier of real images, for FD 31 (README).

Mode seeking (Mao et al. 2019, "Mode Seeking GANs", arXiv:1903.05628; `--mode-seeking lambda_ms`). AC-GAN's G
tends to draw each class one way (on shapes, in one colour): any image D's classifier calls y satisfies the class
term, and D's adversarial logit, which does not see the class, cannot tell that all of class y look alike. MSGAN
pairs latents under one condition (the G batch's second half repeats the first half's conditions) and adds
    L_G += lambda_ms / (mean|G(z_1, c) - G(z_2, c)| / mean|z_1 - z_2| + eps),    eps = 1e-5,
small when distinct latents give distinct images. On shapes it brings the colours back and costs accuracy (README).

Picking by D (`--pick n`; default 16 with the acgan D). The trained AC-GAN has a judge of its own classes: D's
class head. For a class-y sample, G draws n candidates and D keeps the one with the largest margin
    s_y(x) = k_y(x) - max_{y' != y} k_y'(x)          (D's class logit for y over its next-best class)
(for the projection and concat Ds, k_y(x) is D's logit for x under the condition e_y: K passes of D per image).
The kept image lands at x with density p_G(x | y) (drawn there), times n (any of the n draws can be the one), times
the probability F_y(s_y(x))^(n-1) that the other n - 1 score lower, F_y the cumulative distribution function of
s_y(G(z, y)):
    p_n(x | y) = n p_G(x | y) F_y(s_y(x))^(n-1),
a reweighting of G's own samples, by at most n and by the rank of their margin alone, towards images D clearly calls
y; nothing is drawn that G would not draw. It is in the spirit of Discriminator Rejection Sampling (Azadi et al.
2019, arXiv:1810.06758), which accepts G's samples by D's realism logit so that they approach p_data, and closest to
MH-GAN (Turner et al. 2019, arXiv:1811.11357), where D chooses among a fixed number of G's proposals; here the
margin is a class score, not a density ratio, and nothing aims at p_data exactly. The cost is fixed: n passes of G
and D per sample (3.5 ms per image at 16px here, against 0.13 ms). On shapes it lifts the conditional accuracy of
five default runs (seeds 0-4) from 84.0%, 77.2%, 73.7%, 82.7% and 78.5% to 91.6%, 88.7%, 87.0%, 91.9% and 90.5%,
while the pixel diversity within classes rises (README): the candidates it drops are the blobs G draws when it fails
a class, not variety. Only the samples for a class label are picked (the class rows, the metrics); the interpolation
and unseen conditions have no label, the monitor and the training grids show G as drawn, and the metrics are also
recorded before picking (`*_unpicked`).

Evaluation: Frechet distance and conditional accuracy, the share of samples drawn for class y that common.py's
reference classifier labels y, on --fid-samples class-balanced samples (picked, and also as drawn); and their
within-class diversity, the mean pairwise pixel distance among one class's samples averaged over the classes, as a
share of the same for the test images (1: as varied within a class as the data; it sees colour, which the
classifier's features mostly ignore). The balance monitor (as in gan.py) tracks the same during training, every 100
steps on the fixed samples (8 per class), beside their diversity over all classes, each as a share of the data's:
the latter stays at the data's when G draws one image per class whatever z (the classes still differ), so the run
also warns when the diversity within classes falls below a quarter of it.

Defaults. 16px, a D twice as wide as G (128 channels) with 4 times G's learning rate (`--lr-d 8e-4`, the two
time-scale rule of Heusel et al. 2017 at SAGAN's ratio), lambda = 3, G's output layer at full resolution
(`--g-out conv`), 13,000 steps in bf16 where the hardware has it (`--amp auto`; 1.35x the steps per second of
float32 here, measured with DCGAN's output layer). At 16px a step costs about a quarter of one at 32px, and in the
trials conditional accuracy followed first D's classifier (G is pushed towards a class only as well as D tells the
classes apart: D's accuracy on real test images at 16px was 83% after 12,000 steps with gan.py's D and lambda 1, 97%
after 10,000 in float32 with a wider D and lambda 3), then G's output layer: with DCGAN's, the 13,000-step recipe
reached 68%, 76%, 68% and 73% with seeds 0-3, and a faster D only got there sooner; with the full-resolution layer,
76% at D's old rate (seed 0), and 84%, 77%, 74% and 83% with D at 4 times G's rate (seeds 0-3), in 16 to 18 minutes;
all of these before picking, which adds 8 to 13 points (above). Both learning rates decayed linearly to zero over
the second half (`--lr-decay 0.5`; SNGAN decays linearly), mode seeking, a wider G, other losses, R1 and a larger
lambda did not help (README: the trials behind all of it).

Differences from the papers: DCGAN-sized networks (Miyato & Koyama use ResNets with spectral norm); AC-GAN's D
learns the classes from real images only unless `--acgan-on-fakes` (see above).
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

MODEL_FLAGS = ("dataset", "image_size", "latent_dim", "g_channels", "d_channels", "spectral_norm", "cond", "cond_dim",
               "g_cond", "g_out", "d_cond", "num_classes")
IMPLIED_FLAGS = {"g_out": "deconv"}     # model flags added later whose absence from a checkpoint means this value
LOSSES = ("minimax", "nonsat", "hinge", "ls")
INIT_STD = 0.02         # DCGAN: every weight drawn from N(0, 0.02^2)
LEAKY_SLOPE = 0.2       # DCGAN's LeakyReLU slope in D
WIN_STEPS = 200         # G steps of D separating everything before "D wins outright" is reported
COLLAPSE_RATIO = 0.5    # sample diversity falling below this share of its best is reported as collapse
IGNORED_Z_RATIO = 0.25  # within-class diversity below this share of the diversity over all classes: G ignores z
MONITOR_EVERY = 100     # G steps between diversity checks
MONITOR_SAMPLES = 80    # fixed latents and labels of the diversity check and the sample grids (8 per class)
PICK_ACGAN = 16         # --pick's default with D's class head: enough that D calls every pick its class (README)
MONITOR_REAL = 1000     # validation images whose diversity, over all and within classes, the check compares with
BALANCE_PANELS = {"D output": ("d_real", "d_fake"), "loss": ("loss_d", "loss_g"),
                  "gradient norm": ("grad_norm_d", "grad_norm_g"),
                  "pixel diversity / data's": ("pixel_diversity", "within_class_pixel_diversity")}


# ----------------------------------------------------------------------------- networks

def stride2_layers(image_size):
    """Stride-2 layers between 4x4 and image_size x image_size (3 for 32px)."""
    n = round(math.log2(image_size)) - 2 if image_size >= 16 else 0
    if image_size < 16 or 2 ** (n + 2) != image_size:
        common.fail(f"--image-size must be a power of two, at least 16 (the DCGAN stack halves it to 4), "
                    f"got {image_size}")
    return n


class ConditionEncoder(nn.Module):
    """cond(c): condition vectors (B, K) -> embeddings (B, D_c), by a table or an MLP (see the module docstring)."""

    def __init__(self, num_classes, dim, kind):
        super().__init__()
        self.kind = kind
        if kind == "embedding":
            self.table = nn.Embedding(num_classes, dim)
        elif kind == "onehot":
            self.mlp = nn.Sequential(nn.Linear(num_classes, dim), nn.ReLU(), nn.Linear(dim, dim))
        else:
            common.fail(f"unknown --cond {kind!r}; choose embedding or onehot")

    def forward(self, c):
        # c @ E equals the lookup E[y] for a one-hot c and extends it linearly to any other vector
        return c @ self.table.weight if self.kind == "embedding" else self.mlp(c)


class ConditionalBatchNorm2d(nn.Module):
    """BN(h) (1 + gamma(e)) + beta(e): batch norm whose scale and shift are linear in the condition embedding e
    (their weights start as DCGAN's N(0, 0.02^2): with the table's N(0, 1) entries, gamma and beta start at about
    0.02 sqrt(D_c) = 0.16 standard deviation)."""

    def __init__(self, c, cond_dim):
        super().__init__()
        self.norm = nn.BatchNorm2d(c, affine=False)
        self.affine = nn.Linear(cond_dim, 2 * c)

    def forward(self, h, e):
        gamma, beta = self.affine(e)[:, :, None, None].chunk(2, dim=1)     # (B, c, 1, 1) each
        return self.norm(h) * (1 + gamma) + beta


class Generator(nn.Module):
    """(z (B, latent_dim), c (B, K)) -> image (B, C, S, S) in [-1, 1]: gan.py's DCGAN generator, with the condition
    concatenated to z or through conditional batch norm (`g_cond`), and its last transposed convolution drawing the
    image (g_out="deconv") or one more up-block to full resolution and a 3x3 convolution drawing it (g_out="conv")."""

    def __init__(self, num_classes, image_size=32, latent_dim=100, channels=64, out_channels=3, cond="embedding",
                 cond_dim=64, g_cond="cbn", g_out="conv"):
        super().__init__()
        if g_cond not in ("concat", "cbn"):
            common.fail(f"unknown --g-cond {g_cond!r}; choose concat or cbn")
        if g_out not in ("deconv", "conv"):
            common.fail(f"unknown --g-out {g_out!r}; choose deconv or conv")
        n = stride2_layers(image_size)
        c = channels * 2 ** (n - 1)
        self.encode, self.g_cond, self.latent_dim, self.num_classes = ConditionEncoder(num_classes, cond_dim, cond), \
            g_cond, latent_dim, num_classes
        norm = (lambda c: ConditionalBatchNorm2d(c, cond_dim)) if g_cond == "cbn" else nn.BatchNorm2d
        z_in = latent_dim + (cond_dim if g_cond == "concat" else 0)
        self.convs = nn.ModuleList([nn.ConvTranspose2d(z_in, c, 4, stride=1, padding=0, bias=False)])   # (B, c, 4, 4)
        self.norms = nn.ModuleList([norm(c)])
        for _ in range(n - 1 if g_out == "deconv" else n):    # conv: one more, to full resolution
            self.convs.append(nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1, bias=False))  # (B, c/2, 2H, 2W)
            self.norms.append(norm(c // 2))
            c //= 2
        if g_out == "deconv":       # DCGAN: the image from half-resolution features
            self.out = nn.ConvTranspose2d(c, out_channels, 4, stride=2, padding=1)                # (B, C, S, S)
        else:                       # SNGAN's standard CNN: a 3x3 convolution of full-resolution features
            self.out = nn.Conv2d(c, out_channels, 3, padding=1)                                   # (B, C, S, S)
        init_weights(self)

    def forward(self, z, c):
        e = self.encode(c)
        h = (torch.cat([z, e], dim=1) if self.g_cond == "concat" else z)[:, :, None, None]
        for conv, norm in zip(self.convs, self.norms):
            h = conv(h)
            h = F.relu(norm(h, e) if self.g_cond == "cbn" else norm(h))
        return torch.tanh(self.out(h))


class Discriminator(nn.Module):
    """(image (B, C, S, S), c (B, K)) -> (logit (B,), class logits (B, K) or None): gan.py's DCGAN discriminator,
    conditioned by concatenation, projection or an auxiliary classifier head (`d_cond`)."""

    def __init__(self, num_classes, image_size=32, channels=64, in_channels=3, spectral_norm=False,
                 d_cond="acgan"):
        super().__init__()
        if d_cond not in ("concat", "projection", "acgan"):
            common.fail(f"unknown --d-cond {d_cond!r}; choose concat, projection or acgan")
        n = stride2_layers(image_size)
        self.d_cond = d_cond
        c_in = in_channels + (num_classes if d_cond == "concat" else 0)
        layers, c = [nn.Conv2d(c_in, channels, 4, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE)], channels
        for _ in range(n - 1):
            layers += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1, bias=spectral_norm),       # (B, 2c, H/2, W/2)
                       nn.Identity() if spectral_norm else nn.BatchNorm2d(2 * c), nn.LeakyReLU(LEAKY_SLOPE)]
            c *= 2
        self.features = nn.Sequential(*layers)                                                  # (B, c, 4, 4)
        self.head = nn.Conv2d(c, 1, 4, stride=1, padding=0)                                  # (B, 1, 1, 1)
        if d_cond == "projection":
            self.embed = nn.Linear(num_classes, c, bias=False)     # V^T c: the class's vector for c = e_y
        if d_cond == "acgan":
            self.classify = nn.Linear(c * 16, num_classes)         # class logits from the 4x4 features
        init_weights(self)
        if spectral_norm:           # after the initialisation, so that the power iteration starts from these weights
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x, c):
        if self.d_cond == "concat":
            x = torch.cat([x, c[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)   # (B, C + K, S, S)
        h = self.features(x)
        logit = self.head(h).flatten()
        if self.d_cond == "projection":
            logit = logit + (self.embed(c) * h.sum(dim=(2, 3))).sum(1)
        return logit, (self.classify(h.flatten(1)) if self.d_cond == "acgan" else None)


def init_weights(module):
    """DCGAN's initialisation: conv and linear weights ~ N(0, 0.02^2), batch-norm scales ~ N(1, 0.02^2), biases 0
    (the projection vectors too: at PyTorch's default scale their term would swamp D's logit at the start)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, INIT_STD)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- objectives

def d_loss(l_real, l_fake, kind, real_target=1.0):
    """L_D for logits of real and fake batches (see gan.py's docstring); real_target < 1 is label smoothing."""
    if kind in ("minimax", "nonsat"):
        return (F.binary_cross_entropy_with_logits(l_real, torch.full_like(l_real, real_target))
                + F.binary_cross_entropy_with_logits(l_fake, torch.zeros_like(l_fake)))
    if kind == "hinge":
        return F.relu(1 - l_real).mean() + F.relu(1 + l_fake).mean()
    if kind == "ls":
        return 0.5 * (l_real - real_target).pow(2).mean() + 0.5 * l_fake.pow(2).mean()
    common.fail(f"unknown --loss {kind!r}; choose one of {', '.join(LOSSES)}")


def g_loss(l_fake, kind):
    """L_G for D's logits of a fake batch (see gan.py's docstring)."""
    if kind == "minimax":
        return -F.softplus(l_fake).mean()            # log(1 - sigmoid(l)) = -softplus(l)
    if kind == "nonsat":
        return F.softplus(-l_fake).mean()            # -log sigmoid(l) = softplus(-l)
    if kind == "hinge":
        return -l_fake.mean()
    if kind == "ls":
        return 0.5 * (l_fake - 1).pow(2).mean()
    common.fail(f"unknown --loss {kind!r}; choose one of {', '.join(LOSSES)}")


def class_loss(class_logits, c):
    """AC-GAN's cross-entropy of the class logits against the condition c (a one-hot c: CE with its label)."""
    return F.cross_entropy(class_logits.float(), c) if class_logits is not None else torch.zeros((), device=c.device)


def d_output(logits, kind):
    """What the balance plot shows as D(x): the probability sigmoid(l) for the BCE losses, the raw output
    otherwise (hinge: a margin score, ls: a regression towards 1 for real, 0 for fake)."""
    return torch.sigmoid(logits) if kind in ("minimax", "nonsat") else logits


def d_accuracy(l_real, l_fake, kind):
    """Share of real and fake images on D's correct side of its decision threshold (0.5 for ls, logit 0 else)."""
    threshold = 0.5 if kind == "ls" else 0.0
    return 0.5 * ((l_real > threshold).float().mean() + (l_fake < threshold).float().mean())


def r1_penalty(discriminator, x, c):
    """R1 = E_x ||grad_x D(x, c)||^2 on real images (Mescheder et al., Eq. 9 without gamma/2); returns it and D's
    outputs."""
    x = x.detach().requires_grad_(True)
    logits, class_logits = discriminator(x, c)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)   # the penalty is differentiated again
    return grad.pow(2).flatten(1).sum(1).mean(), logits, class_logits


def with_noise(x, sigma):
    """Instance noise: D sees x + sigma eps, for real and fake alike."""
    return x + sigma * torch.randn_like(x) if sigma > 0 else x


# ----------------------------------------------------------------------------- conditions and sampling

def latents(n, latent_dim, seed, device="cpu"):
    """z ~ N(0, I) from a generator seeded with `seed`: the same seed gives the same latents."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)


def class_grid_conditions(num_classes, per_class=8):
    """One row per class: labels 0,0,...,0,1,1,... as condition vectors."""
    return common.one_hot(torch.arange(num_classes).repeat_interleave(per_class), num_classes)


@torch.no_grad()
def generate(generator, c, seed, device, shared_latents=False, batch_size=500):
    """Images from G (in eval mode) for condition vectors c (N, K), latents seeded with `seed`; with
    shared_latents, one z for all of them."""
    generator.eval()
    z = latents(1 if shared_latents else len(c), generator.latent_dim, seed, device).expand(len(c), -1)
    return torch.cat([generator(zb, cb.to(device)).float().cpu()
                      for zb, cb in zip(z.split(batch_size), c.split(batch_size))])


def class_evidence(discriminator, x, num_classes):
    """(B, K): how strongly D takes x to be of each class: the class head's logits (acgan), or D's logit for x under
    each class's condition e_y (projection: the unconditional part cancels from differences; concat)."""
    if discriminator.d_cond == "acgan":
        return discriminator(x, torch.zeros(len(x), num_classes, device=x.device))[1].float()
    return torch.stack([discriminator(x, common.one_hot(torch.full((len(x),), y), num_classes).to(x.device))[0]
                        for y in range(num_classes)], 1).float()


@torch.no_grad()
def pick(generator, discriminator, c, candidates, seed, device, batch_size=500):
    """Samples for one-hot conditions c (N, K) chosen by D: `candidates` images each, and of each sample's candidates
    the one whose class evidence for its label y most exceeds D's largest evidence for another class. The latents
    come from one stream seeded with `seed`, so the first candidates are generate's samples and 1 returns them.
    D runs in eval mode (its running batch-norm statistics), so a candidate's evidence does not depend on which
    other images share its batch (a figure's row is eight images of one class)."""
    if candidates < 1:
        raise ValueError(f"pick needs at least one candidate per sample, got {candidates}")
    generator.eval(), discriminator.eval()
    z_stream, y = torch.Generator().manual_seed(seed), c.argmax(1).cpu()
    best, best_margin = None, torch.full((len(c),), -math.inf)
    for _ in range(candidates):
        z = torch.randn(len(c), generator.latent_dim, generator=z_stream).to(device)
        images, evidence = [], []
        for zb, cb in zip(z.split(batch_size), c.split(batch_size)):
            xb = generator(zb, cb.to(device))
            images.append(xb.float().cpu())
            if candidates > 1:
                evidence.append(class_evidence(discriminator, xb, c.shape[1]).cpu())
        x = torch.cat(images)
        if candidates == 1:
            return x
        evidence = torch.cat(evidence)
        margin = evidence.gather(1, y[:, None])[:, 0] - evidence.scatter(1, y[:, None], -math.inf).amax(1)
        better = margin > best_margin
        best = x if best is None else torch.where(better[:, None, None, None], x, best)
        best_margin = torch.where(better, margin, best_margin)
    return best


def pixel_diversity(images):
    """Mean pairwise L2 distance between the images of a batch (the collapse monitor's signal)."""
    flat = images.flatten(1).float()
    return torch.pdist(flat).mean().item()


def within_class_diversity(images, labels, max_per_class=500):
    """pixel_diversity among the images of one class (its first max_per_class), averaged over the classes with at
    least two images (nan if none has): what collapse within a class lowers, even while the classes still differ
    from each other."""
    per_class = [pixel_diversity(images[labels == y][:max_per_class])
                 for y in labels.unique() if (labels == y).sum() > 1]
    return sum(per_class) / len(per_class) if per_class else math.nan


def random_images(dataset, n, seed=0):
    """n images of a dataset (all of them if it has fewer) drawn without replacement by a seeded generator, with
    their labels: every class is sampled even from a split stored class by class."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return dataset[order[:n].tolist()]


# ----------------------------------------------------------------------------- training

def build(args, num_classes, channels):
    return (Generator(num_classes, args.image_size, args.latent_dim, args.g_channels, channels, args.cond,
                      args.cond_dim, args.g_cond, args.g_out),
            Discriminator(num_classes, args.image_size, args.d_channels, channels, args.spectral_norm, args.d_cond))


def check_flags(args):
    if args.loss not in LOSSES:
        common.fail(f"unknown --loss {args.loss!r}; choose one of {', '.join(LOSSES)}")
    if args.label_smoothing and args.loss == "hinge":
        common.fail("--label-smoothing changes the real target of a BCE or least-squares D; hinge has no target")
    if not 0 <= args.label_smoothing < 1 or args.d_steps < 1 or args.instance_noise < 0 or args.r1 < 0:
        common.fail("need 0 <= --label-smoothing < 1, --d-steps >= 1, --instance-noise >= 0 and --r1 >= 0")
    if args.mode_seeking < 0 or (args.mode_seeking and args.batch_size < 2 * common.world_size()):
        common.fail("need --mode-seeking >= 0, and with it at least 2 images per process in --batch-size (its "
                    "latents come in pairs)")
    for flag, value, choices in (("--cond", args.cond, ("embedding", "onehot")),
                                 ("--g-cond", args.g_cond, ("concat", "cbn")),
                                 ("--g-out", args.g_out, ("deconv", "conv")),
                                 ("--d-cond", args.d_cond, ("concat", "projection", "acgan"))):
        if value not in choices:
            common.fail(f"unknown {flag} {value!r}; choose {' or '.join(choices)}")
    if args.fid_samples == 1 or args.fid_samples < 0 or args.eval_every < 1 or not 0 <= args.ema < 1:
        common.fail("need --fid-samples 0 or at least 2, --eval-every >= 1 and 0 <= --ema < 1")
    if args.pick < 1:
        common.fail(f"--pick {args.pick}: need at least 1 candidate per sample (1: no picking)")
    stride2_layers(args.image_size)


def check_classes(args, num_classes):
    if num_classes < 2:
        common.fail(f"--dataset {args.dataset} has {num_classes} class; a class-conditional GAN needs labels")
    if args.unseen_samples < 1:
        common.fail("--unseen-samples must be at least 1")
    if not all(0 <= y < num_classes for y in args.interpolate) or len(args.interpolate) != 2:
        common.fail(f"--interpolate takes two class indices between 0 and {num_classes - 1}, got {args.interpolate}")


def d_step(G, D, opt_d, x, c, args, sigma, scaler=None):
    """One step on L_D (+ gamma/2 R1, + AC-GAN's class losses) for a real batch x with conditions c and a fresh
    fake batch for the same conditions; returns the step's statistics.
    loss_d is the adversarial term alone (what validation measures); the penalties are logged beside it.
    `scaler`: --amp fp16's gradient scaler (see common.grad_scaler); none in full precision."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    z = torch.randn(len(x), G.latent_dim, device=x.device)
    with torch.no_grad():
        fake = G(z, c)
    with common.autocast(args.amp, x.device):
        if args.r1:
            penalty, l_real, k_real = r1_penalty(D, with_noise(x, sigma), c)
        else:
            penalty, (l_real, k_real) = torch.zeros((), device=x.device), D(with_noise(x, sigma), c)
        l_fake, k_fake = D(with_noise(fake, sigma), c)
        adversarial = d_loss(l_real.float(), l_fake.float(), args.loss, 1 - args.label_smoothing)
        class_term = args.acgan_weight * (class_loss(k_real, c) + args.acgan_on_fakes * class_loss(k_fake, c))
        loss = adversarial + args.r1 / 2 * penalty + class_term
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt_d)                        # the logged gradient norm is the true one
    scaler.step(opt_d)
    scaler.update()
    return dict(loss_d=adversarial, d_real=d_output(l_real, args.loss).mean(),
                d_fake=d_output(l_fake, args.loss).mean(),
                d_acc=d_accuracy(l_real, l_fake, args.loss), grad_norm_d=grad_norm(D), r1=penalty,
                class_loss_d=class_term)


def g_step(G, D, opt_g, c, args, sigma, scaler=None):
    """One step on L_G (+ AC-GAN's class term, + the mode-seeking term) for a fresh fake batch with conditions c;
    D's weights are frozen for it."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    D.requires_grad_(False)
    if args.mode_seeking:           # pairs (z_1, z_2) for one condition: the batch's second half repeats the first's
        c = c[:len(c) // 2].repeat(2, 1)
    z = torch.randn(len(c), args.latent_dim, device=c.device)
    with common.autocast(args.amp, c.device):
        fake = G(z, c)
        l_fake, k_fake = D(with_noise(fake, sigma), c)
        adversarial = g_loss(l_fake.float(), args.loss)
        loss = adversarial + args.acgan_weight * class_loss(k_fake, c)
        if args.mode_seeking:
            loss = loss + args.mode_seeking * mode_seeking_loss(fake.float(), z)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt_g)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    return dict(loss_g=adversarial, grad_norm_g=grad_norm(G))


def mode_seeking_loss(fake, z, eps=1e-5):
    """MSGAN's term 1 / (mean|G(z_1, c) - G(z_2, c)| / mean|z_1 - z_2| + eps) for a batch whose halves pair z_1 with
    z_2 under the same conditions: small when distinct latents give distinct images."""
    half = len(z) // 2
    ratio = (fake[:half] - fake[half:2 * half]).abs().mean() / (z[:half] - z[half:2 * half]).abs().mean()
    return 1 / (ratio + eps)


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
def evaluate_d(G, D, loader, args, device, num_classes, max_batches=20):
    """L_D, L_G and D's outputs on held-out real images and fresh fakes for their labels (seeded): a D that only
    memorised the training images scores held-out images as it scores fakes. Copies of G and D run in train mode,
    so batch norm uses batch statistics as in training, and the originals' running statistics stay as they were."""
    G, D = copy.deepcopy(G).train(), copy.deepcopy(D).train()
    totals, n, g = {}, 0, torch.Generator(device).manual_seed(1)    # the same fakes at every evaluation
    for b, (x, y) in enumerate(loader):
        if b == max_batches:
            break
        x, c = x.to(device), common.one_hot(y, num_classes).to(device)
        z = torch.randn(len(x), G.latent_dim, generator=g, device=device)
        (l_real, k_real), (l_fake, _) = D(x, c), D(G(z, c), c)
        stats = dict(loss_d=d_loss(l_real, l_fake, args.loss), loss_g=g_loss(l_fake, args.loss),
                     d_real=d_output(l_real, args.loss).mean(), d_fake=d_output(l_fake, args.loss).mean())
        if k_real is not None:
            stats["d_class_accuracy"] = (k_real.argmax(1) == y.to(device)).float().mean()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(x)
        n += len(x)
    return {k: v / n for k, v in totals.items()}


class BalanceMonitor:
    """Warns (once per episode) when D wins outright, when the samples' diversity drops below COLLAPSE_RATIO
    of the best it reached (G collapsing onto a few modes; see gan.py's docstring), and, what conditioning adds,
    when the samples of one class hardly differ while the classes do: the diversity over all classes is then the
    classes' differences alone and hides a G that draws one image per class, whatever z."""

    def __init__(self, real_diversity, real_within_class):
        self.real_diversity, self.real_within_class = real_diversity, real_within_class
        self.best, self.won_for = 0.0, 0
        self.warned_win = self.warned_collapse = self.warned_ignores_z = False

    def d_step(self, step, accuracy):
        self.won_for = self.won_for + 1 if accuracy >= 0.99 else 0
        if self.won_for >= WIN_STEPS and not self.warned_win:
            tqdm.write(f"warning: step {step}: D has separated every real and fake image for {WIN_STEPS} steps "
                       "(D wins outright); try --label-smoothing, --instance-noise, --r1 or a lower --lr-d")
        self.warned_win = self.won_for >= WIN_STEPS

    def diversity(self, step, diversity, within_class):
        """Records the pixel diversity of the fixed-latent samples, over all of them and within each class; returns
        both as shares of the data's."""
        ratio, within = diversity / self.real_diversity, within_class / self.real_within_class
        self.best = max(self.best, ratio)
        collapsed = ratio < COLLAPSE_RATIO * self.best
        if collapsed and not self.warned_collapse:
            tqdm.write(f"warning: step {step}: sample diversity fell to {ratio:.2f} of the data's, from "
                       f"{self.best:.2f} (mode collapse?)")
        self.warned_collapse = collapsed
        ignores_z = within < IGNORED_Z_RATIO * ratio
        if ignores_z and not self.warned_ignores_z:
            tqdm.write(f"warning: step {step}: the samples of a class hardly differ (within-class diversity "
                       f"{within:.2f} of the data's, {ratio:.2f} over all classes): is G drawing one image per class "
                       "whatever z (collapse within classes)? try --mode-seeking, or --g-cond cbn")
        self.warned_ignores_z = ignores_z
        return ratio, within


def train(args):
    check_flags(args)
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    data = common.load_data(args)
    check_classes(args, data.num_classes)
    args.num_classes = data.num_classes
    run = common.Run("cgan", args, reopen=args.sample_only)
    G, D = build(args, data.num_classes, data.channels)
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
    per_class = max(2, MONITOR_SAMPLES // data.num_classes)         # two at least: diversity within a class
    fixed_c = class_grid_conditions(data.num_classes, per_class).to(device)
    fixed_z = latents(len(fixed_c), args.latent_dim, args.seed, device)
    fixed_labels = fixed_c.argmax(1).cpu()
    real, real_labels = random_images(data.val.dataset, MONITOR_REAL)
    monitor = BalanceMonitor(pixel_diversity(real[:MONITOR_SAMPLES]), within_class_diversity(real, real_labels))
    batches = common.forever(data.train)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="cgan")
    for step in bar:
        G.train(), D.train()
        sigma = args.instance_noise * max(0.0, 1 - step / steps)       # annealed linearly to 0
        lr_scale = common.lr_factor(step, steps, 1, args.lr_decay)       # no warm-up, as in DCGAN; --lr-decay
        for opt, lr in ((opt_g, args.lr), (opt_d, args.lr_d)):          # scales both networks' rates
            for group in opt.param_groups:
                group["lr"] = lr * lr_scale
        for _ in range(args.d_steps):                                    # (1) update D: maximise V over D
            x, y = next(batches)
            c = common.one_hot(y, data.num_classes).to(device)
            d_stats = d_step(G, D_net, opt_d, x.to(device), c, args, sigma, scaler_d)
        g_stats = g_step(G_net, D, opt_g, c, args, sigma, scaler_g)      # (2) update G, for the last batch's labels
        update_ema(ema, G, min(args.ema, (1 + step) / (10 + step)))      # ramped up as in ddpm.py
        stats = {k: v.item() for k, v in {**d_stats, **g_stats}.items()}
        common.check_finite(stats["loss_d"] + stats["loss_g"], step)
        monitor.d_step(step + 1, stats["d_acc"])
        if (step + 1) % MONITOR_EVERY == 0:
            with torch.no_grad():
                samples = G.eval()(fixed_z, fixed_c).cpu()
                stats["pixel_diversity"], stats["within_class_pixel_diversity"] = monitor.diversity(
                    step + 1, pixel_diversity(samples), within_class_diversity(samples, fixed_labels))
        run.log(step + 1, "train", **stats)
        bar.set_postfix(D=f"{stats['loss_d']:.3f}", G=f"{stats['loss_g']:.3f}", Dx=f"{stats['d_real']:.2f}",
                        DGz=f"{stats['d_fake']:.2f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            common.check_replicas(G, step + 1)
            common.check_replicas(D, step + 1)
            if common.is_main():
                val = evaluate_d(G, D, data.val, args, device, data.num_classes)
                run.log(step + 1, "val", **val)
                tqdm.write(f"step {step + 1}: validation L_D {val['loss_d']:.4f}, L_G {val['loss_g']:.4f}, "
                           f"D(x) {val['d_real']:.3f}, D(G(z)) {val['d_fake']:.3f}")
                with torch.no_grad():
                    samples = ema.eval()(fixed_z, fixed_c).cpu()
                run.save_grid(samples, f"samples_{step + 1:06d}.png")
                # samples over training: a row per evaluation, a class each
                progress.append((step + 1, samples[::per_class]))
                run.save_grid(torch.cat([x for _, x in progress]), "progress.png", nrow=data.num_classes)
                run.save_checkpoint(step + 1, generator=G.state_dict(), discriminator=D.state_dict(),
                                    ema=ema.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
                                    scaler_g=scaler_g.state_dict(), scaler_d=scaler_d.state_dict(),
                                    progress=progress)
    return run, ema, G, D, data, parameters, device, steps


# ----------------------------------------------------------------------------- figures and evaluation

def figures(run, ema, D, data, args, device, quality, suffix):
    """Rows per class (picked by D, --pick), the interpolation between two classes' conditions and the unseen
    conditions; returns what the reference classifier makes of the unseen conditions' samples."""
    k = data.num_classes
    # one row per class; column j's candidates use the same latents in every row (with --pick 1, the same z)
    z_seed = args.seed + 1
    rows = [pick(ema, D, common.one_hot(torch.full((8,), y), k), args.pick, z_seed, device) for y in range(k)]
    run.save_grid(torch.cat(rows), f"samples{suffix}.png", nrow=8)
    # (1 - alpha) e_a + alpha e_b with z fixed along each row
    a, b = args.interpolate
    alphas = torch.linspace(0, 1, 9).tolist()
    rows = [generate(ema, common.interpolate(a, b, alphas, k), args.seed + 2 + r, device, shared_latents=True)
            for r in range(4)]
    run.save_grid(torch.cat(rows), f"interpolation{suffix}.png", nrow=len(alphas))
    # unseen condition vectors: a row each (columns share z across rows), and the classifier's verdict on them
    unseen, grid = {}, []
    for name, vector in common.unseen_conditions(k, args.seed).items():
        images = generate(ema, vector.expand(args.unseen_samples, -1), z_seed, device)
        grid.append(images[:8])
        shares = torch.bincount(quality.predict(images), minlength=k).float() / len(images)
        unseen[name] = {data.classes[i]: round(shares[i].item(), 3) for i in shares.argsort(descending=True)[:3]}
        print(f"unseen condition {name}: classified as {unseen[name]}")
    run.save_grid(torch.cat(grid), f"unseen_conditions{suffix}.png", nrow=8)
    return unseen


def report(run, ema, G, D, data, parameters, device, steps, args):
    """Figures; Frechet distance, conditional accuracy, diversity and within-class diversity (as a share of the
    test images') of --fid-samples class-balanced EMA samples, picked by D (--pick), and the first two for the
    samples before picking; D's losses on the test split."""
    suffix = f"_seed{args.seed}" if args.sample_only else ""
    metrics = {}
    if not args.sample_only:
        test = evaluate_d(G, D, data.test, args, device, data.num_classes, max_batches=None)
        run.log(steps, "test", **test)
        metrics.update({f"test_{k}": v for k, v in test.items()})
        run.plot_panels(BALANCE_PANELS, "balance.png", log_scale=("gradient norm",))
        for key in ("loss_d", "loss_g"):                     # train, validation and test curves
            run.plot_losses(key, f"{key}.png")
    quality = common.SampleQuality(args, data, device, metric=args.metric)
    metrics["unseen_conditions"] = figures(run, ema, D, data, args, device, quality, suffix)
    if args.fid_samples:
        labels = torch.arange(args.fid_samples) % data.num_classes
        c = common.one_hot(labels, data.num_classes)
        start = time.perf_counter()
        samples = pick(ema, D, c, args.pick, args.seed, device)
        metrics["seconds_per_image"] = (time.perf_counter() - start) / args.fid_samples
        metrics["frechet_distance"] = quality.frechet(samples)
        metrics["conditional_accuracy"] = quality.conditional_accuracy(samples, labels)
        if args.pick > 1:                                   # the same numbers for G's samples as drawn
            start = time.perf_counter()
            unpicked = generate(ema, c, args.seed, device)
            metrics["seconds_per_image_unpicked"] = (time.perf_counter() - start) / args.fid_samples
            metrics["frechet_distance_unpicked"] = quality.frechet(unpicked)
            metrics["conditional_accuracy_unpicked"] = quality.conditional_accuracy(unpicked, labels)
            metrics["diversity_unpicked"] = quality.diversity(unpicked)
        metrics["diversity"] = quality.diversity(samples)
        if args.fid_samples >= 2 * data.num_classes:        # every class has two samples to compare
            real, real_labels = (torch.cat(batches) for batches in zip(*data.test))     # the whole test split
            real_within = within_class_diversity(real, real_labels)
            metrics["within_class_diversity"] = within_class_diversity(samples, labels) / real_within
            if args.pick > 1:
                metrics["within_class_diversity_unpicked"] = within_class_diversity(unpicked, labels) / real_within
        metrics["frechet_note"] = quality.describe(args.fid_samples) + ", class-balanced"
    return run.finish(parameters, f"sampling{suffix}.json" if args.sample_only else "final.json",
                      step=steps, **metrics)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Class-conditional DCGAN (Mirza & Osindero 2014) with a projection "
                                            "(Miyato & Koyama 2018), AC-GAN (Odena et al. 2017) or concatenation D")
    common.add_shared_flags(p, batch_size=64, lr=2e-4, steps=13000, eval_every=1000, image_size=16, amp="auto")
    g = p.add_argument_group("model")
    g.add_argument("--latent-dim", type=int, default=100, help="dimension of z (DCGAN: 100)")
    g.add_argument("--g-channels", type=int, default=64,
                   help="G's channels at half the image size (DCGAN: 128 at 64px, where its output layer reads them)")
    g.add_argument("--d-channels", type=int, default=128,
                   help="D's channels after the first layer (DCGAN: 128 at 64px; here twice G's: a better classifier)")
    g.add_argument("--cond", default="embedding", help="condition encoder of G: embedding (a table, linear in c) or "
                                                       "onehot (an MLP on the one-hot vector)")
    g.add_argument("--cond-dim", type=int, default=64, help="dimension of G's condition embedding")
    g.add_argument("--g-cond", default="cbn", help="condition into G: concat (with z) or cbn (conditional batch norm)")
    g.add_argument("--g-out", default="conv", help="G's output layer: deconv (DCGAN's: a transposed convolution from "
                                                   "half resolution) or conv (SNGAN's standard CNN: a 3x3 convolution "
                                                   "after one more up-block to full resolution; default, see README)")
    g.add_argument("--d-cond", default="acgan", help="condition into D: concat (as input channels), projection "
                                                     "(Miyato & Koyama) or acgan (auxiliary classifier; default: the "
                                                     "best conditional accuracy on shapes, see README)")
    g = p.add_argument_group("objective and balance")
    g.add_argument("--loss", default="nonsat", help="minimax, nonsat (default, Goodfellow et al. Sec. 3), hinge or ls")
    g.add_argument("--acgan-weight", type=float, default=3.0, help="lambda of AC-GAN's class losses (--d-cond acgan)")
    g.add_argument("--acgan-on-fakes", type=int, default=0, choices=(0, 1),
                   help="1: D's classifier also learns from fakes, as in Odena et al. (lets D and G agree on a code)")
    g.add_argument("--lr-d", type=float, default=8e-4, help="D's learning rate (--lr is G's; DCGAN: 2e-4 for both; "
                                                           "TTUR: a larger one for D; here 4 times G's, see README; "
                                                           "--resume a run made before that with --lr-d 2e-4)")
    common.add_lr_decay_flag(g, default=0.0)
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 for both networks (DCGAN: 0.5)")
    g.add_argument("--d-steps", type=int, default=1, help="D steps per G step (--steps counts G steps)")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="one-sided: D's real target is 1 - this (0.1: 0.9)")
    g.add_argument("--instance-noise", type=float, default=0.0,
                   help="std of Gaussian noise on D's inputs at step 0, annealed linearly to 0 (images in [-1, 1])")
    g.add_argument("--spectral-norm", action="store_true", help="spectral normalisation of D's layers (no batch norm)")
    g.add_argument("--r1", type=float, default=0.0, help="gamma of the R1 penalty gamma/2 E||grad D(x)||^2; 0: off")
    g.add_argument("--mode-seeking", type=float, default=0.0,
                   help="lambda of MSGAN's mode-seeking term in L_G (Mao et al. 2019: 1); 0: off")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of G's weights used for sampling; 0: off")
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--interpolate", type=lambda s: tuple(int(v) for v in s.split(",")), default=(0, 1),
                   help="two class indices a,b for the condition interpolation figure")
    g.add_argument("--pick", type=int, default=None,
                   help="candidates per class-y sample; D keeps the one whose evidence for y most exceeds its "
                        "evidence for any other class (docstring). Default 16 with --d-cond acgan, else 1 (G's "
                        "samples as drawn: the other Ds' evidence picks worse, README)")
    g.add_argument("--unseen-samples", type=int, default=200, help="samples per unseen condition for its verdict")
    g.add_argument("--sample-only", action="store_true",
                   help="figures and metrics again from run --name's checkpoint (default: the latest run) for --seed")
    g.add_argument("--fid-samples", type=int, default=1000, help="class-balanced samples for the Frechet distance "
                                                                 "and conditional accuracy; 0: skip")
    g.add_argument("--metric", default="classifier", help="Frechet features: classifier (offline) or inception")
    args = p.parse_args(argv)
    if args.pick is None:
        args.pick = PICK_ACGAN if args.d_cond == "acgan" else 1
    return args


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    trained = train(args)
    if common.is_main():                              # under torchrun, rank 0 alone reports
        report(*trained, args)


if __name__ == "__main__":
    main()
