"""Convolution for any number of input channels: a dynamic first layer that generates its kernels from which
channels it is given, against naive models that pad missing channels or train one model per combination.

Course task: a convolutional network that is spatial-size invariant and takes an arbitrary subset of input channels
(RGB, RG, GB, R, G, B, ...): train once, then test with channels missing or in another order.

    python dynconv.py                                   # shapes (offline): dynamic, zero, mean, per-combination
    python dynconv.py --dataset cifar10 --name cifar      # real images (downloads), or --dataset folder, list
    python dynconv.py --models resnet34 wide --dataset cifar10 --name second-task

Every run of --models trains each model in turn under runs/dynconv/<name>/<model>/ (args, curves, checkpoint,
final.json), then writes the comparison there: comparison.md (test accuracy per channel combination; parameters,
FLOPs and milliseconds per image), comparison.json and accuracy.png (model x combination). A finished model is
reused, a killed one resumes from its checkpoint.

The dynamic first layer (after Chen et al. 2020 and Ha et al. 2016)
--------------------------------------------------------------------
The input is a set S of C channels, each an image x_c (H x W) with an identity i_c (0 = R, 1 = G, 2 = B; N = 3
identities). Each channel present gets a kernel of its own, made for this image and this set of channels:

    e_c   = E[i_c]                                      E (N x d): a learned embedding of each identity
    s     = (1/C) sum_c e_c                             the set of channels present (order does not matter)
    a_c   = MLP([e_c, s, mean(x_c), std(x_c)])  in R^K  attention logits, per image and channel
    pi_c  = softmax(a_c / tau)                          attention over K basis kernels (Chen et al. 2020, Eq. 2)
    W_c   = A_{i_c} + (1/C) sum_{j not in S} A_j        static: A (O x N x k x k), one kernel per identity
            + g sum_k pi_{c,k} B_k                      generated: B_k (O x k x k), K basis kernels; g a scalar gate
    xhat_c = (x_c - mean(x_c)) / (std(x_c) + 1e-3)      the channel standardised, per image
    y     = sum_c W_c * x_c + b                         * is 2-D cross-correlation; y has O channels
            + g' (1/C) sum_c ReLU(V_{i_c} * xhat_c + v_{i_c})   the channel path: V (N x O x k x k), v (N x O), gate g'

Why each piece:
  * A sum over channels of per-channel kernels takes any C, and a sum (like the mean s) does not depend on the
    order of the channels (Deep Sets, Zaheer et al. 2017): permuting channels with their identities changes nothing.
  * The static part is mean-filling written as kernels:
        sum_{c in S} A_c x_c + sum_{j not in S} A_j mean_S(x)  =  sum_{c in S} (A_c + (1/C) sum_{j not in S} A_j) x_c
    With all channels it is an ordinary convolution with kernel A. The gate g starts at zero (as ReZero,
    Bachlechner et al. 2020), so the layer starts in the form of the mean-filled baseline's first convolution
    (tests check both identities), while the B_k start random and distinct: zero B_k would all get the same
    gradient and stay copies of each other while the attention is still flat.
  * The generated part corrects each channel's kernel for the set present (through s: R's kernel may differ when
    G and B are missing) and for the image (Chen et al.'s input-dependent attention, which mixes K kernels per
    image instead of running K convolutions). tau starts at 30 and is annealed linearly to 1 over the first 10%
    of training (their Sec. 3.2), so that all K kernels learn before the attention sharpens.
  * The channel path (--channel-path, on by default) is what makes the layer better than filling in, not just as
    good. Everything above is linear in the channels (Deep Sets with a linear phi): a shape whose contrast with
    the background is d_c in channel c reaches the network as sum_c d_c (W_c * edge), so contrasts of opposite
    sign (a red shape on a green background: +d in R, -d in G) partly cancel, and a channel in which the shape
    differs from the background by one or two grey levels gives responses a hundred times smaller than usual,
    which the batch norm after the layer, set by typical images, leaves near zero. Deep Sets' phi should be
    nonlinear: here each channel also passes through its own convolution and ReLU before the channels are
    averaged, and it is standardised first, so a faint channel counts as much as a strong one and a dark shape
    as much as a bright one (the channel's mean and standard deviation still reach the network through the
    generator and the linear part). On shapes such images made most of the errors with channels missing (83%
    with one channel, 88% with two; README). Its gate g' starts at zero like g, so the layer starts as the
    mean-filled convolution.
  * --prior none drops the static part and generates whole kernels: W_c = (N / C) sum_k pi_{c,k} B_k, with B
    initialised as a convolution's kernels and N / C keeping the activations' scale when channels are missing (as
    inverted dropout). With all channels and one-hot attention that too is an ordinary convolution (tested).
After this layer the network is ordinary: batch norm, residual 3x3 convolutions, global average pooling (any
H x W) and a linear classifier. The first layer is the only one that sees channels.

Batch norm per set of channels (--set-norm, on by default for dynamic, zero and mean alike): a network trained on
random channel subsets sees a different distribution after its first layer for each set, and one running average
over all of them normalises every set wrongly at test time (training normalises each batch by its own statistics,
and a batch has one set). So the batch norm after the first layer keeps its running statistics per set (7 x 2 x O
numbers; the scale and shift are shared). README.md gives what --no-set-norm costs.

Cost (per image, the first layer; H' x W' output positions; FLOPs count a multiply-add as 2, as torch's counter):
    plain first conv   parameters O*N*k^2 + O                      FLOPs 2*O*N*k^2*H'*W'  (missing ones filled in)
    dynamic conv       parameters O*N*k^2 + O (A and b; b alone with --prior none)
                                                                   FLOPs 2*O*C*k^2*H'*W'  (the channels present)
      + generator      parameters N*d + (2d+2)*h + h + h*K + K (MLP) + K*O*k^2 (basis) + 1 (gate)
                       FLOPs 2*C*((2d+2)*h + h*K) (MLP) + 2*C*K*O*k^2 (mixing the basis), independent of H, W
                       (plus the per-channel mean and std, 2*C*H*W additions, which the counter does not see)
      + channel path   parameters N*O*k^2 + N*O + 1 (V, v, g')
                       FLOPs 2*O*C*k^2*H'*W' (one more first-layer convolution; the standardisation, ReLU and
                       mean over channels, a few element-wise operations per pixel, are not counted by torch)
The generator is reported apart from the rest (the backbone, first convolution included) everywhere. The
per-combination baseline stores 2^N - 1 = 7 whole networks.

Baselines (the same backbone, an ordinary first convolution over N channels; per-set batch norm as above):
  * zero: missing channels are zeros (mid-grey in [-1, 1]) and present ones are scaled by N/C, as inverted dropout.
    Without the rescaling a single channel carries a third of the signal the network was trained on.
  * mean: each missing channel is the mean of the present ones (R alone becomes a grey image R, R, R).
  * per-combination: one network per combination (ordinary batch norm), each trained on its own channels of every
    batch for the same steps.
All models see the same training batches, crops and flips; dynamic, zero and mean see the same channel subsets.

Training objective: cross-entropy of the logits, averaged over the batch,
    L(theta) = E_{(x, y), S} [ -log softmax(f_theta(x_S, S))_y ]
with S the channels kept for the batch: all N with probability 1 - p (p = --channel-dropout), otherwise a subset
drawn uniformly from the 2^N - 2 non-empty proper ones, in a random order (dynamic, zero, mean); per-combination
minimises the mean of its seven networks' losses, each on its own S; resnet34 and wide see all channels. With
--every-combination the shared networks are trained as per-combination's seven are, on every S of every batch:
    L(theta) = E_{(x, y)} [ (1 / (2^N - 1)) sum_S -log softmax(f_theta(x_S, S))_y ]
(one network, so 2^N - 1 forward and backward passes per step; slimmable networks, Yu et al. 2018, train all their
widths on every batch in the same way). It separates what sharing one network costs from what seeing each
combination in only one batch of eight costs (README). AdamW with
a one-cycle schedule (15% warm-up, cosine decay of the learning rate; it also cycles beta_1 between 0.85 and 0.95);
augmentation: horizontal flips and random crops after 4-pixel reflection padding.

The second task: a network of a few layers that reaches 90% of ResNet-34's accuracy. --models resnet34 is
torchvision's architecture trained from scratch (no weights) with the first convolution made 3x3, stride 1 for
images under 64 pixels: the 7x7, stride-2 convolution and the max-pool would leave 8x8 maps of a 32-pixel image
for the first stage; with the max-pool alone it works on 16x16 (a quarter of the cost of dropping it too);
--models wide is five weight layers: two 3x3 convolutions, a large-kernel block (7x7 depthwise, then 1x1), each
followed by batch norm, ReLU and 2x2 max-pooling, global pooling and a linear layer. comparison.md gives the ratio.

Differences from Chen et al.: one dynamic layer (the first, the one that sees channels), not every layer; the
attention reads per-channel statistics and channel identities instead of a squeeze-and-excitation branch; the
attended kernels are a correction added to a static kernel (theirs are the whole kernel, as --prior none); the
channel path is not in their paper.
"""
import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import common

