"""Convolutional autoencoders: restoring distorted images, the size of the bottleneck, U-Net skips, and what the
codes know (probes, pre-training a classifier).

Papers: Vincent et al. 2008, "Extracting and composing robust features with denoising autoencoders", ICML
(train on corrupted inputs, reconstruct the clean ones); Ronneberger, Fischer & Brox 2015, "U-Net",
arXiv:1505.04597 (skip connections from encoder to decoder, concatenated); Mao, Shen & Yang 2016, "Image
restoration using very deep convolutional encoder-decoder networks with symmetric skip connections",
arXiv:1603.09056 (skips by addition); Odena, Dumoulin & Olah 2016, "Deconvolution and checkerboard artifacts",
Distill (upsampling + convolution instead of transposed convolution); Wang et al. 2004 (SSIM).

    python autoencoder.py                                   # restore 6 distortions, 128-d bottleneck (README: time)
    python autoencoder.py --task denoise --latent-dim 0 --skip concat    # a U-Net-style denoiser
    python autoencoder.py --task segment --latent-dim 0 --skip concat    # shape masks of the shapes set
    python autoencoder.py --sweep latent_dim=2,8,32,128,512,0 --distort none --pretrain-fractions none --steps 2000
    python autoencoder.py --sweep skip=none,add,concat --task denoise --latent-dim 0    # U-Net skips or none
    python autoencoder.py --eval-only --name <run> --test-distort noise:0.4    # a strength it never saw
                                      # (--eval-only: repeat the run's model flags, e.g. --latent-dim)

Tasks. Every task maps a network input x~ to a target y, both made on the fly from a clean image x:

    restore, denoise   x~ = d(x) for a distortion d drawn per image from --distort,        y = x
    inpaint            x~ = [d(x), m]: the occluded image and the hole mask m as a 4th channel, y = x
    colorize           x~ = grey(d(x)) = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601 luma),    y = x
    segment            x~ = d(x) (clean by default),                          y = the shape's mask (shapes only)

Rotations and flips move the hole mask and the shape's mask with the image: segment asks for the mask of the
shape as the input shows it; inpaint's mask channel marks where the black square ended up.

Distortions (--distort, comma-separated; each image gets one item drawn uniformly; `+` composes within an item,
left to right, so occlude:8+noise:0.1 puts noise on the square too), with strengths on the [0, 1] pixel scale:
    noise:s        add Gaussian noise of standard deviation s, then clip to the valid range
    occlude:k      a black k x k square at a uniformly drawn position inside the image
    brightness:b   add a shift drawn uniformly from [-b, b] to every pixel, then clip
    rotate:a       rotate about the centre by an angle drawn uniformly from [-a, a] degrees (counter-clockwise
                   positive); corners that come from outside the image are mid-grey
    hflip, vflip   mirror left-right, top-bottom
What cannot be undone, cannot be learned: on shapes, a flipped image is as likely as an unflipped one (positions
and rotations are drawn symmetrically), so nothing in a flipped input says it was flipped, and the best a
restorer trained on a mixture can do is hedge between the candidates. The README measures it.

Loss, per batch, minimised: for images, the mean squared error on pixels in [0, 1] (the networks work in
[-1, 1], hence the 1/4), over the N images and D = C*H*W values,

    L = 1 / (N D) sum_n sum_i (f(x~_n)_i - y_n,i)^2 / 4,      and PSNR = 10 log10(1 / MSE) dB (peak value 1)

so the loss is the MSE whose PSNR is reported; for segment, the binary cross-entropy on the output's logits l,
mean over pixels: softplus(l) - m l. Evaluation clamps outputs to [-1, 1] (no image holds other values) and
reports, per distortion, the MSE, PSNR (per image, then averaged) and SSIM of the output and of the distorted
input against the clean image, so the gain is visible; segment reports the IoU |P and M| / |P or M| of the
predicted mask P = {l > 0} with the true mask M (1 when both are empty), and pixel accuracy.

Network. A 3x3 convolution from the input to --channels, then an encoder of --levels stages, each a 3x3
convolution at one resolution followed by a stride-2 4x4 convolution that halves the resolution and doubles the channels, from --channels to
--channels * 2^levels at (S / 2^levels)^2. With --latent-dim d > 0 a linear layer maps the flattened features
to a dense code z in R^d (the bottleneck) and another maps z back; with d = 0 the network is fully convolutional.
The decoder mirrors the encoder: per stage an upsampling, --up transposed (a stride-2 4x4 transposed
convolution) or upsample (nearest-neighbour x2, then a 3x3 convolution: no checkerboard, Odena et al.), then
the skip from the encoder stage at the same resolution, then a 3x3 convolution:

    --skip none     h                        (everything passes through the bottleneck)
    --skip add      h + s                    (Mao et al.)
    --skip concat   W [h; s] + b             (a 1x1 convolution of the concatenation, U-Net-like)

The concatenation's 1x1 convolution W = [W_h W_s] can express the sum (W_h = W_s = I, b = 0) and more: it is
the sum with learned weights, W_h h + W_s s. That costs 2c^2 + c parameters per stage, 2.5% of the default
fully convolutional network, while widening a network by one channel adds about 13%: at the same --channels
the three variants are as close in size as whole channels allow, and a --sweep over skip reports each count.
Skips carry detail around the bottleneck: a bottleneck sweep is only meaningful without them (the script
refuses one with skips).

What the codes know. The code of an image is z (dense) or the encoder's last feature map averaged over space
(fully convolutional: --channels * 2^levels values). Computed for clean inputs, it is probed by a linear
classifier (multinomial logistic regression, common.linear_probe) and by an MLP with one hidden layer, both
fitted on the codes of PROBE_TRAIN training images and measured on the test set; and the encoder is fine-tuned
as a classifier (the encoder, then a linear layer on the code) from its autoencoder weights and from a random
initialisation, on the first 1%, 10% and 100% of the training labels (--pretrain-fractions), the same number of
steps each. A scatter plot shows the codes in 2-D (the codes themselves when d <= 2, else their first two
principal components), coloured by class.

Every convolution but the output layer and the concatenation's (linear) 1x1 is followed by batch normalisation
(Ioffe & Szegedy 2015) and a ReLU: without it this plain stack of 14 convolutions, at PyTorch's default
initialisation, learns several times slower (the README measures it).

Differences from the papers: small networks at 32px, one 3x3 convolution per stage (the U-Net has two), a 1x1 convolution after
concatenation (the U-Net's next 3x3 convolution takes both inputs), and MSE rather than other losses.
"""
import argparse
import copy
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

