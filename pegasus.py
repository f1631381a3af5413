"""Pegasus from CIFAR-10: a class-conditional GAN whose horse condition is mixed with a bird or aeroplane condition,
a classifier trained here to pick the best of many samples, and a report on how new the samples are.

A standalone coursework file: it imports only torch, torchvision, numpy, tqdm and matplotlib, trains everything from
scratch on CIFAR-10 (no other data, no pretrained weights, no editing by hand) and writes, under runs/pegasus/<name>:
    samples.png        the 64 samples, 8x8, the best one framed in red
    unselected.png     the first 64 candidates, before any choice (what the generator alone gives)
    best.png           the best sample alone, upscaled 8x (nearest neighbour: the pixels are the model's)
    neighbours.png     the best samples beside their nearest training images in pixel and in feature space
    architecture.png   the diagram of the three networks, drawn from the modules themselves
    training.png       the GAN's losses and D outputs, the classifier's loss and held-out accuracy
    report.json/.md    scores, diversity, uniqueness, parameter counts, args, times

    python pegasus.py --quick                                  # the whole pipeline on a CPU in a few minutes
    python pegasus.py                                          # the default, sized for one GPU (about an hour)
    python pegasus.py --dataset folder --data-dir <copy with train/<class>/*.png>   # an ImageFolder copy
    python pegasus.py --resume --name <run>                    # continue a killed run where its checkpoint left it
    python pegasus.py --sample-only --name <run> --seed 1      # another 64 from a finished run
(The README gives the CPU run whose samples it shows, and its time.)

Why this approach. CIFAR-10 has horses, birds and aeroplanes but no winged horse, so the model must compose what it
has seen. A class-conditional GAN with conditional batch norm (de Vries et al. 2017, arXiv:1707.00683) turns a
condition c in R^K into per-channel gains and biases that are affine in c, so a convex mix of classes is a
condition the generator can be asked for, and gets the same mix of the classes' gains and biases:
    global mix:   c = (1 - a) e_horse + a e_wing,  a in [--mix-min, --mix-max], wing = bird or airplane;
    spatial mix:  a condition *map* c(h, w): the wing mix in the top rows of the 4x4 grid, pure horse below,
                  bilinearly resized to every layer, so the horse's body is drawn below and wing-like parts above.
Neither was ever trained on, and most results are not Pegasi; so the file draws --candidates of them and lets a
classifier trained here (on all ten classes) choose. A GAN over a diffusion model because on a CPU budget it gives
sharper objects per hour (the project's ddpm.py and gan.py runs on CIFAR-10 bear this out) and samples in
milliseconds, so scoring hundreds of candidates is free. Training uses only the classes in --classes (default
horse, bird, airplane), which puts all the generator's capacity on what a Pegasus is made of.

Generator G(z, c): z ~ N(0, I_128) -> linear to 4x4 -> three (2x upsampling by a 4x4 transposed conv, conditional
batch norm, ReLU) blocks -> 3x3 conv -> tanh; conditional BN is BN(h)(1 + gamma(e)) + beta(e) with e = E^T c, a
learned table E, gamma and beta 1x1 convolutions of the condition map (so a constant map is ordinary CBN).
Discriminator D(x, c): SNGAN's "standard CNN" (Miyato et al. 2018, arXiv:1802.05957, Table 3) with spectral norm on
every layer, and the projection output of Miyato & Koyama 2018 (arXiv:1802.05637, Eq. 3):
    D(x, c) = psi(phi(x)) + (V^T c) . phi(x),   phi(x) = sum over positions of the last feature map.
Objective: the hinge loss (Lim & Ye 2017; Miyato & Koyama), batch means over real x with its label c_x and fakes
G(z, c) drawn for the same labels:
    L_D = E[max(0, 1 - D(x, c_x))] + E[max(0, 1 + D(G(z, c), c))],     L_G = -E[D(G(z, c), c)].
Samples come from an exponential moving average of G's weights (--ema), the usual way to steadier GAN samples.

Best pick without a human. The classifier f (a small VGG-style CNN with batch norm, trained here on all ten classes,
accuracy reported on held-out images) gives p(y | x). Every candidate gets
    score(x) = log p(horse | x) + w log(p(bird | x) + p(airplane | x)) + lambda z(D(x, e_horse)),
w = --wing-weight (a Pegasus is first a horse), z() standardising D's logit over the candidates and clipping it to
[-2, 2] (a realism term from the network trained to tell real from fake; unclipped, a single dark blob with an
outlying logit, z = 6, won the pick of the run in the README), lambda = --realism-weight. The 64 are taken greedily by score,
skipping a candidate (a) closer to a training image (in pixels) than 95% of held-out real horses are (a copy), or
(b) closer in feature space to an already chosen sample than --min-spacing times the candidates' median distance
(a near duplicate); if that leaves fewer than 64, near duplicates fill the rest, copies only last (the report
counts the copies in the grid). The best image is the first taken.

Uniqueness. For each sample, its nearest training image in pixel space (root mean square difference, pixels in
[0, 1]) and in the classifier's feature space (Euclidean distance of unit-length penultimate features). Both are
reported beside the same distances for up to 256 held-out real horses (how far a genuinely new image is from the
training set): a ratio near 1 means as new as a real unseen photo, well below 1 means copying. Diversity is the mean
pairwise feature distance of the 64, beside that of 64 held-out real horses.

Budgets. --quick: small networks, 600 GAN and 300 classifier steps, 2 minutes on a 2-core CPU (to check the
pipeline; its samples are blobs). The README's CPU run (64/32-channel networks, 12,000 GAN steps) took about 65 min. Default: 40,000 GAN steps of the full-width networks and 8,000 classifier steps, about an
hour on one recent GPU (an estimate: no GPU was available to measure it). Checkpoints are written atomically every
--eval-every GAN steps and when the classifier is done (the classifier also reports its held-out accuracy every
--eval-every steps); --resume continues the GAN from its last checkpoint exactly, and redoes an unfinished classifier.

Differences from the papers: SNGAN's standard CNN generator with conditional BN (Miyato & Koyama used ResNets);
D's features phi summed over the 4x4 positions (the projection form of Miyato & Koyama) where SNGAN's standard CNN
flattens them into a dense layer; one D step per G step with Adam(2e-4, 0.5, 0.999), SNGAN's setting for the
standard CNN; the EMA generator uses G's batch-norm running statistics; mixed and spatial conditions at sampling
are this file's own, as are the score and the greedy selection.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")                 # draw to files; no display needed
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
HORSE, WINGS = "horse", ("bird", "airplane")
HORSE_ID, WING_IDS = CIFAR10_CLASSES.index(HORSE), [CIFAR10_CLASSES.index(w) for w in WINGS]
REALISM_CLIP = 2.0          # z(D) clipped to +-2: one outlying D logit must not outvote the classifier
REAL_HORSES = 256           # held-out real horses (at most) that set the scale of novelty and diversity
GRID = 64                   # the brief: a batch of 64 samples, shown 8x8
COPY_PERCENTILE = 5         # a sample nearer a training image than 95% of held-out real images is a copy
UPSCALE = 8                 # best.png: 32px shown at 256px
LEAKY_SLOPE = 0.1           # SNGAN's standard CNN discriminator (Miyato et al. 2018, Table 3)
MODEL_FLAGS = ("classes", "latent_dim", "cond_dim", "g_channels", "d_channels", "classifier_channels")
QUICK = dict(steps=600, classifier_steps=300, g_channels=32, d_channels=16, classifier_channels=16, candidates=256,
             eval_every=200)
FULL = dict(steps=40_000, classifier_steps=8_000, g_channels=128, d_channels=64, classifier_channels=64,
            candidates=1024, eval_every=2_000)


def fail(message):
    """Stop with a one-line message instead of a stack trace."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------- data