MODELS = ("dynamic", "zero", "mean", "per-combination", "resnet34", "wide")
CHANNEL_MODELS = MODELS[:4]          # the ones tested with channels missing; resnet34 and wide see RGB only
SUBSET_MODELS = MODELS[:3]           # one network trained on random channel subsets (per-combination: seven)
MODEL_FLAGS = ("model", "dataset", "image_size", "width", "kernels", "embed", "hidden", "kernel_size", "routing",
               "prior", "set_norm", "wide_width", "channel_path")
ROUTINGS = ("softmax", "sigmoid")
PRIORS = ("mean", "none")
TEMPERATURE_END = 1.0                # Chen et al. 2020, Sec. 3.2: tau annealed from 30 to 1 ...
ANNEAL_FRACTION = 0.1                # ... over the first 10 of their 100 epochs
WARMUP_FRACTION = 0.15               # one-cycle warm-up share of the steps
STD_FLOOR = 1e-3                     # in [-1, 1] units, an eighth of one 8-bit level: a flat channel stays flat
PAD = 4                              # random-crop padding in pixels (the usual CIFAR augmentation)


def channel_names(n):
    return list("RGB") if n == 3 else [f"c{i}" for i in range(n)]


def combination_name(order, n):
    return "".join(channel_names(n)[i] for i in order)