MODEL_FLAGS = ("dataset", "image_size", "task", "latent_dim", "channels", "levels", "up", "skip")
TASKS = ("restore", "denoise", "inpaint", "colorize", "segment")
DEFAULT_DISTORT = {"restore": "noise:0.2,occlude:8,brightness:0.3,rotate:30,hflip,vflip", "denoise": "noise:0.2",
                   "inpaint": "occlude:12", "colorize": "none", "segment": "none"}
DISTORTIONS = {"noise": 0.2, "occlude": 8, "brightness": 0.3, "rotate": 30, "hflip": None, "vflip": None}  # defaults
UPS, SKIPS = ("transposed", "upsample"), ("none", "add", "concat")
LUMA = (0.299, 0.587, 0.114)    # ITU-R BT.601 weights of R, G, B in the grey value
PROBE_TRAIN = 10_000            # training images whose codes fit the probes
PROBE_HIDDEN, PROBE_STEPS, PROBE_LR = 256, 500, 1e-3   # the MLP probe: hidden width, full-batch Adam steps and rate
ENCODE_BATCH = 500              # images per forward pass when computing codes
SWEEPABLE = ("latent_dim", "skip", "up", "channels", "levels")
FIGURE_IMAGES = 8               # columns of the restoration figure
SCATTER_POINTS = 2000           # test codes in the 2-D scatter plot
# Distortions come from seeded generators: training step t of a run with --seed r uses seed r * TRAIN_SEED_STRIDE
# + t; batch b of the evaluation of distortion item k uses (k + 1) * EVAL_SEED_STRIDE + b, so the two streams
# never share a seed, every evaluation sees the same inputs (at the same --batch-size), and a resumed run draws
# the same distortions at each step. Under torchrun, process number k adds k * RANK_SEED_STRIDE: each process
# distorts its shard of the batch differently.
TRAIN_SEED_STRIDE = 2 ** 40
RANK_SEED_STRIDE = 2 ** 32
EVAL_SEED_STRIDE = 1_000_003


# ----------------------------------------------------------------------------- distortions

def parse_distortions(spec):
    """'noise:0.2,occlude:8+hflip' -> [("noise:0.2", [("noise", 0.2)]), ("occlude:8+hflip", [(...), (...)])];
    'none' (or '') is the single identity item 'clean'."""
    if spec in ("", "none"):
        return [("clean", [])]
    items = []
    for item in spec.replace(" ", "").split(","):
        ops = []
        for op in item.split("+"):
            name, _, value = op.partition(":")
            if name not in DISTORTIONS:
                common.fail(f"unknown distortion {name!r} in --distort; choose from {', '.join(DISTORTIONS)}")
            if DISTORTIONS[name] is None:
                if value:
                    common.fail(f"distortion {name} takes no strength, got {op!r}")
                ops.append((name, None))
                continue
            try:
                strength = float(value) if value else DISTORTIONS[name]
            except ValueError:
                common.fail(f"distortion {op!r}: the strength after ':' must be a number")
            if not math.isfinite(strength) or strength < 0 or (name == "occlude" and
                                                               (strength < 1 or strength != int(strength))):
                common.fail(f"distortion {op!r}: the strength must be finite and >= 0 (occlude: a whole number of "
                            f"pixels, at least 1)")
            ops.append((name, strength))
        items.append((item, ops))
    return items


def add_noise(x, std, g):
    """x + std * eps on the [0, 1] scale (2 std on the [-1, 1] scale the networks see), clipped."""
    eps = torch.randn(x.shape, generator=g).to(x.device)
    return (x + 2 * std * eps).clamp(-1, 1)


def occlude(x, size, g):
    """A black size x size square per image at a uniform position; returns the image and the hole mask (B,1,H,W)."""
    b, _, h, w = x.shape
    size = min(int(size), h, w)
    top = torch.randint(h - size + 1, (b,), generator=g)
    left = torch.randint(w - size + 1, (b,), generator=g)
    rows, cols = torch.arange(h), torch.arange(w)
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)             # (B, H)
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)           # (B, W)
    hole = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None].to(x.device)  # (B, 1, H, W)
    return x.masked_fill(hole, -1.0), hole