def load_cifar10(args):
    """read_cifar10's splits, the held-out images in a fixed random order (ImageFolder sorts them by class, and
    the classifier's progress checks take the first 2,000)."""
    x, y, x_held, y_held, names = read_cifar10(args)
    order = torch.randperm(len(x_held), generator=torch.Generator().manual_seed(1))   # classes mixed, every run alike
    return x, y, x_held[order], y_held[order], names


def read_cifar10(args):
    """(train images uint8 (N, 3, 32, 32), train labels, held-out images, held-out labels, class names).
    cifar10: torchvision's download (official train / test). folder: <data-dir>/train/<class>/*, with
    <data-dir>/test/<class>/* as held-out images if present, else --held-out images carved off train."""
    root = Path(args.data_dir)
    if args.dataset == "cifar10":
        try:
            splits = [torchvision.datasets.CIFAR10(root, train=train, download=True) for train in (True, False)]
        except Exception as e:           # offline, a proxy, a half-written archive: say what to do instead
            fail(f"could not get CIFAR-10 into {root} ({type(e).__name__}); connect to the internet, or pass "
                 f"--dataset folder --data-dir <a copy with train/<class>/*.png>")
        (x, y), (xt, yt) = [(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets))
                            for s in splits]
        return x, y, xt, yt, list(splits[0].classes)
    if args.dataset != "folder":
        fail(f"unknown --dataset {args.dataset!r}; use cifar10 (torchvision download) or folder (an ImageFolder copy)")
    x, y, names = read_folder(root / "train")
    if (root / "test").is_dir():
        xt, yt, test_names = read_folder(root / "test")
        if test_names != names:
            fail(f"{root / 'test'} has classes {test_names}, {root / 'train'} has {names}")
        return x, y, xt, yt, names
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))   # the same carve in every run
    held, kept = order[:args.held_out], order[args.held_out:]
    return x[kept], y[kept], x[held], y[held], names


def read_folder(root):
    """<root>/<class>/<image> -> (uint8 (N, 3, 32, 32), labels, class names), the ImageFolder layout."""
    if not root.is_dir():
        fail(f"{root} not found: --dataset folder needs <data-dir>/train/<class>/<image> (the ImageFolder layout)")
    try:
        folder = torchvision.datasets.ImageFolder(root)
    except FileNotFoundError as e:                       # no class folders, or class folders without images
        fail(f"{root}: {e}")
    images = []
    for path, _ in tqdm(folder.samples, desc=f"decoding {root}", leave=False):
        image = torchvision.transforms.functional.pil_to_tensor(folder.loader(path))    # PIL, as RGB
        if image.shape[1:] != (32, 32):
            image = torchvision.transforms.functional.resize(image, [32, 32], antialias=True)
        images.append(image)
    return torch.stack(images), torch.tensor(folder.targets), list(folder.classes)


def to_float(images):
    """uint8 [0, 255] -> float [-1, 1], the GAN's range (tanh output)."""
    return images.float() / 127.5 - 1


def augment(x, generator):
    """A random horizontal flip per image: CIFAR-10's objects face either way."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------- the three networks

class ConditionalBatchNorm(nn.Module):
    """BN(h)(1 + gamma(e)) + beta(e), gamma and beta 1x1 convolutions of the condition-embedding map e, resized
    (bilinear) to h's resolution: a constant map gives de Vries et al.'s conditional BN. The convolutions run at
    e's own resolution and their outputs are resized, the same thing more cheaply (a 1x1 convolution is affine
    at each position and bilinear weights sum to 1)."""

    def __init__(self, channels, cond_dim):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Conv2d(cond_dim, channels, 1)
        self.beta = nn.Conv2d(cond_dim, channels, 1)
        for conv in (self.gamma, self.beta):            # start as plain BN: gain 1, shift 0
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, h, e):
        gamma, beta = self.gamma(e), self.beta(e)
        if e.shape[-1] != h.shape[-1]:
            gamma, beta = (F.interpolate(t, size=h.shape[-2:], mode="bilinear", align_corners=False)
                           for t in (gamma, beta))
        return self.norm(h) * (1 + gamma) + beta


class UpBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, 2H, 2W): 4x4 transposed conv, conditional BN, ReLU."""

    def __init__(self, c_in, c_out, cond_dim):
        super().__init__()
        self.conv = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False)
        self.norm = ConditionalBatchNorm(c_out, cond_dim)
        self.label = "ConvT 4x4 /2, CBN, ReLU"

    def forward(self, h, e):
        return F.relu(self.norm(self.conv(h), e))