def combinations(n):
    """Every non-empty subset of the n channels, in canonical order, largest first: RGB, RG, RB, GB, R, G, B."""
    return [c for size in range(n, 0, -1) for c in itertools.combinations(range(n), size)]


# ----------------------------------------------------------------------------- the dynamic first layer

class KernelGenerator(nn.Module):
    """Channel identities and images -> one kernel per image and channel, W_c = sum_k softmax(a_c / tau)_k B_k."""

    def __init__(self, out_channels, kernel_size, identities, kernels, embed, hidden, routing="softmax", gated=False):
        super().__init__()
        self.routing = routing
        self.embedding = nn.Embedding(identities, embed)                                       # E
        self.attention = nn.Sequential(nn.Linear(2 * embed + 2, hidden), nn.ReLU(), nn.Linear(hidden, kernels))
        basis = torch.empty(kernels, out_channels, kernel_size, kernel_size)                  # B_1..B_K
        for b in basis:          # each basis kernel initialised as a one-input-channel conv (He uniform, as torch)
            nn.init.kaiming_uniform_(b[:, None], a=5 ** 0.5)
        self.basis = nn.Parameter(basis)
        # a gate g at zero makes the kernels start at zero while the basis kernels stay distinct, so that each
        # gets its own gradient from the first step (zero basis kernels would all get the same one)
        self.gate = nn.Parameter(torch.zeros(1)) if gated else None
        self.temperature = 1.0   # set every step by set_temperature while training; 1 (its final value) otherwise

    def forward(self, x, ids):
        """x (B, C, H, W), ids (C,) -> kernels (B, O, C, k, k): sum_k pi_{c,k} B_k (times g when gated)."""
        B, C = x.shape[:2]
        e = self.embedding(ids)                                                   # (C, d)
        s = e.mean(0, keepdim=True).expand(C, -1)                                 # (C, d): the same for every c
        flat = x.float().flatten(2)
        stats = torch.stack([flat.mean(2), flat.std(2)], -1)                      # (B, C, 2)
        features = torch.cat([torch.cat([e, s], 1).expand(B, C, -1), stats.to(e.dtype)], -1)
        logits = self.attention(features) / self.temperature                      # (B, C, K)
        pi = torch.softmax(logits, -1) if self.routing == "softmax" else torch.sigmoid(logits)
        kernels = torch.einsum("bck,koij->bocij", pi, self.basis)                # (B, O, C, k, k)
        return kernels if self.gate is None else self.gate * kernels


class DynamicConv2d(nn.Module):
    """y = sum_c W_c * x_c + b, W_c = A_{i_c} + (1/C) sum_{j not in S} A_j + (generated correction) with
    prior="mean"; W_c = (N / C) (generated kernel) with prior="none"; plus the channel path (ChannelPath) unless
    channel_path=False. One grouped convolution runs every image with its own kernels."""

    def __init__(self, out_channels, kernel_size, identities, kernels=8, embed=16, hidden=64, routing="softmax",
                 prior="mean", channel_path=True):
        super().__init__()
        self.identities, self.prior = identities, prior
        self.generator = KernelGenerator(out_channels, kernel_size, identities, kernels, embed, hidden, routing,
                                         gated=prior == "mean")
        if prior == "mean":      # A: one static kernel per identity, initialised as torch initialises a conv
            self.weight = nn.Parameter(nn.Conv2d(identities, out_channels, kernel_size).weight.detach())   # (O, N, k, k)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.padding = kernel_size // 2
        self.path = ChannelPath(out_channels, kernel_size, identities) if channel_path else None

    def kernels(self, x, ids):
        """(B, O, C, k, k): the kernel of each present channel for each image."""
        correction = self.generator(x, ids)
        C = len(ids)
        if self.prior == "none":
            return correction * (self.identities / C)
        A = self.weight
        missing = A.sum(1, keepdim=True) - A[:, ids].sum(1, keepdim=True)      # (O, 1, k, k): sum_{j not in S} A_j
        return (A[:, ids] + missing / C) + correction                           # the static part broadcasts over B

    def forward(self, x, ids):
        ids = torch.as_tensor(ids, device=x.device)
        if x.shape[1] != len(ids) or len(ids) == 0 or len(set(ids.tolist())) != len(ids):
            common.fail(f"give one distinct channel identity per input channel: {x.shape[1]} channels, ids {ids.tolist()}")
        if ids.min() < 0 or ids.max() >= self.identities:
            common.fail(f"channel identities run from 0 to {self.identities - 1}, got {ids.tolist()}")
        W = self.kernels(x, ids)
        B, C, H, Wd = x.shape
        O, k = W.shape[1], W.shape[-1]
        # groups=B: image b is convolved with its own kernels W[b] only
        y = F.conv2d(x.reshape(1, B * C, H, Wd), W.reshape(B * O, C, k, k).to(x.dtype), padding=self.padding, groups=B)
        y = y.view(B, O, *y.shape[2:]) + self.bias[:, None, None]
        return y if self.path is None else y + self.path(x, ids)