def shift_brightness(x, delta):
    """Add delta (B,) on the [0, 1] scale to every pixel, clipped."""
    return (x + 2 * delta.to(x.device)[:, None, None, None]).clamp(-1, 1)


def rotate(x, degrees):
    """Rotate each image about its centre by degrees (B,), counter-clockwise; outside pixels are 0 (mid-grey)."""
    theta = torch.deg2rad(degrees.float()).to(x.device)
    cos, sin = theta.cos(), theta.sin()
    # affine_grid maps output coordinates (x right, y down) to where to read the input: the inverse rotation.
    # Counter-clockwise on screen (y down) reads from R(theta) applied to the output position.
    zero = torch.zeros_like(cos)
    matrix = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply_item(x, ops, g, masks=None):
    """Apply one distortion item's ops, left to right, to a batch. masks (B, M, H, W) in {0, 1} (the shape's mask,
    or none) follow the rotations and flips; returns the image, the occluded pixels (B, 1, H, W) bool (moved by the
    later rotations and flips too) and the masks."""
    hole = torch.zeros_like(x[:, :1])
    masks = hole[:, :0] if masks is None else masks.float()
    for name, s in ops:
        if name == "noise":
            x = add_noise(x, s, g)
        elif name == "occlude":
            x, new_hole = occlude(x, s, g)
            hole = hole.maximum(new_hole.float())
        elif name == "brightness":
            x = shift_brightness(x, (torch.rand(len(x), generator=g) * 2 - 1) * s)
        elif name == "rotate":
            degrees = (torch.rand(len(x), generator=g) * 2 - 1) * s
            x = rotate(x, degrees)
            hole = rotate(hole, degrees).round()                          # nearest: a pixel is in if > 0.5
            masks = rotate(masks, degrees).round() if masks.shape[1] else masks
        elif name in ("hflip", "vflip"):
            dim = 3 if name == "hflip" else 2
            x, hole, masks = x.flip(dim), hole.flip(dim), masks.flip(dim)
    return x, hole > 0.5, masks


def grey(x):
    """(B, 3, H, W) -> (B, 1, H, W) luma; the weights sum to 1, so [-1, 1] stays [-1, 1]."""
    return sum(w * x[:, c:c + 1] for c, w in enumerate(LUMA))


def network_input(distorted, hole, task):
    """What the network sees: the grey image for colorize, the image and its hole mask for inpaint (1 in the hole,
    -1 elsewhere, as a 4th channel), else the distorted image itself."""
    if task == "colorize":
        return grey(distorted)
    if task == "inpaint":
        return torch.cat([distorted, hole.float() * 2 - 1], 1)
    return distorted


def clean_input(x, task):
    """The network input for an undistorted image (for probes and classifiers)."""
    return network_input(x, torch.zeros_like(x[:, :1], dtype=torch.bool), task)


def make_pair(x, mask, task, items, choice, g):
    """Network input, target, the distorted image (for figures and the input's own scores) and the holes, for a
    batch whose image n gets distortion item choice[n]."""
    distorted, hole = x.clone(), torch.zeros_like(x[:, :1], dtype=torch.bool)
    target = mask[:, None].float().to(x.device) if task == "segment" else x
    for k, (_, ops) in enumerate(items):
        idx = (choice == k).nonzero().squeeze(1).to(x.device)
        if len(idx):
            distorted[idx], hole[idx], moved = apply_item(x[idx], ops, g, target[idx] if task == "segment" else None)
            if task == "segment":
                target[idx] = moved
    return network_input(distorted, hole, task), target, distorted, hole


def task_channels(task, image_channels):
    """(input channels, output channels) of the network for a task."""
    inputs = {"colorize": 1, "inpaint": image_channels + 1}.get(task, image_channels)
    return inputs, 1 if task == "segment" else image_channels


# ----------------------------------------------------------------------------- networks

def normalised(conv):
    """conv -> BatchNorm -> ReLU (the convolution's bias is redundant before the normalisation)."""
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())


def conv3(c_in, c_out):
    return normalised(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))


class Encoder(nn.Module):
    """x (B, C_in, S, S) -> code (B, d), or (B, c_L, S/2^L, S/2^L) when fully convolutional, and the skips: the
    feature map of every stage before it is downsampled."""

    def __init__(self, in_channels, channels, levels, image_size, latent_dim):
        super().__init__()
        widths = [channels * 2 ** i for i in range(levels + 1)]
        self.stem = conv3(in_channels, widths[0])
        self.stages = nn.ModuleList(conv3(w, w) for w in widths[:-1])
        self.downs = nn.ModuleList(normalised(nn.Conv2d(w, w2, 4, stride=2, padding=1, bias=False))
                                   for w, w2 in zip(widths, widths[1:]))                  # (B, 2c, H/2, W/2)
        bottom = image_size // 2 ** levels
        self.to_code = nn.Linear(widths[-1] * bottom ** 2, latent_dim) if latent_dim else None
        self.code_dim = latent_dim or widths[-1]

    def forward(self, x):
        h, skips = self.stem(x), []
        for stage, down in zip(self.stages, self.downs):
            h = stage(h)
            skips.append(h)
            h = down(h)
        return (self.to_code(h.flatten(1)) if self.to_code is not None else h), skips

    def code(self, x):
        """The vector a probe or a classifier reads: z, or the last feature map averaged over space."""
        h, _ = self(x)
        return h if self.to_code is not None else h.mean((2, 3))