class Generator(nn.Module):
    """(z (B, latent_dim), condition c (B, K) or map (B, K, 4, 4)) -> image (B, 3, 32, 32) in [-1, 1]."""

    def __init__(self, num_classes, latent_dim=128, cond_dim=128, channels=128):
        super().__init__()
        self.latent_dim, self.channels = latent_dim, channels
        self.embed = nn.Parameter(torch.randn(num_classes, cond_dim))          # E: row k embeds class k
        self.project = nn.Linear(latent_dim, 4 * channels * 16)                # z -> (B, 4C, 4, 4)
        self.norm0 = ConditionalBatchNorm(4 * channels, cond_dim)
        self.project.label, self.norm0.label = "Linear", "reshape, CBN, ReLU"
        self.blocks = nn.ModuleList([UpBlock(4 * channels, 2 * channels, cond_dim),    # (B, 2C, 8, 8)
                                     UpBlock(2 * channels, channels, cond_dim),        # (B, C, 16, 16)
                                     UpBlock(channels, channels // 2, cond_dim)])      # (B, C/2, 32, 32)
        self.out = nn.Conv2d(channels // 2, 3, 3, padding=1)
        self.out.label = "Conv2d 3x3, tanh"

    def condition_map(self, c):
        """c (B, K) or (B, K, h, w) -> the embedding map e = E^T c (B, cond_dim, h, w); linear in c."""
        c = c[:, :, None, None] if c.dim() == 2 else c
        return torch.einsum("bkhw,kd->bdhw", c, self.embed)

    def forward(self, z, c):
        e = self.condition_map(c)
        h = F.relu(self.norm0(self.project(z).view(len(z), 4 * self.channels, 4, 4), e))
        for block in self.blocks:
            h = block(h, e)
        return torch.tanh(self.out(h))


def sn(module):
    """Spectral normalisation (Miyato et al. 2018): the layer's weight divided by its largest singular value."""
    return nn.utils.parametrizations.spectral_norm(module)


class Discriminator(nn.Module):
    """(image (B, 3, 32, 32), condition (B, K)) -> logit (B,): SNGAN's standard CNN with a projection output."""

    def __init__(self, num_classes, channels=64):
        super().__init__()
        c = channels
        widths = [(3, c, 3, 1), (c, c, 4, 2), (c, 2 * c, 3, 1), (2 * c, 2 * c, 4, 2),   # 32 -> 16 -> 8 -> 4
                  (2 * c, 4 * c, 3, 1), (4 * c, 4 * c, 4, 2), (4 * c, 8 * c, 3, 1)]
        self.convs = nn.ModuleList([sn(nn.Conv2d(i, o, k, stride=s, padding=1)) for i, o, k, s in widths])
        self.psi = sn(nn.Linear(8 * c, 1))                         # the unconditional logit psi(phi)
        self.V = sn(nn.Embedding(num_classes, 8 * c))              # class vectors of the projection term
        self.psi.label = "SN Linear psi(phi)"

    def features(self, x):
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LEAKY_SLOPE)
        return x.sum(dim=(2, 3))                                   # phi(x): (B, 8C), summed over positions

    def forward(self, x, c):
        phi = self.features(x)
        return self.psi(phi).squeeze(1) + ((c @ self.V.weight) * phi).sum(1)   # Eq. 3 with V^T c


class Classifier(nn.Module):
    """image (B, 3, 32, 32) -> class logits (B, 10): three (conv, BN, ReLU) x 2 + max-pool stages, then a global
    average pool; `features` is that pooled vector, the space of the nearest-neighbour and diversity measures."""

    def __init__(self, num_classes=10, channels=64):
        super().__init__()
        layers, c_in = [], 3
        for c in (channels, 2 * channels, 4 * channels):
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
                c_in = c
            layers.append(nn.MaxPool2d(2))                         # 32 -> 16 -> 8 -> 4
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        self.head.label = "Linear: class logits"

    def features(self, x):
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- training

def get_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device, cpuinfo=Path("/proc/cpuinfo")):
    """Does the hardware compute in bf16 itself? (GPUs from Ampere on; CPUs with AVX-512 BF16 or AMX, read from
    Linux's /proc/cpuinfo.) Elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu" and cpuinfo.exists():
        flags = cpuinfo.read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def autocast(args, device):
    """bf16 autocast for --amp bf16, and for --amp auto where the hardware runs bf16 natively."""
    use = args.amp == "bf16" or (args.amp == "auto" and native_bf16(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def save_atomically(state, path):
    """Write to a temporary file and rename it over the old one: a run killed mid-write keeps the last checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def check_finite(loss, what, step):
    if not torch.isfinite(loss):
        fail(f"{what} loss became {loss.item()} at step {step}; lower --lr or check the data")


def one_hot(labels, k):
    return F.one_hot(labels, k).float()


def d_hinge_loss(d_real, d_fake):
    """L_D = E[max(0, 1 - D(x, c_x))] + E[max(0, 1 + D(G(z, c), c))], each a batch mean."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def g_hinge_loss(d_fake):
    """L_G = -E[D(G(z, c), c)]."""
    return -d_fake.mean()


def train_gan(G, D, G_ema, state, x, y, args, device, checkpoint):
    """Alternate one D step and one G step on the hinge losses; G_ema follows G's weights (its BN statistics are
    G's, copied: running averages of batches from G's recent weights, close to the EMA's for decay 0.999)."""
    K = len(args.classes)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    data_rng = torch.Generator().manual_seed(args.seed)            # batches and flips
    if state["step"] > 0:
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        data_rng.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
    history = state["gan_history"]
    bar = tqdm(range(state["step"], args.steps), desc="GAN", initial=state["step"], total=args.steps)
    for step in bar:
        idx = torch.randint(len(x), (args.batch_size,), generator=data_rng)
        real = augment(to_float(x[idx]), data_rng).to(device)
        c = one_hot(y[idx], K).to(device)
        z = torch.randn(args.batch_size, args.latent_dim).to(device)
        with autocast(args, device):
            with torch.no_grad():
                fake = G(z, c)
            loss_d = d_hinge_loss(D(real, c), D(fake, c))
        check_finite(loss_d, "D", step)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with autocast(args, device):
            d_fake = D(G(z, c), c)
            loss_g = g_hinge_loss(d_fake)
        check_finite(loss_g, "G", step)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        with torch.no_grad():                                      # EMA of the weights; BN statistics copied
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - args.ema)
            for b_ema, b in zip(G_ema.buffers(), G.buffers()):
                b_ema.copy_(b)
        if step % 50 == 0:
            history.append(dict(step=step, loss_d=loss_d.item(), loss_g=loss_g.item(),
                                d_fake=d_fake.float().mean().item()))
            bar.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            state.update(args=vars(args), step=step + 1, G=G.state_dict(), D=D.state_dict(), G_ema=G_ema.state_dict(),
                         opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(), data_rng=data_rng.get_state(),
                         torch_rng=torch.get_rng_state())
            save_atomically(state, checkpoint)


def crop_and_flip(x, generator):
    """Pad by 4 (reflect) and crop back to 32 at a random offset, flip half: the usual CIFAR-10 augmentation."""
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = torch.randint(9, (2,), generator=generator).tolist()      # one offset per batch keeps it cheap
    return augment(padded[:, :, i:i + 32, j:j + 32], generator)


@torch.no_grad()
def accuracy(classifier, x, y, device, batch=500):
    classifier.eval()
    correct = sum((classifier(to_float(x[i:i + batch]).to(device)).argmax(1).cpu() == y[i:i + batch]).sum().item()
                  for i in range(0, len(x), batch))
    return correct / len(x)


def train_classifier(classifier, x, y, x_held, y_held, args, device, state, checkpoint):
    """Cross-entropy on all ten classes (logits into F.cross_entropy, no softmax first), AdamW with a one-cycle
    schedule; its held-out accuracy goes in the report. It runs in one go: a run killed here redoes it on --resume."""
    opt = torch.optim.AdamW(classifier.parameters(), lr=args.classifier_lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.classifier_lr, total_steps=args.classifier_steps)
    rng, history = torch.Generator().manual_seed(args.seed + 1), []
    for step in tqdm(range(args.classifier_steps), desc="classifier"):
        classifier.train()
        idx = torch.randint(len(x), (args.batch_size * 2,), generator=rng)
        with autocast(args, device):
            loss = F.cross_entropy(classifier(crop_and_flip(to_float(x[idx]), rng).to(device)), y[idx].to(device))
        check_finite(loss, "classifier", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        last = step + 1 == args.classifier_steps
        if step % 50 == 0 or last:
            history.append(dict(step=step, loss=loss.item()))
        if (step + 1) % args.eval_every == 0 and not last:              # the last is measured on all of them
            history.append(dict(step=step, held_out_accuracy=accuracy(classifier, x_held[:2000], y_held[:2000],
                                                                      device)))
    history.append(dict(step=args.classifier_steps - 1,
                        held_out_accuracy=accuracy(classifier, x_held, y_held, device)))
    state.update(args=vars(args), classifier=classifier.state_dict(), classifier_history=history,
                 classifier_accuracy=history[-1]["held_out_accuracy"])
    save_atomically(state, checkpoint)


# ----------------------------------------------------------------------------- sampling and choosing

def candidate_conditions(n, K, horse, wings, args, generator):
    """n condition maps (n, K, 4, 4): half a global horse/wing mix, half a spatial one (the wing mix in the top
    rows only), with the wing class, the mix a and the kind of every candidate for the report."""
    maps, info = torch.zeros(n, K, 4, 4), []
    for i in range(n):
        wing = wings[int(torch.randint(len(wings), (1,), generator=generator))]
        a = args.mix_min + (args.mix_max - args.mix_min) * torch.rand(1, generator=generator).item()
        spatial = i % 2 == 1
        rows = 1 + int(torch.randint(2, (1,), generator=generator)) if spatial else 4
        maps[i, horse] = 1
        maps[i, horse, :rows] -= a                               # (1 - a) e_horse + a e_wing in the top rows
        maps[i, wing, :rows] += a
        info.append(dict(kind="spatial" if spatial else "global", wing=args.classes[wing], a=round(a, 3), rows=rows))
    return maps, info


@torch.no_grad()
def generate(G, maps, args, device, seed, batch=256):
    z = torch.randn(len(maps), args.latent_dim, generator=torch.Generator().manual_seed(seed))
    G.eval()
    return torch.cat([G(z[i:i + batch].to(device), maps[i:i + batch].to(device)).float().cpu()
                      for i in range(0, len(maps), batch)]).clamp(-1, 1)


@torch.no_grad()
def embed(classifier, images, device, batch=500):
    """(log-probabilities of the ten classes, unit-length features) of images in [-1, 1]."""
    classifier.eval()
    log_probs, features = [], []
    for i in range(0, len(images), batch):
        f = classifier.features(images[i:i + batch].to(device)).float()
        log_probs.append(F.log_softmax(classifier.head(f), dim=1).cpu())
        features.append(F.normalize(f, dim=1).cpu())
    return torch.cat(log_probs), torch.cat(features)


def nearest(queries, keys, batch=1024):
    """For each row of `queries` (Q, D), the index and Euclidean distance of its nearest row of `keys` (N, D), by
    |q - k|^2 = |q|^2 + |k|^2 - 2 q.k in chunks (the whole training set at once would not fit in memory)."""
    best_d, best_i = torch.full((len(queries),), float("inf")), torch.zeros(len(queries), dtype=torch.long)
    q2 = (queries ** 2).sum(1, keepdim=True)
    for start in range(0, len(keys), batch):
        k = keys[start:start + batch]
        d2 = (q2 + (k ** 2).sum(1) - 2 * queries @ k.T).clamp_min(0)
        d, i = d2.min(1)
        better = d < best_d
        best_d[better], best_i[better] = d[better], i[better] + start
    return best_i, best_d.sqrt()


def pixels(images):
    """images in [-1, 1] -> flat vectors in [0, 1] / sqrt(D), so Euclidean distance is the RMS pixel difference."""
    flat = (images.float() + 1) / 2
    return flat.flatten(1) / math.sqrt(flat[0].numel())


def choose(scores, features, copy, args):
    """Indices of the GRID samples: greedily by score, skipping copies and near duplicates (see the docstring)."""
    spacing = args.min_spacing * torch.cdist(features, features).median()
    chosen = []
    for i in scores.argsort(descending=True).tolist():
        if copy[i] or (chosen and torch.cdist(features[i:i + 1], features[chosen]).min() < spacing):
            continue
        chosen.append(i)
        if len(chosen) == GRID:
            return chosen
    taken = set(chosen)                                # too few for the rules: near duplicates first, copies last
    rest = sorted((i for i in range(len(scores)) if i not in taken), key=lambda i: (bool(copy[i]), -scores[i]))
    return chosen + rest[:GRID - len(chosen)]


def mean_pairwise(features):
    n = len(features)
    return (torch.cdist(features, features).sum() / (n * (n - 1))).item()


# ----------------------------------------------------------------------------- figures

def save_grid(images, path, highlight=None, nrow=8):
    """An 8x8 grid with a 2-pixel white frame per cell, the `highlight` cell's frame red."""
    grid = torchvision.utils.make_grid((images + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    if highlight is not None:
        r, c, cell = highlight // nrow, highlight % nrow, images.shape[-1] + 2
        y0, x0 = r * cell, c * cell
        box = grid[:, y0:y0 + cell + 2, x0:x0 + cell + 2]
        inner = box[:, 2:-2, 2:-2].clone()
        box[:] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
        box[:, 2:-2, 2:-2] = inner
    torchvision.utils.save_image(grid, path)


def save_neighbours(samples, train_x, pixel_nn, feature_nn, rows, path):
    """Rows of (sample, nearest training image in pixels, nearest in features), distances in the titles."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)))
    for r, i in enumerate(rows):
        panels = [(samples[i], f"sample {i}"),
                  (to_float(train_x[pixel_nn[0][i]]), f"pixel NN {pixel_nn[1][i]:.3f}"),
                  (to_float(train_x[feature_nn[0][i]]), f"feature NN {feature_nn[1][i]:.3f}")]
        for ax, (image, title) in zip(axes[r], panels):
            ax.imshow(((image + 1) / 2).permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(module):
    """A box's text for one layer: its own `label` if it has one, else its type, kernel and stride."""
    if hasattr(module, "label"):
        return module.label
    if isinstance(module, nn.MaxPool2d):
        return "MaxPool 2x2"
    name = "SN Conv2d" if nn.utils.parametrize.is_parametrized(module) else type(module).__name__
    stride = f" /{module.stride[0]}" if module.stride[0] > 1 else ""
    after = ", LeakyReLU" if name == "SN Conv2d" else ", BN, ReLU"
    return f"{name} {module.kernel_size[0]}x{module.kernel_size[1]}{stride}{after}"


def layer_table(model, *inputs):
    """[(box text, output shape)] of a network's layers in call order, read with forward hooks."""
    rows, hooks = [], []
    blocks = [m for m in model.modules() if isinstance(m, (UpBlock, ConditionalBatchNorm))]
    inside = {id(m) for block in blocks for m in block.modules() if m is not block}    # drawn as their block
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.Linear, UpBlock, ConditionalBatchNorm)) and \
                id(module) not in inside:
            hooks.append(module.register_forward_hook(
                lambda m, i, o: rows.append((describe(m), tuple(o.shape[1:])))))
    with torch.no_grad():
        model.eval()(*inputs)
    for hook in hooks:
        hook.remove()
    return rows


def save_architecture(G, D, classifier, args, path):
    """The diagram of the final architecture the brief asks for, drawn from the modules: a column of boxes per
    network (a box per layer with its output shape C x H x W) and, below, how the three make the 64 and the pick."""
    K, one = len(args.classes), torch.eye(len(args.classes))[:2]
    g_rows = layer_table(G, torch.randn(2, args.latent_dim), one)
    d_rows = layer_table(D, torch.zeros(2, 3, 32, 32), one)
    f_rows = layer_table(classifier, torch.zeros(2, 3, 32, 32))
    columns = [
        (f"Generator G(z, c): {count_parameters(G):,} parameters", "#cfe2f3",
         [(f"z ~ N(0, I); c in R^{K} (a mix of classes), e = E^T c", (args.latent_dim,))] + g_rows),
        (f"Discriminator D(x, c): {count_parameters(D):,}", "#f4cccc",
         d_rows[:-1] + [("phi(x): sum over positions", d_rows[-2][1][:1])] + d_rows[-1:] +
         [("D = psi(phi) + (V^T c) . phi  (projection)", (1,))]),
        (f"Classifier f(x): {count_parameters(classifier):,}", "#d9ead3",
         f_rows[:-1] + [("features: global average pool", f_rows[-1][1][:0] + f_rows[-2][1][:1])] + f_rows[-1:] +
         [("softmax: p(y | x) over the 10 classes", (10,))])]
    flow = ["condition maps: horse mixed with\nbird / airplane, global or top rows",
            f"G (EMA weights):\n{args.candidates} candidates",
            "score: log p(horse) + w log p(wing)\n+ lambda z(D(x, horse))",
            "greedy by score: no copies of\ntraining images, no near duplicates",
            "samples.png (8x8, best framed)\nbest.png, neighbours.png"]
    height = max(len(rows) for _, _, rows in columns)
    fig, ax = plt.subplots(figsize=(15, 0.6 * height + 3.2))
    for col, (title, colour, rows) in enumerate(columns):
        x = col * 5
        ax.text(x + 2, height + 0.3, title, ha="center", fontsize=10, weight="bold")
        for r, (text, shape) in enumerate(rows):
            y = height - 1 - r
            ax.add_patch(plt.Rectangle((x, y - 0.35), 4, 0.7, facecolor=colour, edgecolor="black"))
            ax.text(x + 2, y, f"{text}  ->  {' x '.join(map(str, shape))}", ha="center", va="center", fontsize=7.5)
            if r:
                ax.annotate("", (x + 2, y + 0.35), (x + 2, y + 0.65), arrowprops=dict(arrowstyle="->"))
    for i, text in enumerate(flow):                                   # the pipeline along the bottom
        x, y = i * 2.95, -2.2
        ax.add_patch(plt.Rectangle((x, y - 0.6), 2.55, 1.2, facecolor="#fff2cc", edgecolor="black"))
        ax.text(x + 1.275, y, text, ha="center", va="center", fontsize=7.5)
        if i:
            ax.annotate("", (x, y), (x - 0.4, y), arrowprops=dict(arrowstyle="->"))
    ax.set_xlim(-0.3, 14.5)
    ax.set_ylim(-3.2, height + 0.8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_training(state, path):
    """The GAN's two losses and D's mean logit on fakes; the classifier's loss and held-out accuracy."""
    gan, classifier = state["gan_history"], state.get("classifier_history", [])
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    panels = [("GAN hinge losses", gan, ("loss_d", "loss_g")), ("D(G(z, c), c), mean logit", gan, ("d_fake",)),
              ("classifier", classifier, ("loss", "held_out_accuracy"))]
    for ax, (title, history, keys) in zip(axes, panels):
        for key in keys:
            points = [(h["step"], h[key]) for h in history if key in h]
            ax.plot(*zip(*points), "o-" if key == "held_out_accuracy" else "-", label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run

def build(args, device):
    K = len(args.classes)
    G = Generator(K, args.latent_dim, args.cond_dim, args.g_channels).to(device)
    G_ema = Generator(K, args.latent_dim, args.cond_dim, args.g_channels).to(device)
    G_ema.load_state_dict(G.state_dict())
    D = Discriminator(K, args.d_channels).to(device)
    classifier = Classifier(len(CIFAR10_CLASSES), args.classifier_channels).to(device)
    return G, D, G_ema, classifier


def load_state(args, checkpoint):
    """The saved run for --resume / --sample-only, else a fresh state. Budget and width flags not given come from
    the saved run (so `--resume` continues a --quick run as one), or for a new run from the --quick / full presets;
    model flags given must match the saved ones."""
    if not (args.resume or args.sample_only):
        if checkpoint.exists():
            fail(f"{checkpoint} exists: pass --resume to continue that run, or another --name")
        fill_presets(args, QUICK if args.quick else FULL)
        return dict(args=vars(args), step=0, gan_history=[])
    if not checkpoint.exists():
        fail(f"no checkpoint at {checkpoint} to {'resume' if args.resume else 'sample'} from")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"{checkpoint} is not a readable checkpoint ({type(e).__name__})")
    fill_presets(args, {key: state["args"][key] for key in FULL})
    for flag in MODEL_FLAGS:
        if state["args"][flag] != getattr(args, flag):
            fail(f"{checkpoint} was trained with --{flag.replace('_', '-')} {state['args'][flag]}, "
                 f"not {getattr(args, flag)}: pass the same model flags")
    return state


def fill_presets(args, values):
    for key, value in values.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def select_classes(x, y, classes):
    """The images of `classes` (CIFAR-10 names), relabelled 0..K-1 in that order: the GAN's training set."""
    ids = torch.tensor([CIFAR10_CLASSES.index(c) for c in classes])
    keep = torch.isin(y, ids)
    relabel = torch.full((len(CIFAR10_CLASSES),), -1, dtype=torch.long)
    relabel[ids] = torch.arange(len(classes))
    return x[keep], relabel[y[keep]]


def train(args, state, checkpoint, device):
    """Load the data, build the networks and train what the checkpoint does not hold yet: the GAN, then the
    classifier. Returns the networks and the data the choice and the report need."""
    x, y, x_held, y_held, names = load_cifar10(args)
    if names != list(CIFAR10_CLASSES):
        fail(f"expected CIFAR-10's ten classes {', '.join(CIFAR10_CLASSES)}, found {', '.join(names)}")
    gan_x, gan_y = select_classes(x, y, args.classes)
    G, D, G_ema, classifier = build(args, device)
    print(json.dumps(dict(args=vars(args), parameters=parameter_counts(G, D, classifier), gan_images=len(gan_x),
                          train_images=len(x), held_out_images=len(x_held))))
    if state["step"] > 0:
        G.load_state_dict(state["G"]), D.load_state_dict(state["D"]), G_ema.load_state_dict(state["G_ema"])
    if not args.sample_only:
        train_gan(G, D, G_ema, state, gan_x, gan_y, args, device, checkpoint)
    if "classifier" in state:
        classifier.load_state_dict(state["classifier"])
    elif args.sample_only:
        fail(f"{checkpoint} has no trained classifier yet: finish the run with --resume first")
    else:
        train_classifier(classifier, x, y, x_held, y_held, args, device, state, checkpoint)
    return G_ema, D, classifier, x, x_held[y_held == HORSE_ID]


def parameter_counts(G, D, classifier):
    return dict(generator=count_parameters(G), discriminator=count_parameters(D),
                classifier=count_parameters(classifier))


@torch.no_grad()
def score(candidates, classifier, D, args, device, batch=256):
    """score(x) = log p(horse | x) + w log p(bird or airplane | x) + lambda z(D(x, e_horse)) for every candidate,
    with the classifier's log-probabilities and unit features."""
    K = len(args.classes)
    log_probs, features = embed(classifier, candidates, device)
    D.eval()
    e_horse = one_hot(torch.tensor([args.classes.index(HORSE)]), K).to(device)
    realism = torch.cat([D(chunk.to(device), e_horse.expand(len(chunk), K)).float().cpu()
                         for chunk in candidates.split(batch)])
    log_p_horse = log_probs[:, HORSE_ID]
    log_p_wing = log_probs[:, WING_IDS].logsumexp(1)                # log(p(bird) + p(airplane))
    realism_z = ((realism - realism.mean()) / realism.std().clamp_min(1e-8)).clamp(-REALISM_CLIP, REALISM_CLIP)
    scores = log_p_horse + args.wing_weight * log_p_wing + args.realism_weight * realism_z
    return dict(scores=scores, log_probs=log_probs, features=features, p_horse=log_p_horse.exp(),
                p_wing=log_p_wing.exp(), realism=realism)


def novelty(images, features, train_pixels, train_features):
    """Each image's nearest training image in pixel and in feature space: ((indices, distances), (indices,
    distances)); `features` are the classifier's unit features of `images`."""
    return nearest(pixels(images), train_pixels), nearest(features, train_features)


def sample_and_choose(G_ema, D, classifier, train_x, real_horses, args, device):
    """Draw and score the candidates, measure how new they are against the training set (held-out real horses
    give the scale) and choose the 64: a dict with everything the figures and the report need."""
    if len(real_horses) < 2:
        fail(f"{len(real_horses)} held-out horse image(s): the novelty scale needs at least 2 (raise --held-out)")
    K, horse = len(args.classes), args.classes.index(HORSE)
    wings = [args.classes.index(w) for w in WINGS if w in args.classes] or [horse]
    maps, info = candidate_conditions(args.candidates, K, horse, wings, args, torch.Generator().manual_seed(args.seed))
    candidates = generate(G_ema, maps, args, device, seed=args.seed)
    s = score(candidates, classifier, D, args, device)
    train_pixels, train_features = pixels(to_float(train_x)), embed(classifier, to_float(train_x), device)[1]
    real = to_float(real_horses[:REAL_HORSES])
    real_features = embed(classifier, real, device)[1]
    real_pixel_nn, real_feature_nn = novelty(real, real_features, train_pixels, train_features)
    pixel_nn, feature_nn = novelty(candidates, s["features"], train_pixels, train_features)
    copy_threshold = torch.quantile(real_pixel_nn[1], COPY_PERCENTILE / 100).item()
    copies = pixel_nn[1] < copy_threshold
    return dict(s, candidates=candidates, info=info, pixel_nn=pixel_nn, feature_nn=feature_nn, copies=copies,
                copy_threshold=copy_threshold, chosen=choose(s["scores"], s["features"], copies, args),
                real=dict(images=len(real), diversity=mean_pairwise(real_features[:GRID]),
                          pixel_nn=real_pixel_nn[1].median().item(), feature_nn=real_feature_nn[1].median().item()))


def evaluate(r):
    """The report's numbers: the best sample, the 64 and the first 64 candidates (before any choice) against the
    held-out real horses, and every chosen sample's scores and nearest training images."""
    def summary(idx):
        idx = torch.tensor(idx)
        return dict(p_horse=r["p_horse"][idx].mean().item(), p_wing=r["p_wing"][idx].mean().item(),
                    classified_horse=(r["log_probs"][idx].argmax(1) == HORSE_ID).float().mean().item(),
                    diversity=mean_pairwise(r["features"][idx]), pixel_nn=r["pixel_nn"][1][idx].median().item(),
                    feature_nn=r["feature_nn"][1][idx].median().item(), copies=int(r["copies"][idx].sum()))

    def sample(i):
        return dict(candidate=i, score=round(r["scores"][i].item(), 3), p_horse=round(r["p_horse"][i].item(), 3),
                    p_wing=round(r["p_wing"][i].item(), 3), realism=round(r["realism"][i].item(), 3),
                    pixel_nn=round(r["pixel_nn"][1][i].item(), 4), pixel_nn_index=int(r["pixel_nn"][0][i]),
                    feature_nn=round(r["feature_nn"][1][i].item(), 4), feature_nn_index=int(r["feature_nn"][0][i]),
                    **r["info"][i])

    chosen, real = summary(r["chosen"]), r["real"]
    return dict(candidates=len(r["candidates"]), copies_skipped=int(r["copies"].sum()),
                copy_threshold=r["copy_threshold"], best=sample(r["chosen"][0]), chosen=chosen,
                unselected=summary(list(range(GRID))), real_horses=real,
                uniqueness_ratio=dict(pixel=chosen["pixel_nn"] / real["pixel_nn"],
                                      feature=chosen["feature_nn"] / real["feature_nn"]),
                samples=[sample(i) for i in r["chosen"]])


def save_figures(r, G_ema, D, classifier, train_x, state, args, out):
    candidates, chosen = r["candidates"], r["chosen"]
    save_grid(candidates[chosen], out / "samples.png", highlight=0)
    save_grid(candidates[:GRID], out / "unselected.png")
    best = F.interpolate((candidates[chosen[0]][None] + 1) / 2, scale_factor=UPSCALE, mode="nearest")
    torchvision.utils.save_image(best, out / "best.png")
    save_neighbours(candidates, train_x, r["pixel_nn"], r["feature_nn"], chosen[:8], out / "neighbours.png")
    save_architecture(G_ema.cpu(), D.cpu(), classifier.cpu(), args, out / "architecture.png")   # their last use
    save_training(state, out / "training.png")


def run(args):
    t0 = time.time()
    device = get_device(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    state = load_state(args, checkpoint)
    G_ema, D, classifier, train_x, real_horses = train(args, state, checkpoint, device)
    train_time = time.time() - t0
    r = sample_and_choose(G_ema, D, classifier, train_x, real_horses, args, device)
    save_figures(r, G_ema, D, classifier, train_x, state, args, out)
    report = dict(args=vars(args), parameters=parameter_counts(G_ema, D, classifier), steps=state["step"],
                  device=str(device), classifier_accuracy=state["classifier_accuracy"],
                  time_s=round(time.time() - t0, 1), train_time_s=round(train_time, 1), **evaluate(r))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(r):
    """report.md: the best sample, a table of the 64 against the first 64 candidates and real horses, uniqueness."""
    c, u, real, b = r["chosen"], r["unselected"], r["real_horses"], r["best"]
    rows = [f"| {name} | {s['p_horse']:.3f} | {s['p_wing']:.3f} | {s['classified_horse']:.0%} | {s['diversity']:.3f} "
            f"| {s['pixel_nn']:.4f} | {s['feature_nn']:.4f} | {s['copies']} |"
            for name, s in (("the 64 chosen", c), ("the first 64 candidates", u))]
    return "\n".join([
        f"# Pegasus run: {r['steps']:,} GAN steps, classifier accuracy {r['classifier_accuracy']:.1%} (held out)",
        "", f"Best: candidate {b['candidate']} ({b['kind']} mix with {b['wing']}, a = {b['a']}), p(horse) "
        f"{b['p_horse']:.3f}, p(bird or airplane) {b['p_wing']:.3f}, nearest training image {b['pixel_nn']:.4f} "
        f"(pixels), {b['feature_nn']:.4f} (features).", "",
        "| samples | mean p(horse) | mean p(wing) | classified horse | diversity | median pixel NN | median feature NN "
        "| copies |", "|---|---|---|---|---|---|---|---|", *rows,
        f"| {real['images']} held-out real horses (diversity: 64 of them) | | | | {real['diversity']:.3f} "
        f"| {real['pixel_nn']:.4f} | {real['feature_nn']:.4f} | |",
        "", f"Uniqueness ratio (the 64's median nearest-neighbour distance / real horses', 1 = as new as an unseen "
        f"photo): pixels {r['uniqueness_ratio']['pixel']:.2f}, features {r['uniqueness_ratio']['feature']:.2f}. "
        f"{r['copies_skipped']} of {r['candidates']} candidates were copies (pixel NN below "
        f"{r['copy_threshold']:.4f}, the {COPY_PERCENTILE}th percentile of real horses').",
        "", f"Parameters: {r['parameters']}. Time: {r['time_s'] / 60:.1f} min on {r['device']}.", ""])


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Pegasus: a class-conditional GAN on CIFAR-10 with mixed conditions")
    # data
    p.add_argument("--dataset", default="cifar10", help="cifar10 (torchvision download) or folder (ImageFolder copy)")
    p.add_argument("--data-dir", default="data", help="where CIFAR-10 is downloaded, or the folder copy's root")
    p.add_argument("--held-out", type=int, default=5000, help="images carved off train when the folder has no test/")
    p.add_argument("--classes", default="horse,bird,airplane", help="the classes the GAN trains on (comma-separated)")
    # model
    p.add_argument("--quick", action="store_true", help="small networks and budgets: a few minutes on a CPU")
    p.add_argument("--latent-dim", type=int, default=128, help="dimension of z (SNGAN: 128)")
    p.add_argument("--cond-dim", type=int, default=128, help="dimension of the condition embedding E^T c")
    p.add_argument("--g-channels", type=int, help="G's width C (blocks 4C, 2C, C, C/2; default 128, --quick 32)")
    p.add_argument("--d-channels", type=int, help="D's width C (SNGAN: 64 -> 512; default 64, --quick 16)")
    p.add_argument("--classifier-channels", type=int, help="classifier width (default 64, --quick 16)")
    # optimisation
    p.add_argument("--steps", type=int, help="GAN steps, one D and one G update each (default 40,000, --quick 600)")
    p.add_argument("--batch-size", type=int, default=64, help="images per GAN step (the classifier takes twice)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of G and D (SNGAN: 2e-4)")
    p.add_argument("--ema", type=float, default=0.999, help="decay of G's weight average used for sampling")
    p.add_argument("--classifier-steps", type=int, help="classifier steps (default 8,000, --quick 300)")
    p.add_argument("--classifier-lr", type=float, default=2e-3, help="classifier's peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="classifier's AdamW weight decay")
    # sampling and choosing
    p.add_argument("--candidates", type=int, help="samples drawn to choose the 64 from (default 1024, --quick 256)")
    p.add_argument("--mix-min", type=float, default=0.2, help="smallest share a of the wing class in a condition")
    p.add_argument("--mix-max", type=float, default=0.6, help="largest share a of the wing class in a condition")
    p.add_argument("--wing-weight", type=float, default=0.5, help="w: weight of log p(bird or airplane) in the score")
    p.add_argument("--realism-weight", type=float, default=0.5, help="lambda: weight of D's standardised logit")
    p.add_argument("--min-spacing", type=float, default=0.5,
                   help="skip samples closer than this times the median feature distance to a chosen one")
    # system
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"), help="bf16 autocast (auto: if native)")
    p.add_argument("--out", default="runs/pegasus")
    p.add_argument("--name", default="default")
    p.add_argument("--eval-every", type=int, help="steps between checkpoints (default 2,000, --quick 200)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out/--name from its checkpoint")
    p.add_argument("--sample-only", action="store_true", help="only sample, choose and report from a finished run")
    args = p.parse_args(argv)
    args.classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    unknown = [c for c in args.classes if c not in CIFAR10_CLASSES]
    if unknown:
        fail(f"--classes: {', '.join(unknown)} not among CIFAR-10's {', '.join(CIFAR10_CLASSES)}")
    if HORSE not in args.classes:
        fail(f"--classes must include {HORSE} (a Pegasus is first a horse), got {','.join(args.classes)}")
    if not 0 <= args.mix_min <= args.mix_max <= 1:
        fail(f"--mix-min and --mix-max must satisfy 0 <= min <= max <= 1, got {args.mix_min}, {args.mix_max}")
    if args.candidates is not None and args.candidates < GRID:
        fail(f"--candidates must be at least {GRID} (the grid), got {args.candidates}")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        fail("pegasus.py runs in one process: start it with python, not torchrun")
    return args


def main(argv=None):
    return run(get_args(argv))


if __name__ == "__main__":
    main()