class ChannelPath(nn.Module):
    """g' (1/C) sum_c ReLU(V_{i_c} * xhat_c + v_{i_c}), xhat_c = (x_c - mean(x_c)) / (std(x_c) + STD_FLOOR) per
    image: each channel standardised and through a nonlinearity of its own before the channels are pooled."""

    def __init__(self, out_channels, kernel_size, identities):
        super().__init__()
        weight = torch.empty(identities, out_channels, kernel_size, kernel_size)             # V: one per identity
        for v in weight:
            nn.init.kaiming_uniform_(v[:, None], a=5 ** 0.5)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(identities, out_channels))                       # v
        self.gate = nn.Parameter(torch.zeros(1))                                              # g', from zero
        self.padding = kernel_size // 2

    def forward(self, x, ids):
        flat = x.float().flatten(2)
        xhat = (x.float() - flat.mean(2)[..., None, None]) / (flat.std(2)[..., None, None] + STD_FLOOR)
        # channel c through its identity's O kernels: C one-input convolutions (on a CPU 2.3x faster in bf16 than
        # one convolution with groups=C), each (B, 1, H, W) -> (B, O, H, W)
        ids = torch.as_tensor(ids).tolist()
        total = sum(F.relu(F.conv2d(xhat[:, [c]], self.weight[i][:, None], self.bias[i], padding=self.padding))
                    for c, i in enumerate(ids))
        return self.gate * total / len(ids)


# ----------------------------------------------------------------------------- the shared backbone and the models

class ResidualBlock(nn.Module):
    """3x3 conv, BN, ReLU, 3x3 conv, BN, plus the input (a 1x1 projection when the shape changes), ReLU."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class Backbone(nn.Module):
    """Everything after the first layer: BN (unless the model normalises itself), ReLU, three residual stages
    (W, 2W, 4W channels; strides 1, 2, 2), global average pooling (so any image size works), a linear classifier."""

    def __init__(self, width, num_classes, first_norm=True):
        super().__init__()
        norm = [nn.BatchNorm2d(width)] if first_norm else []
        self.body = nn.Sequential(*norm, nn.ReLU(), ResidualBlock(width, width, 1),
                                  ResidualBlock(width, 2 * width, 2), ResidualBlock(2 * width, 4 * width, 2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.body(x)


class SetBatchNorm(nn.Module):
    """Batch norm with running statistics kept per set of channels present (2^N - 1 sets) and one shared scale and
    shift. The dynamic layer's output distribution depends on the set by design (each set gets its own kernels):
    a single running average over all sets would normalise each of them wrongly at test time."""

    def __init__(self, channels, identities):
        super().__init__()
        self.identities = identities
        self.norms = nn.ModuleDict({combination_name(c, identities): nn.BatchNorm2d(channels, affine=False)
                                    for c in combinations(identities)})
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x, ids):
        normed = self.norms[combination_name(sorted(torch.as_tensor(ids).tolist()), self.identities)](x)
        return normed * self.weight[:, None, None] + self.bias[:, None, None]


class ChannelNet(nn.Module):
    """A first layer that takes any channels (the dynamic one, or a filling one), batch norm (statistics per set of
    channels with --set-norm, else one BN), the shared backbone."""

    def __init__(self, stem, args, identities, num_classes):
        super().__init__()
        self.stem = stem
        self.norm = SetBatchNorm(args.width, identities) if args.set_norm else None
        self.backbone = Backbone(args.width, num_classes, first_norm=not args.set_norm)

    def forward(self, x, ids):
        y = self.stem(x, ids)
        return self.backbone(y if self.norm is None else self.norm(y, ids))


def fill_missing(x, ids, identities, how):
    """Put the channels of x (B, C, H, W) in the slots their identities name, (B, N, H, W); missing slots are zeros
    with the present channels scaled by N / C (how="zero"), or the mean of the present channels (how="mean")."""
    ids = torch.as_tensor(ids).tolist()
    if how == "zero":
        full = x.new_zeros(x.shape[0], identities, *x.shape[2:])
        full[:, ids] = x * (identities / len(ids))
    else:
        full = x.mean(1, keepdim=True).repeat(1, identities, 1, 1)
        full[:, ids] = x
    return full


class FilledConv2d(nn.Module):
    """The naive first layer: an ordinary convolution over all N channels, the missing ones filled in."""

    def __init__(self, out_channels, kernel_size, identities, fill):
        super().__init__()
        self.identities, self.fill = identities, fill
        self.conv = nn.Conv2d(identities, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x, ids):
        return self.conv(fill_missing(x, ids, self.identities, self.fill))


class PerCombination(nn.Module):
    """2^N - 1 whole networks, one per channel combination; the channels are put in canonical order first."""

    def __init__(self, args, identities, num_classes):
        super().__init__()
        self.nets = nn.ModuleDict()
        for combo in combinations(identities):
            net = nn.Sequential(nn.Conv2d(len(combo), args.width, args.kernel_size, padding=args.kernel_size // 2),
                                Backbone(args.width, num_classes))
            self.nets[combination_name(combo, identities)] = net
        self.identities = identities

    def forward(self, x, ids):
        ids = torch.as_tensor(ids).tolist()
        order = sorted(range(len(ids)), key=lambda j: ids[j])
        return self.nets[combination_name(sorted(ids), self.identities)](x[:, order])


class RGBOnly(nn.Module):
    """The second task's networks take all N channels in canonical order."""

    def __init__(self, net, identities):
        super().__init__()
        self.net, self.identities = net, identities

    def forward(self, x, ids):
        ids = torch.as_tensor(ids).tolist()
        if sorted(ids) != list(range(self.identities)):
            common.fail("resnet34 and wide are trained on all channels only; test missing channels with "
                        f"{', '.join(CHANNEL_MODELS)}")
        return self.net(x[:, sorted(range(len(ids)), key=lambda j: ids[j])])