class Merge(nn.Module):
    """Join the upsampled decoder features h with the encoder's skip s at the same resolution (see docstring)."""

    def __init__(self, kind, c):
        super().__init__()
        self.kind = kind
        self.mix = nn.Conv2d(2 * c, c, 1) if kind == "concat" else None

    def forward(self, h, s):
        if self.kind == "add":
            return h + s
        if self.kind == "concat":
            return self.mix(torch.cat([h, s], 1))          # (B, 2c, H, W) -> (B, c, H, W)
        return h


class Decoder(nn.Module):
    def __init__(self, out_channels, channels, levels, image_size, latent_dim, up, skip):
        super().__init__()
        widths = [channels * 2 ** i for i in range(levels + 1)]
        bottom = image_size // 2 ** levels
        self.from_code = nn.Sequential(nn.Linear(latent_dim, widths[-1] * bottom ** 2), nn.ReLU(),
                                       nn.Unflatten(1, (widths[-1], bottom, bottom))) if latent_dim else None
        ups = []
        for w2, w in zip(widths[:0:-1], widths[-2::-1]):                                   # (B, w2, H, W) ->
            if up == "transposed":                                                         # (B, w, 2H, 2W)
                ups.append(normalised(nn.ConvTranspose2d(w2, w, 4, stride=2, padding=1, bias=False)))
            else:
                ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv3(w2, w)))
        self.ups = nn.ModuleList(ups)
        self.merges = nn.ModuleList(Merge(skip, w) for w in widths[-2::-1])
        self.stages = nn.ModuleList(conv3(w, w) for w in widths[-2::-1])
        self.out = nn.Conv2d(widths[0], out_channels, 3, padding=1)     # no activation: pixel values or logits

    def forward(self, h, skips):
        if self.from_code is not None:
            h = self.from_code(h)
        for up, merge, stage, s in zip(self.ups, self.merges, self.stages, reversed(skips)):
            h = stage(merge(up(h), s))
        return self.out(h)


class AutoEncoder(nn.Module):
    def __init__(self, in_channels=3, out_channels=3, image_size=32, channels=16, levels=3, latent_dim=128,
                 up="transposed", skip="none"):
        super().__init__()
        self.encoder = Encoder(in_channels, channels, levels, image_size, latent_dim)
        self.decoder = Decoder(out_channels, channels, levels, image_size, latent_dim, up, skip)

    def forward(self, x):
        return self.decoder(*self.encoder(x))


def build(args, image_channels):
    return AutoEncoder(*task_channels(args.task, image_channels), args.image_size, args.channels, args.levels,
                       args.latent_dim, args.up, args.skip)


# ----------------------------------------------------------------------------- loss and metrics

def loss_fn(out, target, task):
    """MSE on pixels in [0, 1] (hence / 4), or for segment the BCE on logits; means over all values."""
    if task == "segment":
        return F.binary_cross_entropy_with_logits(out.float(), target)
    return F.mse_loss(out.float(), target) / 4


def iou(logits, mask):
    """Per image |P and M| / |P or M| of the predicted mask P = {logits > 0} and the true mask M; 1 if both empty."""
    p, m = logits > 0, mask > 0.5
    inter, union = (p & m).flatten(1).sum(1), (p | m).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float32))


def pixel_accuracy(logits, mask):
    """Per image share of pixels where {logits > 0} agrees with the true mask."""
    return ((logits > 0) == (mask > 0.5)).float().mean((1, 2, 3))


def image_scores(a, b, hole=None):
    """Per-image MSE (pixels in [0, 1]), PSNR and SSIM of a against b, and PSNR in the holes if any."""
    scores = {"mse": common.region_mean(((a.float() - b.float()) / 2) ** 2), "psnr": common.psnr(a, b),
              "ssim": common.ssim(a, b)}
    if hole is not None and hole.any():
        scores["psnr_hole"] = common.psnr(a, b, region=hole)
    return scores


@torch.no_grad()
def evaluate(model, loader, args, items, device, per_item=True):
    """Loss over a split with distortions drawn as in training (per_item=False), or the scores of every
    distortion item applied to the whole split (per_item=True): {item: {metric: mean}}. Distortions are seeded
    by item and batch (see EVAL_SEED_STRIDE), so every evaluation sees the same inputs."""
    model.eval()
    results = {}
    for k, (name, ops) in enumerate(items if per_item else [("mixture", None)]):
        totals, n = {}, 0
        for b, (x, _, *mask) in enumerate(loader):
            g = torch.Generator().manual_seed((k + 1) * EVAL_SEED_STRIDE + b)
            x = x.to(device)
            choice = (torch.full((len(x),), k) if per_item else torch.randint(len(items), (len(x),), generator=g))
            net_input, target, distorted, hole = make_pair(x, mask[0] if mask else None, args.task, items, choice, g)
            with common.autocast(args.amp, device):
                out = model(net_input)
            scores = {"loss": torch.full((len(x),), loss_fn(out, target, args.task).item())}
            if per_item and args.task == "segment":
                scores.update(iou=iou(out, target), pixel_accuracy=pixel_accuracy(out, target))
            elif per_item:
                out = out.float().clamp(-1, 1)
                for key, value in image_scores(out, x, hole if args.task == "inpaint" else None).items():
                    scores[f"{key}_out"] = value
                if ops or args.task == "colorize":       # an undistorted input has nothing to compare
                    baseline = distorted if args.task != "colorize" else grey(distorted).expand_as(x)
                    for key, value in image_scores(baseline, x, hole if args.task == "inpaint" else None).items():
                        scores[f"{key}_in"] = value
            for key, value in scores.items():
                totals[key] = totals.get(key, 0.0) + value.float().sum().item()
            n += len(x)
        results[name] = {key: value / n for key, value in totals.items()}
    return results if per_item else results["mixture"]["loss"]


# ----------------------------------------------------------------------------- training

def check_flags(args):
    if args.task not in TASKS:
        common.fail(f"unknown --task {args.task!r}; choose one of {', '.join(TASKS)}")
    if args.up not in UPS:
        common.fail(f"unknown --up {args.up!r}; choose one of {', '.join(UPS)}")
    if args.skip not in SKIPS:
        common.fail(f"unknown --skip {args.skip!r}; choose one of {', '.join(SKIPS)}")
    if args.latent_dim < 0 or args.channels < 1 or args.levels < 1:
        common.fail("need --latent-dim >= 0 (0: fully convolutional), --channels >= 1 and --levels >= 1")
    if args.image_size % 2 ** args.levels:
        common.fail(f"--image-size {args.image_size} must be divisible by 2^--levels = {2 ** args.levels}")
    if args.task == "segment" and args.dataset != "shapes":
        common.fail("--task segment needs the masks of --dataset shapes")
    for spec in [args.distort] + [args.test_distort] * (args.test_distort is not None):
        items = parse_distortions(spec)
        if args.task == "inpaint" and any(all(name != "occlude" for name, _ in ops) for _, ops in items):
            common.fail("--task inpaint needs occlude in every --distort item (the hole is what it fills)")
    if any(not 0 < f <= 1 for f in args.pretrain_fractions):
        common.fail("--pretrain-fractions must lie in (0, 1]")
    if args.eval_every < 1 or args.finetune_steps < 1:
        common.fail("need --eval-every >= 1 and --finetune-steps >= 1")


def data_fields(args):
    return ("image", "label", "mask") if args.task == "segment" else ("image", "label")