def resnet34(num_classes, image_size):
    """torchvision's ResNet-34, untrained; for small images a 3x3, stride-1 first convolution (then its max-pool)."""
    net = torchvision.models.resnet34(weights=None, num_classes=num_classes)
    if image_size < 64:
        net.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    return net


def wide_net(width, num_classes):
    """Five weight layers: conv3x3 (W), conv3x3 (2W), large-kernel block (7x7 depthwise, 1x1 to 4W), linear."""
    stage = lambda *layers, c: [*layers, nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(
        *stage(nn.Conv2d(3, width, 3, padding=1, bias=False), c=width),
        *stage(nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), c=2 * width),
        *stage(nn.Conv2d(2 * width, 2 * width, 7, padding=3, groups=2 * width, bias=False),
               nn.Conv2d(2 * width, 4 * width, 1, bias=False), c=4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def build(args, identities, num_classes):
    if args.model == "dynamic":
        stem = DynamicConv2d(args.width, args.kernel_size, identities, args.kernels, args.embed, args.hidden,
                             args.routing, args.prior, args.channel_path)
        return ChannelNet(stem, args, identities, num_classes)
    if args.model in ("zero", "mean"):
        return ChannelNet(FilledConv2d(args.width, args.kernel_size, identities, args.model), args, identities,
                          num_classes)
    if args.model == "per-combination":
        return PerCombination(args, identities, num_classes)
    if args.model == "resnet34":
        return RGBOnly(resnet34(num_classes, args.image_size), identities)
    return RGBOnly(wide_net(args.wide_width, num_classes), identities)


# ----------------------------------------------------------------------------- training

def augment(x, generator):
    """Horizontal flips and random crops of the 4-pixel reflection-padded images, each image its own. Under
    torchrun, x is this process's shard of the batch: the draws are made for the whole batch and the shard's taken,
    so every image is cropped as one process would crop it (and the generator stays in step across processes)."""
    B, _, H, W = x.shape
    n = B * common.world_size()
    flip = common.shard(torch.rand(n, generator=generator) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")
    dy, dx = (common.shard(d) for d in torch.randint(0, 2 * PAD + 1, (2, n, 1), generator=generator))
    rows, cols = dy + torch.arange(H), dx + torch.arange(W)                        # (B, H), (B, W)
    crops = padded[torch.arange(B)[:, None, None], :, rows[:, :, None], cols[:, None, :]]   # (B, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()


def draw_channels(n, p, generator):
    """The channels kept for one batch, in a random order: all n with probability 1 - p, otherwise one of the
    2^n - 2 non-empty proper subsets, uniformly."""
    if torch.rand(1, generator=generator).item() >= p:
        subset = tuple(range(n))
    else:
        proper = combinations(n)[1:]
        subset = proper[torch.randint(len(proper), (1,), generator=generator).item()]
    return tuple(subset[i] for i in torch.randperm(len(subset), generator=generator).tolist())


def training_loss(model, x, y, order, args):
    """Cross-entropy on the logits for channels `order` of the batch; per-combination trains each of its networks
    on its own channels of the same batch (the mean of their independent losses), so each gets every step, and
    with --every-combination a shared network is trained on every combination of the batch the same way."""
    if args.model == "per-combination" or (args.every_combination and args.model in SUBSET_MODELS):
        losses = [F.cross_entropy(model(x[:, list(combo)], combo).float(), y) for combo in combinations(x.shape[1])]
        return sum(losses) / len(losses)
    return F.cross_entropy(model(x[:, list(order)], order).float(), y)


def set_temperature(model, step, steps, start):
    if isinstance(getattr(model, "stem", None), DynamicConv2d):
        progress = min(1.0, step / max(1, ANNEAL_FRACTION * steps))
        model.stem.generator.temperature = start + (TEMPERATURE_END - start) * progress


@torch.no_grad()
def evaluate(model, loader, order, device, amp="off", ids=None):
    """(mean cross-entropy, accuracy) with only channels `order` of each image given, in that order; `ids` are the
    identities the model is told (default: the true ones; the positional test passes others)."""
    model.eval()
    ids = order if ids is None else ids
    loss = correct = total = 0.0
    for x, y in loader:
        x, y = x[:, list(order)].to(device), y.to(device)        # the dropped channels never reach the model
        with common.autocast(amp, device):
            logits = model(x, ids).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    return loss / total, correct / total


def tested_orders(args, n):
    return combinations(n) if args.model in CHANNEL_MODELS else [tuple(range(n))]


def train(args, data=None):
    """Train args.model on `data` (loaded from the flags if None) and report it; returns its final.json."""
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    run = common.Run("dynconv", args)
    data = data or common.load_data(args)
    n = data.channels
    model = build(args, n, data.num_classes).to(device)
    parameters = parameter_counts(model)
    print(f"{args.model}: {parameters}")
    steps = common.total_steps(args, data.train)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=WARMUP_FRACTION)
    scaler = common.grad_scaler(args.amp, device)
    # two streams, so that every model gets the same crops and flips whether or not it draws channel subsets
    crops, channels = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    start, elapsed = 0, 0.0
    state = run.load_checkpoint(MODEL_FLAGS, device)
    if state:
        if state["classes"] != data.classes:
            common.fail(f"the checkpoint was trained on the classes {state['classes']}, this data has {data.classes}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        crops.set_state(state["crops"].cpu())         # loaded onto --device; generator states live on the CPU
        channels.set_state(state["channels"].cpu())
        start, elapsed = state["step"], state["seconds"]
    began = time.perf_counter() - elapsed
    # a loader of its own, seeded by --seed: each model sees the same batches, alone or after others in one process
    loader = common.make_loader(data.train.dataset, args.batch_size, True, args.num_workers, args.seed, drop_last=True,
                                shard=True)
    batches = common.forever(loader, skip=start)
    net = common.distribute(model, args, device)      # what the training step calls (see common.distribute)
    draws = args.model in SUBSET_MODELS and not args.every_combination     # a channel subset per batch
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"dynconv {args.model}")
    for step in bar:
        model.train()
        set_temperature(model, step, steps, args.temperature)
        x, y = next(batches)
        order = draw_channels(n, args.channel_dropout, channels) if draws else tuple(range(n))
        x = augment(x, crops) if args.augment else x
        with common.autocast(args.amp, device):
            loss = training_loss(net, x.to(device), y.to(device), order, args)
        common.check_finite(loss, step, "lower --lr")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        run.log(step + 1, "train", loss=loss.item(), channels=len(order))
        bar.set_postfix(loss=f"{loss.item():.3f}", channels=combination_name(order, n))
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            common.check_replicas(model, step + 1)
            if common.is_main():
                scores = {combination_name(o, n): evaluate(model, data.val, o, device, args.amp)
                          for o in tested_orders(args, n)}
                run.log(step + 1, "val", loss=sum(s[0] for s in scores.values()) / len(scores),
                        accuracy=sum(s[1] for s in scores.values()) / len(scores),
                        **{f"accuracy_{k}": s[1] for k, s in scores.items()})
                tqdm.write(f"step {step + 1}: validation accuracy "
                           + ", ".join(f"{k} {s[1]:.3f}" for k, s in scores.items()))
                run.save_checkpoint(step + 1, model=model.state_dict(), optimizer=opt.state_dict(),
                                    scheduler=sched.state_dict(), scaler=scaler.state_dict(), crops=crops.get_state(),
                                    channels=channels.get_state(), classes=data.classes,
                                    seconds=time.perf_counter() - began)
    if not common.is_main():                          # under torchrun, rank 0 alone reports
        return None
    train_minutes = (time.perf_counter() - began) / 60
    return report(run, model, data, parameters, args, device, steps, train_minutes)


# ----------------------------------------------------------------------------- cost and the test report

def parameter_counts(model):
    """Trainable parameters of the kernel generator and of everything else (the backbone, first conv included);
    `stored` is what a deployment keeps (all seven networks for per-combination)."""
    generator = sum(p.numel() for m in model.modules() if isinstance(m, KernelGenerator) for p in m.parameters())
    total = common.count_parameters(model)
    return {"backbone": total - generator, "generator": generator, "stored": total}


@torch.no_grad()
def flops(model, order, image_size, device):
    """FLOPs for one image with channels `order`, counted by torch (a multiply-add is 2), split into the kernel
    generator's and the rest's. The counter sees matrix products and convolutions, not element-wise operations."""
    model.eval()
    x = torch.zeros(1, len(order), image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, order)
    counts = counter.get_flop_counts()
    total = sum(counts["Global"].values())
    generator = sum(sum(ops.values()) for module, ops in counts.items() if module.endswith(".generator"))
    return {"backbone_flops": total - generator, "generator_flops": generator}


@torch.no_grad()
def ms_per_image(model, order, args, device, batch=256, repeats=3):
    """Inference time per image in a batch of `batch`, the best of `repeats` timings after a warm-up."""
    model.eval()
    x = torch.randn(batch, len(order), args.image_size, args.image_size, device=device)
    best = float("inf")
    with common.autocast(args.amp, device):
        for r in range(repeats + 1):
            began = time.perf_counter()
            model(x, order)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:
                best = min(best, time.perf_counter() - began)
    return 1000 * best / batch


def report(run, model, data, parameters, args, device, steps, train_minutes):
    """Test accuracy for every tested channel combination (and, for the channel models, the other orders of all
    channels read positionally: BGR passed as if it were RGB, ...), the cost of each, and the curves."""
    n = data.channels
    full = tuple(range(n))
    losses, accuracy, cost = {}, {}, {}
    for order in tested_orders(args, n):
        name = combination_name(order, n)
        losses[name], accuracy[name] = evaluate(model, data.test, order, device, args.amp)
        cost[name] = {**flops(model, order, args.image_size, device),
                      "ms_per_image": ms_per_image(model, order, args, device)}
    run.log(steps, "test", loss=sum(losses.values()) / len(losses), accuracy=sum(accuracy.values()) / len(accuracy))
    orders = {}
    if args.model in CHANNEL_MODELS:
        # every model here is told the identities, and undoes any order (the tests check it); read positionally,
        # as a network without identities would, another order is another input
        permuted = [p for p in itertools.permutations(full) if p != full]
        orders["positional_accuracy"] = sum(evaluate(model, data.test, p, device, args.amp, ids=full)[1]
                                            for p in permuted) / len(permuted)
    run.plot_panels({"loss": ["loss"], "validation accuracy": [f"accuracy_{c}" for c in accuracy]}, "curves.png")
    return run.finish(parameters, model=args.model, accuracy=accuracy, test_loss=losses, **orders, cost=cost,
                      steps=steps, train_minutes=round(train_minutes, 2))


# ----------------------------------------------------------------------------- the comparison of models

SWEEP_FREE = {"name", "resume", "device", "out", "num_workers", "models", "model"}


def compare(args):
    """Train (or reuse, or resume) each of --models under <out>/dynconv/<name>/<model>/, then write the tables and
    the chart of the comparison there."""
    if args.resume and args.name is None:
        common.fail("--resume needs the --name of the comparison; without it a new one starts (every run of a "
                    "name resumes its unfinished models)")
    name = args.name or time.strftime("%Y%m%d-%H%M%S")
    root = Path(args.out) / "dynconv" / name
    runs = []
    for model in args.models:
        run_args = argparse.Namespace(**{**vars(args), "model": model, "name": f"{name}/{model}",
                                         "resume": (root / model / "ckpt.pt").exists()})
        common.check_sweep_run(root / model, run_args, SWEEP_FREE)
        runs.append((model, run_args))
    common.get_device(args.device)                     # under torchrun: join the other processes before reading data
    data = None
    for model, run_args in runs:
        if not (root / model / "final.json").exists():
            data = data or common.load_data(args)          # read once for all the models (the flags are the same)
            train(run_args, data)
    if not common.is_main():
        return None
    # the table has every model finished under this name, those of earlier runs of other --models too
    finished = sorted(root.glob("*/final.json"), key=lambda p: MODELS.index(p.parent.name) if p.parent.name in MODELS else 99)
    results = {p.parent.name: json.loads(p.read_text()) for p in finished}
    tables = accuracy_table(results) + "\n\n" + cost_table(results)
    (root / "comparison.md").write_text(tables + "\n")
    (root / "comparison.json").write_text(json.dumps(results, indent=2))
    chart(results, root / "accuracy.png")
    print(tables)
    print(f"comparison.md, comparison.json and accuracy.png written to {root}")
    return results


def missing_accuracy(final):
    """Mean test accuracy over the combinations with a channel missing, and the drop from all channels."""
    full = max(final["accuracy"], key=len)                       # the combination with every channel
    missing = [a for c, a in final["accuracy"].items() if c != full]
    mean = sum(missing) / len(missing)
    return mean, final["accuracy"][full] - mean


def accuracy_table(results):
    combos = list(dict.fromkeys(c for final in results.values() for c in final["accuracy"]))
    head = ["model", *combos]
    channel_rows = [m for m in results if m in CHANNEL_MODELS and len(results[m]["accuracy"]) > 1]
    if channel_rows:
        head += ["mean with channels missing", "drop", "permuted, read positionally"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, final in results.items():
        cells = [model, *(f"{final['accuracy'][c]:.3f}" if c in final["accuracy"] else "" for c in combos)]
        if channel_rows:
            if model in channel_rows:
                mean, drop = missing_accuracy(final)
                cells += [f"{mean:.3f}", f"{drop:.3f}", f"{final['positional_accuracy']:.3f}"]
            else:
                cells += [""] * 3
        lines.append("| " + " | ".join(cells) + " |")
    if "resnet34" in results and "wide" in results and next(iter(results["resnet34"]["accuracy"].values())) > 0:
        full = lambda m: next(iter(results[m]["accuracy"].values()))
        lines.append(f"\nwide reaches {full('wide') / full('resnet34'):.1%} of resnet34's test accuracy "
                     f"({full('wide'):.3f} against {full('resnet34'):.3f}).")
    return "\n".join(lines)


def cost_table(results):
    head = ["model", "stored parameters", "of which generator", "combination", "FLOPs backbone", "FLOPs generator",
            "ms per image", "train minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, final in results.items():
        p = final["parameters"]
        combos = list(final["cost"])
        for c in (combos[0], combos[-1]) if len(combos) > 1 else combos:       # all channels, and a single one
            cost = final["cost"][c]
            lines.append(f"| {model} | {p['stored']:,} | {p['generator']:,} | {c} | {cost['backbone_flops'] / 1e6:.2f} M | "
                         f"{cost['generator_flops'] / 1e3:.1f} k | {cost['ms_per_image']:.3f} | {final['train_minutes']:.1f} |")
    return "\n".join(lines)


def chart(results, path):
    """Grouped bars: test accuracy per channel combination (x) for each model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    combos = list(dict.fromkeys(c for final in results.values() for c in final["accuracy"]))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(combos), 3.6))
    width = 0.8 / len(results)
    for i, (model, final) in enumerate(results.items()):
        xs = [j + (i - (len(results) - 1) / 2) * width for j, c in enumerate(combos) if c in final["accuracy"]]
        ax.bar(xs, [final["accuracy"][c] for c in combos if c in final["accuracy"]], width, label=model)
    lowest = min(a for final in results.values() for a in final["accuracy"].values())
    ax.set_xticks(range(len(combos)), combos)
    ax.set(xlabel="channels given at test time", ylabel="test accuracy (axis not from 0)",
           ylim=(max(0.0, lowest - 0.05), 1))
    ax.legend(fontsize=7, ncol=len(results), loc="upper center", bbox_to_anchor=(0.5, 1.15), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

def check_flags(args):
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        common.fail(f"unknown --models {' '.join(unknown)}; choose from: {', '.join(MODELS)}")
    if len(set(args.models)) != len(args.models):
        common.fail(f"--models lists a model twice: {' '.join(args.models)}")
    at_least = {"width": 1, "kernels": 1, "embed": 1, "hidden": 1, "wide_width": 1, "kernel_size": 1, "steps": 1,
                "epochs": 1, "batch_size": 1, "eval_every": 1, "image_size": 8}
    for flag, least in at_least.items():
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            common.fail(f"--{flag.replace('_', '-')} must be at least {least}, got {getattr(args, flag)}")
    if args.kernel_size % 2 == 0:
        common.fail(f"--kernel-size must be odd (same padding keeps H x W), got {args.kernel_size}")
    if not 0 <= args.channel_dropout <= 1:
        common.fail(f"--channel-dropout is a probability, got {args.channel_dropout}")
    for flag in ("lr", "weight_decay", "num_workers"):
        if getattr(args, flag) < 0:
            common.fail(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    if args.dataset == "shapes" and (len(args.split_sizes) != 3 or min(args.split_sizes) < 1):
        common.fail(f"--split-sizes takes three positive counts (train,validation,test), got {args.split_sizes}")
    if args.temperature < TEMPERATURE_END:
        common.fail(f"--temperature is where annealing to {TEMPERATURE_END} starts: at least that, got {args.temperature}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Convolution for any subset of input channels: a dynamic first layer "
                                            "against naive models (see the module docstring)")
    # --amp auto, unlike the other scripts: the comparison's measured runs (README) trained in bf16 on this CPU
    common.add_shared_flags(p, batch_size=128, lr=2e-3, epochs=3, eval_every=500, amp="auto")
    g = p.add_argument_group("models")
    g.add_argument("--models", nargs="+", default=list(CHANNEL_MODELS),
                   help=f"trained in turn and compared: {', '.join(MODELS)}")
    g.add_argument("--width", type=int, default=16, help="channels W of the first layer; the backbone has W, 2W, 4W")
    g.add_argument("--kernel-size", type=int, default=3, help="k, the first layer's kernel size")
    g.add_argument("--kernels", type=int, default=8, help="K basis kernels of the dynamic layer (Chen et al.: 4)")
    g.add_argument("--embed", type=int, default=16, help="d, size of a channel identity's embedding")
    g.add_argument("--hidden", type=int, default=64, help="h, hidden units of the attention MLP")
    g.add_argument("--prior", default="mean", choices=PRIORS,
                   help="dynamic: start as a convolution of the mean-filled input and learn corrections (mean), "
                        "or generate whole kernels, scaled by N/C (none)")
    g.add_argument("--set-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="dynamic, zero, mean: batch-norm statistics after the first layer kept per set of channels")
    g.add_argument("--channel-path", action=argparse.BooleanOptionalAction, default=True,
                   help="dynamic: add each channel standardised and through its own ReLU, pooled over channels")
    g.add_argument("--routing", default="softmax", choices=ROUTINGS,
                   help="dynamic: attention over the K kernels by softmax (Chen et al.) or sigmoid (CondConv)")
    g.add_argument("--wide-width", type=int, default=96, help="wide: channels of its first layer (then 2x, 4x)")
    g = p.add_argument_group("method")
    g.add_argument("--channel-dropout", type=float, default=0.75,
                   help="dynamic, zero, mean: probability that a batch keeps a random proper subset of its channels")
    g.add_argument("--every-combination", action=argparse.BooleanOptionalAction, default=False,
                   help="dynamic, zero, mean: train on every channel combination of every batch, as per-combination's "
                        "networks are (2^N - 1 times the compute per step), instead of one drawn with --channel-dropout")
    g.add_argument("--temperature", type=float, default=30.0,
                   help="dynamic: attention temperature at the start, annealed to 1 (Chen et al.: 30)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW's decoupled weight decay")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random flips and 4-pixel crops")
    args = p.parse_args(argv)
    args.model = None          # set per model by compare()
    return args


def main(argv=None):
    args = get_args(argv)
    check_flags(args)
    print(vars(args))
    return compare(args)


if __name__ == "__main__":
    main()