def train(args):
    check_flags(args)
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    data = common.load_data(args, fields=data_fields(args))
    run = common.Run("autoencoder", args, reopen=args.eval_only, reopen_flag="--eval-only")
    model = build(args, data.channels).to(device, memory_format=torch.channels_last)   # 1.27x here (bench/)
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
    if args.eval_only:         # evaluate on the distortions it was trained with, unless --test-distort says otherwise
        args.distort = state["args"]["distort"]
        return run, model, data, parameters, device, start
    net = common.distribute(model, args, device)      # what the training step calls (see common.distribute)
    items = parse_distortions(args.distort)
    batches = common.forever(data.train)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="autoencoder")
    for step in bar:
        model.train()
        x, _, *mask = next(batches)
        g = torch.Generator().manual_seed(args.seed * TRAIN_SEED_STRIDE + step + common.rank() * RANK_SEED_STRIDE)
        choice = torch.randint(len(items), (len(x),), generator=g)
        net_input, target, _, _ = make_pair(x.to(device), mask[0] if mask else None, args.task, items, choice, g)
        with common.autocast(args.amp, device):
            out = net(net_input.contiguous(memory_format=torch.channels_last))
        loss = loss_fn(out, target, args.task)
        common.check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        run.log(step + 1, "train", loss=loss.item())
        bar.set_postfix(loss=f"{loss.item():.5f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            common.check_replicas(model, step + 1)
            if common.is_main():
                val = evaluate(model, data.val, args, items, device, per_item=False)
                run.log(step + 1, "val", loss=val)
                psnr = "" if args.task == "segment" else f" (PSNR of the mean MSE {-10 * math.log10(val):.2f} dB)"
                tqdm.write(f"step {step + 1}: validation loss {val:.5f}{psnr}")
                run.save_checkpoint(step + 1, model=model.state_dict(), optimizer=opt.state_dict(),
                                    scaler=scaler.state_dict())
    return run, model, data, parameters, device, steps


# ----------------------------------------------------------------------------- what the codes know

@torch.no_grad()
def encode(model, dataset, n, args, device):
    """Codes (n, code_dim) of the first n images of a dataset, clean (undistorted) inputs, and their labels."""
    model.eval()
    idx = torch.arange(min(n, len(dataset)))
    codes, labels = [], []
    for part in idx.split(ENCODE_BATCH):
        x, y, *_ = dataset[part]
        codes.append(model.encoder.code(clean_input(x.to(device), args.task)).float().cpu())
        labels.append(y)
    return torch.cat(codes), torch.cat(labels)


def mlp_probe(train_codes, train_labels, test_codes, test_labels, seed=0, weight_decay=1e-4):
    """Test accuracy of a one-hidden-layer MLP (PROBE_HIDDEN ReLU units) fitted to frozen, standardised codes by
    full-batch Adam for PROBE_STEPS steps: what a deeper readout can decode that a linear one cannot."""
    mean, std = train_codes.mean(0), train_codes.std(0).clamp(min=1e-6)
    x, x_test = (train_codes - mean) / std, (test_codes - mean) / std
    torch.manual_seed(seed)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = nn.Sequential(nn.Linear(x.shape[1], PROBE_HIDDEN), nn.ReLU(), nn.Linear(PROBE_HIDDEN, num_classes))
    opt = torch.optim.Adam(probe.parameters(), lr=PROBE_LR, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(PROBE_STEPS):
            loss = F.cross_entropy(probe(x), train_labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (probe(x_test).argmax(1) == test_labels).float().mean().item()


class Classifier(nn.Module):
    """The autoencoder's encoder, then a linear layer from its code to class logits."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.code_dim, num_classes)

    def forward(self, x):
        return self.head(self.encoder.code(x))


def finetune(encoder, data, labelled, args, device, seed):
    """Train Classifier(encoder) with cross-entropy on the first `labelled` training images for
    --finetune-steps Adam steps, the learning rate decaying from --lr to 0 along a cosine (so the result does not
    hang on where the last noisy step landed); returns the test accuracy."""
    torch.manual_seed(seed)
    classifier = Classifier(encoder, data.num_classes).to(device)
    opt = torch.optim.Adam(classifier.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.finetune_steps)
    dataset = data.train.dataset
    g = torch.Generator().manual_seed(seed)
    for _ in range(args.finetune_steps):
        classifier.train()
        x, y, *_ = dataset[torch.randint(labelled, (min(args.batch_size, labelled),), generator=g)]
        loss = F.cross_entropy(classifier(clean_input(x.to(device), args.task)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    classifier.eval()
    predictions, labels = [], []
    with torch.no_grad():
        for x, y, *_ in data.test:
            predictions.append(classifier(clean_input(x.to(device), args.task)).argmax(1).cpu())
            labels.append(y)
    return (torch.cat(predictions) == torch.cat(labels)).float().mean().item()


def pretraining_table(model, data, args, device):
    """{fraction: {"pretrained": test accuracy, "scratch": test accuracy}}: the encoder fine-tuned as a classifier
    from the autoencoder's weights and from a fresh initialisation (seeded), on the first fraction of the labels."""
    table = {}
    for fraction in args.pretrain_fractions:
        labelled = max(1, round(fraction * len(data.train.dataset)))
        torch.manual_seed(args.seed + 1)
        fresh = build(args, data.channels).encoder.to(device)
        row = {"labels": labelled,
               "pretrained": finetune(copy.deepcopy(model.encoder), data, labelled, args, device, args.seed),
               "scratch": finetune(fresh, data, labelled, args, device, args.seed)}
        table[f"{fraction:g}"] = row
        print(f"{fraction:g} of the labels ({labelled:,} images): test accuracy {row['pretrained']:.4f} pre-trained, "
              f"{row['scratch']:.4f} from scratch")
    return table


# ----------------------------------------------------------------------------- figures and the report

def as_image(t):
    """A one-channel image in [-1, 1] (grey, or a mask mapped to -1/1) as a 3-channel one for a grid."""
    if t.shape[1] == 3:
        return t
    return t.expand(-1, 3, -1, -1)


@torch.no_grad()
def restoration_figure(run, model, data, args, items, device, suffix):
    """Per distortion three rows: the network's input, its output, the target (clean image or true mask)."""
    model.eval()
    x, _, *mask = data.test.dataset[torch.arange(FIGURE_IMAGES) % len(data.test.dataset)]
    x = x.to(device)
    rows, labels = [], []
    for k, (name, _) in enumerate(items):
        g = torch.Generator().manual_seed(k)
        choice = torch.full((len(x),), k)
        net_input, target, distorted, _ = make_pair(x, mask[0] if mask else None, args.task, items, choice, g)
        out = model(net_input).float()
        if args.task == "segment":
            rows += [distorted, as_image((out > 0).float() * 2 - 1), as_image(target * 2 - 1)]
            labels += [f"{name}: input", "predicted mask", "true mask"]
        else:
            shown = as_image(grey(distorted)) if args.task == "colorize" else distorted
            rows += [shown, out.clamp(-1, 1), x]
            labels += [f"{name}: input", "output", "clean"]
    run.save_labelled_grid([r.cpu() for r in rows], f"restoration{suffix}.png", labels, [""] * len(x),
                           f"{args.task}: {args.latent_dim or 'fully convolutional'} bottleneck, skip {args.skip}")


def scatter_figure(run, codes, labels, classes, suffix):
    """Codes of test images in 2-D coloured by class: the code itself if 2-D, else its first two principal
    components (with the share of the variance each explains)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if codes.shape[1] <= 2:                 # a 1-d code is drawn on a line
        points, axis_labels = F.pad(codes, (0, 2 - codes.shape[1])), ("z1", "z2" if codes.shape[1] == 2 else "")
    else:
        centred = codes - codes.mean(0)
        _, s, v = torch.linalg.svd(centred, full_matrices=False)
        share = s ** 2 / (s ** 2).sum()
        points = centred @ v[:2].T
        axis_labels = tuple(f"principal component {i + 1} ({share[i]:.0%} of the variance)" for i in range(2))
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for c, name in enumerate(classes):
        chosen = labels == c
        ax.scatter(points[chosen, 0], points[chosen, 1], s=3, alpha=0.6, label=name, color=plt.cm.tab10(c % 10))
    ax.set(xlabel=axis_labels[0], ylabel=axis_labels[1], title=f"codes of {len(codes):,} test images")
    ax.legend(markerscale=4, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(run.dir / f"codes{suffix}.png", dpi=100)
    plt.close(fig)


def markdown_tables(per_item, pretraining, task):
    """The per-distortion results and the pre-training comparison as Markdown, for a report."""
    if task == "segment":
        lines = ["| distortion | IoU | pixel accuracy |", "|---|---|---|"]
        lines += [f"| {name} | {r['iou']:.4f} | {r['pixel_accuracy']:.4f} |" for name, r in per_item.items()]
    else:
        columns = [("mse_in", "MSE input", ".5f"), ("mse_out", "MSE output", ".5f"), ("psnr_in", "PSNR input", ".2f"),
                   ("psnr_out", "PSNR output", ".2f"), ("gain", "gain (dB)", "+.2f"), ("ssim_in", "SSIM input", ".3f"),
                   ("ssim_out", "SSIM output", ".3f")]
        if any("psnr_hole_out" in r for r in per_item.values()):
            columns += [("psnr_hole_in", "PSNR hole input", ".2f"), ("psnr_hole_out", "PSNR hole output", ".2f")]
        lines = ["| distortion | " + " | ".join(title for _, title, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for name, r in per_item.items():
            r = {**r, "gain": r["psnr_out"] - r["psnr_in"]} if "psnr_in" in r else r
            lines.append(f"| {name} | " + " | ".join(format(r[k], spec) if k in r else "-" for k, _, spec in columns)
                         + " |")
    if pretraining:
        lines += ["", "| labels used | images | encoder pre-trained by the autoencoder | from scratch |", "|---|---|---|---|"]
        lines += [f"| {f} | {r['labels']:,} | {r['pretrained']:.4f} | {r['scratch']:.4f} |" for f, r in pretraining.items()]
    return "\n".join(lines)


def report(run, model, data, parameters, device, steps, args):
    """Per-distortion scores on the test set, the figure, probes on the codes, the pre-training table."""
    spec = args.test_distort if args.test_distort is not None else args.distort
    slug = re.sub(r"[^\w.+-]", "_", spec)
    suffix = f"_eval-{slug}" if args.eval_only else ""          # --eval-only: one set of files per --test-distort
    metrics = {}
    if not args.eval_only:
        test_loss = evaluate(model, data.test, args, parse_distortions(args.distort), device, per_item=False)
        run.log(steps, "test", loss=test_loss)
        metrics["test_loss"] = test_loss
    items = parse_distortions(spec)
    per_item = evaluate(model, data.test, args, items, device)
    for key in ("psnr_in", "psnr_out", "ssim_in", "ssim_out", "iou", "pixel_accuracy"):
        if all(key in r for r in per_item.values()):
            metrics[f"mean_{key}"] = sum(r[key] for r in per_item.values()) / len(per_item)
    if "mean_psnr_in" in metrics:
        metrics["mean_psnr_gain"] = metrics["mean_psnr_out"] - metrics["mean_psnr_in"]
    restoration_figure(run, model, data, args, items, device, suffix)
    train_codes, train_labels = encode(model, data.train.dataset, PROBE_TRAIN, args, device)
    test_codes, test_labels = encode(model, data.test.dataset, len(data.test.dataset), args, device)
    metrics["code_dim"] = model.encoder.code_dim
    metrics["linear_probe_accuracy"] = common.linear_probe(train_codes, train_labels, test_codes, test_labels)
    metrics["mlp_probe_accuracy"] = mlp_probe(train_codes, train_labels, test_codes, test_labels, seed=args.seed)
    scatter_figure(run, test_codes[:SCATTER_POINTS], test_labels[:SCATTER_POINTS], data.classes, suffix)
    pretraining = pretraining_table(model, data, args, device) if args.pretrain_fractions else {}
    tables = markdown_tables(per_item, pretraining, args.task)
    (run.dir / f"tables{suffix}.md").write_text(tables + "\n")
    print(tables)
    return run.finish(parameters, f"evaluation-{slug}.json" if args.eval_only else "final.json", step=steps,
                      **metrics, per_distortion=per_item, pretraining=pretraining)


# ----------------------------------------------------------------------------- sweeps

SWEEP_FREE = {"name", "resume", "sweep", "device", "num_workers", "out", "eval_only"}   # may differ per run


def sweep(args):
    """Train (or reuse, or resume) one run per value of a flag under <out>/autoencoder/<name>/<flag><value>, then
    plot the test scores against the value into sweep.png, write sweep.json and print a Markdown table. A sweep
    over --skip reports the parameter counts beside the scores."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    flag, values = args.sweep
    if flag not in SWEEPABLE:
        common.fail(f"--sweep over {flag!r} is not supported; choose one of {', '.join(SWEEPABLE)}")
    if args.eval_only:
        common.fail("--sweep trains; to evaluate one of its runs again use --eval-only --name <sweep>/<flag><value>")
    if common.world_size() > 1:
        common.fail("--sweep runs in one process: start it with python, or each value with torchrun")
    if flag == "latent_dim" and args.skip != "none":
        common.fail("skips bypass the bottleneck, so a --latent-dim sweep is only meaningful with --skip none")
    kind = type(getattr(args, flag))
    try:
        values = [kind(v) for v in values]
    except ValueError:
        common.fail(f"--sweep {flag}: every value must be a {kind.__name__}, got {','.join(values)}")
    sweep_name = args.name or f"{flag}-sweep"
    root = Path(args.out) / "autoencoder" / sweep_name
    runs = {}
    for value in values:            # every run's flags are checked before any of them trains
        directory = root / f"{flag}{value}"
        run_args = argparse.Namespace(**{**vars(args), flag: value, "name": f"{sweep_name}/{flag}{value}",
                                         "sweep": None, "resume": (directory / "ckpt.pt").exists()})
        check_flags(run_args)
        common.check_sweep_run(directory, run_args, SWEEP_FREE)
        runs[str(value)] = directory, run_args
    results = {}
    for value, (directory, run_args) in runs.items():
        if not (directory / "final.json").exists():
            report(*train(run_args), run_args)
        results[value] = json.loads((directory / "final.json").read_text())
    labels = list(results)
    first = results[labels[0]]
    score = "iou" if "mean_iou" in first else "psnr"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    positions = range(len(labels))
    if score == "psnr":
        axes[0].plot(positions, [r["mean_psnr_out"] for r in results.values()], "o-", color="k", label="mean: output")
        if "mean_psnr_in" in first:        # a plain autoencoder (--distort none) has no distorted input to score
            axes[0].plot(positions, [r["mean_psnr_in"] for r in results.values()], "s--", color="gray",
                         label="mean: input")
        for i, item in enumerate(first["per_distortion"]):
            if len(first["per_distortion"]) > 1:
                axes[0].plot(positions, [r["per_distortion"][item]["psnr_out"] for r in results.values()], ".-",
                             color=f"C{i}", alpha=0.7, lw=0.8, label=item)
        axes[0].set(ylabel="test PSNR (dB)")
    else:
        axes[0].plot(positions, [r["mean_iou"] for r in results.values()], "o-", label="IoU")
        axes[0].set(ylabel="test IoU")
    axes[1].plot(positions, [r["linear_probe_accuracy"] for r in results.values()], "o-", label="linear probe")
    axes[1].plot(positions, [r["mlp_probe_accuracy"] for r in results.values()], "s-", label="MLP probe")
    axes[1].set(ylabel="test accuracy of the class from the code")
    for ax in axes:
        ax.set_xticks(list(positions), [f"{v}\n(fully conv.)" if flag == "latent_dim" and v == "0" else v
                                         for v in labels])
        ax.set(xlabel=f"--{flag.replace('_', '-')}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{args.task}: sweep over --{flag.replace('_', '-')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(root / "sweep.png", dpi=100)
    plt.close(fig)
    (root / "sweep.json").write_text(json.dumps(results, indent=2))
    columns = ["parameters"] + [c for c in ("mean_psnr_out", "mean_psnr_gain", "mean_ssim_out", "mean_iou",
                                            "linear_probe_accuracy", "mlp_probe_accuracy") if c in first]
    print(f"| --{flag.replace('_', '-')} | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
    for label, r in results.items():
        cells = [f"{sum(r['parameters'].values()):,}"] + [f"{r[c]:.4g}" for c in columns[1:]]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"sweep.png and sweep.json written to {root}")
    return results


def parse_sweep(text):
    flag, _, values = text.partition("=")
    if not values:
        raise argparse.ArgumentTypeError("expected FLAG=V1,V2,..., e.g. latent_dim=2,8,32")
    return flag.replace("-", "_"), values.split(",")


def parse_fractions(text):
    return [] if text in ("", "none") else [float(f) for f in text.split(",")]


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Convolutional autoencoders: restoration, bottleneck size, U-Net skips, "
                                            "probes and pre-training (see the module docstring)")
    common.add_shared_flags(p, batch_size=64, lr=1e-3, steps=4000, eval_every=500, image_size=32)
    g = p.add_argument_group("task")
    g.add_argument("--task", default="restore", help=f"one of {', '.join(TASKS)}")
    g.add_argument("--distort", default=None,
                   help="distortions drawn per image, comma-separated, '+' composes, strengths on the [0, 1] pixel "
                        "scale: noise:s, occlude:k (pixels), brightness:b, rotate:degrees, hflip, vflip, or none "
                        f"(default per task: {DEFAULT_DISTORT})")
    g.add_argument("--test-distort", default=None,
                   help="distortions to evaluate, each on the whole test set (default: --distort)")
    g = p.add_argument_group("model")
    g.add_argument("--latent-dim", type=int, default=128, help="dense bottleneck size d; 0: fully convolutional")
    g.add_argument("--channels", type=int, default=16, help="channels of the first stage, doubled per stage")
    g.add_argument("--levels", type=int, default=3, help="stride-2 stages (32px -> 4x4 with 3)")
    g.add_argument("--up", default="transposed", help=f"decoder upsampling: {' or '.join(UPS)}")
    g.add_argument("--skip", default="none", help=f"encoder-to-decoder skips: {', '.join(SKIPS)}")
    g = p.add_argument_group("analysis")
    g.add_argument("--pretrain-fractions", type=parse_fractions, default=[0.01, 0.1, 1.0],
                   help="fractions of the training labels for the pre-trained vs scratch classifier table; none: skip")
    g.add_argument("--finetune-steps", type=int, default=300, help="Adam steps of each classifier in that table")
    g.add_argument("--sweep", type=parse_sweep, default=None,
                   help=f"FLAG=V1,V2,...: a run per value (FLAG one of {', '.join(SWEEPABLE)}), then scores against it")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate run --name's checkpoint (default: the latest) again, on its training distortions or "
                        "--test-distort; give the run's model flags (--task, --latent-dim, --skip, ...) again")
    args = p.parse_args(argv)
    if args.distort is None:
        args.distort = DEFAULT_DISTORT.get(args.task, "none")
    return args


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    if args.sweep:
        sweep(args)
    else:
        trained = train(args)
        if common.is_main():                          # under torchrun, rank 0 alone reports
            report(*trained, args)


if __name__ == "__main__":
    main()
