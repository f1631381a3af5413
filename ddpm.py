"""Denoising diffusion probabilistic model (DDPM) with DDIM sampling, from scratch.

Papers: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239 (DDPM);
Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502 (DDIM);
Nichol & Dhariwal 2021, "Improved DDPM", arXiv:2102.09672 (cosine schedule);
Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", arXiv:2406.02507 (autoguidance);
Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", arXiv:2303.09556 (`--min-snr`);
Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", arXiv:2206.00364 (`--t-dist`);
Chen, Zhang & Hinton 2023, "Analog Bits: Generating Discrete Data using Diffusion Models with Self-Conditioning",
arXiv:2208.04202 (`--self-cond`).

    python ddpm.py                                     # embedded shapes, 16px, small U-Net (see README for time)
    python ddpm.py --dataset cifar10 --steps 1000      # real images
    python ddpm.py --sample-only --name <run>          # sample from a trained run's checkpoint
    python ddpm.py --sample-only --name <run> --guidance 1   # the same without autoguidance

Forward process. Images x_0 are scaled to [-1, 1]. With beta_t the noise schedule, alpha_t = 1 - beta_t and
alpha_bar_t = prod_{s<=t} alpha_s,

    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I),   so   q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)

i.e. x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with eps ~ N(0, I), in one step for any t.
`--schedule linear`: beta from 1e-4 to 0.02 for T = 1000 (paper, Sec. 4); for another T both ends are scaled by
1000 / T, which keeps the product alpha_bar_T (hence how close x_T is to pure noise) about the same.
`--schedule cosine`: alpha_bar_t = f(t) / f(0), f(t) = cos^2(pi/2 (t/T + s) / (1 + s)), s = 0.008, betas clipped
at 0.999 (Nichol & Dhariwal, Eq. 17): less noise early, so less of the chain is spent on near-pure noise.

Objective. The model p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) is trained on the variational bound
    -log p(x_0) <= E_q[ KL(q(x_T|x_0) || p(x_T))  +  sum_{t>1} KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t))  -  log p_theta(x_0|x_1) ]
                      L_T: no parameters            L_{t-1}: match the tractable posterior            L_0: decoder
The posterior is Gaussian, q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) with
    mu~_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t,
    beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t.
Writing mu_theta through a noise prediction, mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t),
each KL is a weighted squared error, L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)) ||eps - eps_theta||^2 + C.
Dropping the weights gives the simplified objective (Eq. 14, Algorithm 1) this script trains with
`--t-dist uniform` (the default draws t differently, below):

    L_simple(theta) = E_{t ~ U{1..T}, x_0, eps ~ N(0, I)} || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2

The weights are large for small t (nearly clean images, where the clean image is easy to recover); dropping them
shifts effort to the noisier t, which the paper found gives better samples. On a small model and a short run
uniform t then spends a third of its draws where x_t is almost pure noise, though: see `--t-dist` below.
`loss()` returns the Monte Carlo estimate
averaged over the batch and over the D = C*H*W pixels (F.mse_loss, reduction="mean"), i.e. L_simple / D.
`--pred x0` regresses x_0 and `--pred v` regresses v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
(Salimans & Ho 2022) with the same unweighted MSE, as ablations.
`--min-snr gamma` weights the t's again, but unlike the bound it turns the small t down further (Min-SNR, Hang et
al. 2023, arXiv:2303.09556). With SNR_t = alpha_bar_t / (1 - alpha_bar_t) and x_0^ the clean image a prediction
implies at the given x_t, every target's error is a multiple of the x_0 error:
||eps - eps^||^2 = SNR_t ||x_0 - x_0^||^2 and ||v - v^||^2 = (SNR_t + 1) ||x_0 - x_0^||^2. Min-SNR trains on
min(SNR_t, gamma) ||x_0 - x_0^||^2, i.e. weights L_simple's eps error by min(SNR_t, gamma) / SNR_t: the same as
L_simple where SNR_t <= gamma (the noisy t), less where images are nearly clean (t < 130 of 1000 for gamma = 5 on
the linear schedule). On the default run with uniform t it did not help (README), so it stays an ablation;
validation and test losses stay L_simple / D, so they compare across weightings.

Which noise levels training sees (`--t-dist`). L_simple draws t uniformly. Measured by the noise level sigma_t =
sqrt((1 - alpha_bar_t) / alpha_bar_t) (EDM's sigma, the noise-to-signal ratio of x_t; in this paragraph only, not
the reverse step's standard deviation above) on the linear schedule, a third of those draws have sigma_t > 10 (t >=
674: x_t is noise with a trace of image, and eps_theta = x_t is nearly all there is to learn), a fifth 3 < sigma_t
<= 10, 39% 0.3 < sigma_t <= 3 and 9% sigma_t <= 0.3, where the edges of a shape are drawn. `--t-dist lognormal` (the
default) draws ln sigma ~ N(-1.2, 1.2^2), the training distribution of EDM (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", arXiv:2206.00364, Sec. 5; their values for data in [-1, 1]), and
trains the t whose alpha_bar_t is nearest 1 / (1 + sigma^2), the grid point next to the drawn sigma (draws beyond
the schedule's ends go to its first or last step). Each draw has probability 1/5 of being uniform instead, so the
nearly pure-noise steps the sampler starts from are still trained: about a fifth of each batch. The shares become 7%
(nearly all of it from the uniform draws), 6%, 46% and 42%. Drawing t from p(t) instead of uniformly has the same
expectation as weighting L_simple's terms by T p(t),
    E_{t ~ p} ||eps - eps_theta(x_t, t)||^2 = E_{t ~ U} T p(t) ||eps - eps_theta(x_t, t)||^2,
a reweighting of L_simple's terms like Min-SNR's (above), but one that moves the effort from the noise end to low
and middle noise instead of away from the clean end. Unlike a weight, which still spends network evaluations on the
t it then multiplies by almost nothing, drawing t spends them where the weight is large. Only the distribution is
EDM's: the loss stays L_simple's eps error, without EDM's preconditioning of the network's inputs and outputs. In
x_0 terms the eps error weights a noise level by 1 / sigma^2 (||eps - eps^||^2 = SNR_t ||x_0 - x_0^||^2 with SNR_t =
1 / sigma_t^2), EDM's loss by lambda(sigma) = 1 / sigma^2 + 1 / sigma_data^2 (sigma_data = 0.5): the two agree where
sigma << 0.5, and the eps error gives high noise levels less weight. The training loss in the log is this weighted
loss, and it reads higher than L_simple (0.023 over the default run's last 500 steps, against a validation loss of
0.009 at its end): a nearly clean x_t says little about the noise in it. Validation and test losses stay L_simple
(uniform t), so they compare across runs. On the default run it lowers the Frechet distance from 15.6 to 7.3 and
raises the share of samples the reference classifier is sure of from 59.3% to 74.8%; with --seed 1, from 21.8 to
15.7 and 57.9% to 70.8% (README). cddpm.py still draws t uniformly.

Autoguidance (Karras et al. 2024). An unconditional model has no class to guide towards, but it can be guided
away from its own mistakes. A weaker model D_0 of the same kind makes the same errors as the trained model D_1,
only larger. Here D_0 is the same U-Net after the first 15% of the training steps (`--guide-at`): an average of
its weights over those steps (an EMA with decay 0.99, so mostly their last hundred), frozen from then on. Each
sampling step extrapolates from the weaker prediction through the trained one,

    out_w(x_t, t) = out_0(x_t, t) + w (out_1(x_t, t) - out_0(x_t, t)),     w = `--guidance` (1: no guidance)

in the network's output space; eps, x_0 and v are affine in one another at a given x_t, so it is the same
extrapolation of the predicted clean image. In score terms each step follows the score of p_1(x_t) (p_1(x_t) /
p_0(x_t))^(w-1): the direction in which training improved the model is followed further, which pulls samples out
of the regions between shapes where the weaker model is most wrong. Unlike classifier-free guidance it needs no
condition and does not trade diversity for fidelity. It costs two network evaluations per sampling step and no
extra training; the guide rides along in the checkpoint. On the default run with uniform t, w = 2 lowers the
Frechet distance from 23.1 to 15.6 and raises the share of samples the reference classifier is sure of from 51.4%
to 59.3%; with --seed 1 the distance stays (21.5, 21.8) and the share rises from 52.8% to 57.9% (README, which also
compares other guides and weights). With the default's lognormal t: 14.1 to 7.3 and 58.2% to 74.8%; with
--seed 1 the share rises from 58.6% to 70.8% but the distance from 12.5 to 15.7 (w = 1.5: 8.8 and 65.9%).

Self-conditioning (`--self-cond`; Chen, Zhang & Hinton 2023, "Analog Bits", arXiv:2208.04202). Every sampling step
predicts a clean image x_0^ and the next step throws it away, starting again from x_{t-1} alone. A self-conditioned
network also takes the previous step's prediction as input, eps_theta(x_t, x_0^prev, t) (C more input channels,
zeros at the first step), so it can refine a guess instead of making it again. Training must show it such guesses:
on a random half of the batches the network first predicts x_0^ = x_0(eps_theta(x_t, 0, t)) without gradient
(clipped to [-1, 1], as the sampler does), and the loss is

    || eps - eps_theta(x_t, sg(x_0^), t) ||^2        (sg: stop gradient; on the other half, x_0^ = 0)

Under autoguidance both networks get the guided step's x_0 (clipped). The extra forward pass on half the steps
(0.49 against 0.37 GFLOP per training image when it runs) made a run of the default with uniform t take
19 min 48 s, about 30 s of it training the reference classifier on first use, against about 18 minutes without
it. On 16px shapes with uniform t it did not help (README, two seeds): without guidance FD 21.1 and 53.7%
confident on average against the plain network's 22.3 and 52.1% (seed 0 gained, 23.1 -> 18.0, seed 1 lost,
21.5 -> 24.1), and with autoguidance at w = 2 the distance is worse (31.3 and 25.8 against 15.6 and 21.8): feeding
the guided x_0 back compounds the extrapolation, and feeding the network's own unguided x_0 instead (a probe)
narrows the gap without closing it. So it stays a flag.

Index convention: the code's t runs 0..T-1 and stands for the paper's t = 1..T; alpha_bar_prev at t = 0 is 1.

Differences from the paper:
- A smaller U-Net by default (1.1M parameters; the paper's has 35.7M) on 16px shapes, so a CPU run takes minutes;
  `--channels 128 --channel-mult 1,2,2,2 --blocks 2 --attn-res 16 --dropout 0.1 --image-size 32 --inject shift` is
  the paper's CIFAR-10 model. Not only narrower: one residual block per level (the paper: 2) and self-attention
  only in the middle (the paper: at 16x16 too). The budget is wall-clock time, and the paper's shape at this width
  (`--blocks 2 --attn-res 8`, 1.7M parameters) takes 1.8-1.9x as long per training step here, so the default's
  6,500 steps take the time its 3,500 did: Frechet distance 23.1 against 33.1, 51.4% confident samples against
  47.3%, both without autoguidance and with uniform t (README). Capacity is not what runs out on 16px shapes;
  images seen are.
- The time embedding enters each residual block as a scale and shift of the normalised features,
  GroupNorm(h) (1 + s) + b with [s, b] = W emb (AdaGN, Dhariwal & Nichol 2021, arXiv:2105.05233), not as the
  paper's shift before the norm, GroupNorm(h + W emb) (`--inject shift`), which the norm partly undoes (it removes
  the shift's mean over each group of channels). In a 3,500-step run of the paper-shaped U-Net AdaGN lowers the
  Frechet distance from 48.4 to 33.1 (README).
- AdamW, learning rate 2e-3 with a linear warmup, then constant, then (`--lr-decay`, the last 30% of the steps by
  default) a linear decay to zero, which a short run needs more than a long one; gradients clipped at 1.0 (the
  paper: Adam at 2e-4, warmup 5000, constant after it, clip 1.0).
- Samples come from the raw weights by default (`--ema 0`), not from an exponential moving average of them (the
  paper: decay 0.9999). Averaging the weights of the last steps is what the learning-rate decay to zero already
  does, and after 3,500 steps the average (`--ema 0.999`) lags behind: with the paper-shaped U-Net and
  `--inject shift`, Frechet distance 56.7 against 48.4 for the raw weights, 43.7% confident samples against
  45.0% (README). At a constant rate the EMA helps.
- Training timesteps follow EDM's log-normal noise levels, each draw with probability 4/5 (above; `--t-dist
  uniform` draws them uniformly, as the paper does).
- Samples are autoguided by default (above; `--guidance 1` samples the trained network alone, as the paper does).
- Predicted x_0 is clipped to [-1, 1] at every sampling step (`--clip`, as the paper's code does; the text does not).
- No data augmentation (the paper flips CIFAR-10 images horizontally at random), GroupNorm with 8 groups, not 32.
- Upsampling by nearest neighbour and a convolution; attention with several heads via scaled_dot_product_attention.
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

MODEL_FLAGS = ("image_size", "channels", "channel_mult", "blocks", "attn_res", "heads", "dropout", "inject",
               "timesteps", "schedule", "pred", "self_cond")
RESUME_FLAGS = ("t_dist",)              # training flags a resumed run keeps: a change would mix two objectives
IMPLIED_FLAGS = {"self_cond": False, "t_dist": "uniform"}  # flags added later: absent from a checkpoint, they mean this
GROUPS = 8              # GroupNorm groups (the paper: 32, at 128+ channels)
RES_SCALE = 2 ** -0.5   # keeps the residual sum at unit variance when both branches have it
WARMUP = 200            # optimiser steps of linear learning-rate warmup (the paper: 5000 over 800k steps)
GRAD_CLIP = 1.0         # global gradient-norm clip (the paper's code)
LOGNORMAL_MEAN = -1.2   # --t-dist lognormal: ln sigma ~ N(mean, std^2) (EDM's P_mean, P_std for data in [-1, 1])
LOGNORMAL_STD = 1.2
UNIFORM_SHARE = 0.2     # probability that a draw is uniform anyway, so that no step of the chain goes untrained
GUIDE_EMA = 0.99        # EMA decay of the autoguidance guide: it averages about the last 100 steps before --guide-at


# ----------------------------------------------------------------------------- U-Net

def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps (Transformer positional encoding): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, GroupNorm with the time embedding as a scale and shift (AdaGN) or before it a shift,
    -> SiLU -> dropout -> conv."""

    def __init__(self, c_in, c_out, emb_dim, dropout, scale_shift):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1, self.conv1 = nn.GroupNorm(GROUPS, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out)
        self.norm2, self.conv2 = nn.GroupNorm(GROUPS, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)     # each block starts as the identity: a stable start for deep nets

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(F.silu(emb))[:, :, None, None]
        if self.scale_shift:                  # AdaGN: GroupNorm(h) (1 + s) + b
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:                                 # the paper's: a per-channel shift, then GroupNorm
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return (self.skip(x) + h) * RES_SCALE


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, c, heads):
        super().__init__()
        self.norm, self.heads = nn.GroupNorm(GROUPS, c), heads
        self.qkv, self.out = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        y = F.scaled_dot_product_attention(q, k, v)                     # (B, heads, HW, C/heads)
        return (x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))) * RES_SCALE


class UNet(nn.Module):
    """eps_theta(x_t, t) (or eps_theta(x_t, x_0^prev, t) with self_cond): a U-Net whose every residual block receives
    the time embedding.

    Levels at resolutions S, S/2, ...; `blocks` ResBlocks per level (plus attention where the resolution is in
    attn_res); the decoder mirrors it, concatenating the encoder's activations (skip connections)."""

    def __init__(self, image_size=16, in_channels=3, channels=32, channel_mult=(1, 2, 2), blocks=1, attn_res=(),
                 heads=4, dropout=0.0, inject="scale-shift", self_cond=False):
        super().__init__()
        if inject not in ("shift", "scale-shift"):
            common.fail(f"unknown --inject {inject!r}; choose shift or scale-shift")
        emb_dim, ss = 4 * channels, inject == "scale-shift"
        self.channels, self.self_cond = channels, self_cond
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels * (2 if self_cond else 1), channels, 3, padding=1)   # x_t (and x_0 estimate)
        self.down, skips, c, res = nn.ModuleList(), [channels], channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(blocks):
                self.down.append(nn.ModuleList([ResBlock(c, channels * mult, emb_dim, dropout, ss),
                                                Attention(channels * mult, heads) if res in attn_res else nn.Identity()]))
                c = channels * mult
                skips.append(c)
            if level < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))     # (B, C, H/2, W/2)
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout, ss), Attention(c, heads),
                                  ResBlock(c, c, emb_dim, dropout, ss)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), channels * mult, emb_dim, dropout, ss),
                                              Attention(channels * mult, heads) if res in attn_res else nn.Identity()]))
                c = channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.head = nn.Sequential(nn.GroupNorm(GROUPS, c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1))

    def forward(self, x, t, x0_estimate=None):
        """x0_estimate: a self-conditioned network's earlier guess of x_0, beside x_t as extra input channels (None:
        zeros, no guess yet); a network without --self-cond ignores it."""
        emb = self.time_mlp(timestep_embedding(t, self.channels))
        if self.self_cond:
            x = torch.cat([x, torch.zeros_like(x) if x0_estimate is None else x0_estimate], dim=1)
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, nn.Conv2d) else layer[1](layer[0](h, emb))
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, nn.Sequential):
                h = layer(h)
            else:
                h = layer[1](layer[0](torch.cat([h, hs.pop()], dim=1), emb))   # (B, C + C_skip, H, W) -> (B, C', H, W)
        return self.head(h)


# ----------------------------------------------------------------------------- diffusion

class Schedule(nn.Module):
    """beta_t, alpha_bar_t and alpha_bar_{t-1} for t = 0..T-1 (paper t = 1..T), as buffers so .to(device) moves them."""

    def __init__(self, timesteps=1000, kind="linear"):
        super().__init__()
        if kind == "linear":
            scale = 1000 / timesteps            # Ho et al.'s 1e-4..0.02 is for T = 1000
            betas = torch.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=torch.float64)
        elif kind == "cosine":
            s = 0.008
            f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            common.fail(f"unknown --schedule {kind!r}; choose linear or cosine")
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        self.timesteps = timesteps
        self.register_buffer("betas", betas.float())
        self.register_buffer("alpha_bar", alpha_bar.float())
        self.register_buffer("alpha_bar_prev", torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]]).float())


def expand(values, t):
    """Gather per-timestep scalars for a batch of t and shape them to broadcast over images: (B,) -> (B, 1, 1, 1)."""
    return values[t].view(-1, 1, 1, 1)


def q_sample(x0, t, schedule, eps=None):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps: a draw from q(x_t | x_0) (Eq. 4)."""
    eps = torch.randn_like(x0) if eps is None else eps
    ab = schedule.alpha_bar[t].view(-1, *[1] * (x0.dim() - 1))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def q_posterior(x0, xt, t, schedule):
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Eqs. 6-7)."""
    ab, ab_prev = expand(schedule.alpha_bar, t), expand(schedule.alpha_bar_prev, t)
    beta = 1 - ab / ab_prev
    mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * xt
    return mean, (1 - ab_prev) / (1 - ab) * beta


def sample_timesteps(n, schedule, dist, device):
    """n training timesteps: uniform over 0..T-1 (the paper), or for `lognormal` a draw of
    ln sigma ~ N(LOGNORMAL_MEAN, LOGNORMAL_STD^2) put on the grid: the t whose alpha_bar_t is nearest 1 / (1 + sigma^2)
    (draws beyond the schedule's ends go to t = 0 or T - 1), except that each draw is uniform with probability
    UNIFORM_SHARE."""
    t = torch.randint(0, schedule.timesteps, (n,), device=device)
    if dist == "uniform":
        return t
    log_sigma = LOGNORMAL_MEAN + LOGNORMAL_STD * torch.randn(n, device=device)
    alpha_bar = torch.sigmoid(-2 * log_sigma)                      # 1 / (1 + sigma^2) = sigmoid(-2 ln sigma)
    nearest = (schedule.alpha_bar[None, :] - alpha_bar[:, None]).abs().argmin(1)
    return torch.where(torch.rand(n, device=device) < UNIFORM_SHARE, t, nearest)


def loss(model, x0, schedule, pred="eps", min_snr=0.0, self_cond=False, t_dist="uniform"):
    """|| target - model(x_t, t) ||^2 averaged over batch and pixels (Algorithm 1); target eps, x_0 or v; t drawn by
    sample_timesteps (`t_dist`: uniform gives L_simple / D, lognormal weights its terms, see the module docstring).
    min_snr = gamma > 0 weights each t's error by min(SNR_t, gamma) / SNR_t for eps, min(SNR_t, gamma) for x_0 and
    min(SNR_t, gamma) / (SNR_t + 1) for v (Min-SNR, see the module docstring).
    self_cond: on a random half of the batches (one coin per batch) the network first guesses x_0 from x_t alone,
    without gradient, and is trained with that guess as its extra input; on the other half with zeros (no guess)."""
    t = sample_timesteps(len(x0), schedule, t_dist, x0.device)
    eps = torch.randn_like(x0)
    xt = q_sample(x0, t, schedule, eps)
    ab = expand(schedule.alpha_bar, t)
    target = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[pred]
    estimate = None
    if self_cond and torch.rand(()) < 0.5:
        with torch.no_grad():
            estimate = predict_x0_eps(model(xt, t).float(), xt, ab, pred, clip=True)[0]
    out = model(xt, t, estimate).float()
    if not min_snr:
        return F.mse_loss(out, target)
    snr = ab.flatten() / (1 - ab.flatten())
    weight = snr.clamp(max=min_snr) / {"eps": snr, "x0": 1, "v": snr + 1}[pred]
    return (weight * (out - target).pow(2).mean(dim=(1, 2, 3))).mean()


def predict_x0_eps(model_out, xt, ab, pred, clip):
    """Turn the network's output into (x_0, eps) predictions; clip x_0 to [-1, 1] and re-derive eps from it."""
    if pred == "eps":
        x0 = (xt - (1 - ab).sqrt() * model_out) / ab.sqrt()
    elif pred == "x0":
        x0 = model_out
    else:                                        # v = sqrt(ab) eps - sqrt(1 - ab) x0
        x0 = ab.sqrt() * xt - (1 - ab).sqrt() * model_out
    if clip:
        x0 = x0.clamp(-1, 1)
    return x0, (xt - ab.sqrt() * x0) / (1 - ab).sqrt()


class Autoguided(nn.Module):
    """out_0 + w (out_1 - out_0): the trained `model` (out_1) extrapolated away from the weaker `guide` (out_0)."""

    def __init__(self, model, guide, weight):
        super().__init__()
        self.model, self.guide, self.weight = model, guide, weight

    def forward(self, x, t, x0_estimate=None):
        out = self.model(x, t, x0_estimate)
        weak = self.guide(x, t, x0_estimate)
        return weak + self.weight * (out - weak)


def timestep_sequence(timesteps, sample_steps, spacing="uniform"):
    """The kept timesteps, from high to low. uniform and quadratic run from T-1 to 0 (DDIM paper, App. D.2);
    trailing (Lin et al. 2024) takes T-1, T-1-T/S, ... and so starts exactly at the last training step."""
    if not 1 <= sample_steps <= timesteps:
        common.fail(f"--sample-steps must be between 1 and --timesteps {timesteps}, got {sample_steps}")
    i = torch.arange(sample_steps, dtype=torch.float64)
    if spacing == "uniform":
        ts = (i * (timesteps - 1) / max(sample_steps - 1, 1)).round()
    elif spacing == "quadratic":
        ts = ((i / max(sample_steps - 1, 1)) ** 2 * (timesteps - 1)).round()
        ts = torch.maximum(ts, i)                # near t = 0 the parabola is flatter than one step per step
    elif spacing == "trailing":
        ts = (timesteps - 1 - i * timesteps / sample_steps).round().flip(0)
    else:
        common.fail(f"unknown --spacing {spacing!r}; choose uniform, quadratic or trailing")
    ts = torch.unique(ts.long())                 # sorted ascending, duplicates (very short chains) removed
    return ts.flip(0)


def reverse_step(model, schedule, x, t, s, noise, *, sampler="ddim", eta=0.0, variance="beta_tilde", pred="eps",
                 clip=True, x0_estimate=None):
    """(x_s, x_0 prediction clipped to [-1, 1]) from x_t for kept steps t > s (s = -1: the clean image), with the noise
    z given; see sample(). x0_estimate: the previous step's x_0 prediction, for a self-conditioned network (ignored
    otherwise). The returned x_0 is clipped even with clip=False, since that is the kind of guess training shows."""
    ab = schedule.alpha_bar[t]
    ab_s = schedule.alpha_bar[s] if s >= 0 else torch.ones((), device=x.device)
    t_batch = torch.full((len(x),), t, device=x.device, dtype=torch.long)
    x0, eps = predict_x0_eps(model(x, t_batch, x0_estimate).float(), x, ab, pred, clip)
    beta = 1 - ab / ab_s
    beta_tilde = (1 - ab_s) / (1 - ab) * beta
    if sampler == "ddim":
        sigma2 = eta ** 2 * beta_tilde
        mean = ab_s.sqrt() * x0 + (1 - ab_s - sigma2).clamp(min=0).sqrt() * eps
    elif sampler == "ddpm":
        sigma2 = beta_tilde if variance == "beta_tilde" else beta
        mean = ab_s.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_s) / (1 - ab) * x
    else:
        common.fail(f"unknown --sampler {sampler!r}; choose ddpm or ddim")
    return mean + sigma2.sqrt() * noise, x0.clamp(-1, 1)


@torch.no_grad()
def sample(model, schedule, n, image_size, channels=3, *, sampler="ddim", sample_steps=50, eta=0.0,
           spacing="uniform", variance="beta_tilde", pred="eps", clip=True, seed=0, keep_every=0):
    """Draw n images by running the reverse chain over the kept timesteps tau_S > ... > tau_1.

    Between consecutive kept steps t > s, with ab = alpha_bar_t, ab_s = alpha_bar_s (1 after the last step):
    - ddim (Song et al., Eq. 12):  x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z,
      sigma^2 = eta^2 (1 - ab_s) / (1 - ab) (1 - ab / ab_s); eta = 0 is deterministic, eta = 1 is DDPM's posterior.
    - ddpm (Algorithm 2 with the posterior mean of Eq. 7): x_s = mu~(x0, x_t) + sigma z with sigma^2 = beta~ or beta,
      where beta = 1 - ab / ab_s is recomputed from alpha_bar of the kept steps, so skipping steps stays consistent.
    Both feed the network the original t, and a self-conditioned network also the previous step's x0 (zeros at
    the first step). All noise comes from a generator seeded with `seed`.
    Returns the images (and, if keep_every > 0, the pairs (t, x_t) at the start, every keep_every steps and at
    the end, with t in the code's 0..T-1 convention and t = -1 for the final x_0)."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, channels, image_size, image_size, generator=g, device=device)
    ts = timestep_sequence(schedule.timesteps, sample_steps, spacing).tolist()
    trajectory, x0 = [(ts[0], x.cpu())], None
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1          # the next kept step; -1: the clean image x_0
        noise = torch.randn(x.shape, generator=g, device=device) if s >= 0 else 0   # Algorithm 2: z = 0 at t = 1
        x, x0 = reverse_step(model, schedule, x, t, s, noise, sampler=sampler, eta=eta, variance=variance, pred=pred,
                             clip=clip, x0_estimate=x0)
        if keep_every and ((i + 1) % keep_every == 0 or s < 0):
            trajectory.append((s, x.cpu()))
    x = x.clamp(-1, 1)
    return (x, trajectory) if keep_every else x


# ----------------------------------------------------------------------------- training and evaluation

def build(args, channels):
    model = UNet(args.image_size, channels, args.channels, args.channel_mult, args.blocks, args.attn_res,
                 args.heads, args.dropout, args.inject, args.self_cond)
    return model, Schedule(args.timesteps, args.schedule)


def memory_format(args, device):
    """The faster layout for this U-Net. channels_last (NHWC) speeds a float32 training step 1.0-1.2x on this CPU,
    but under bf16 autocast oneDNN runs it slower than the default NCHW (16px: 1.35x against 1.58x float32 NCHW,
    the paper-shaped U-Net 0.95x against 1.53x; 32px: 1.28x against 1.67x; bench/ddpm_speed.py), so autocast on
    a CPU keeps NCHW. GPUs prefer NHWC either way."""
    cpu_autocast = device.type == "cpu" and common.amp_enabled(args.amp, device)
    return torch.contiguous_format if cpu_autocast else torch.channels_last


@torch.no_grad()
def evaluate(model, loader, schedule, args, device, max_batches=None):
    """Mean L_simple / D over a loader, with fixed t and noise (seeded) so successive evaluations compare."""
    model.eval()
    total, n, layout = 0.0, 0, memory_format(args, device)
    with torch.random.fork_rng(devices=[]):    # the training run's random stream is left untouched
        torch.manual_seed(1)
        for b, (x, _) in enumerate(loader):
            if max_batches and b == max_batches:
                break
            x = x.to(device, memory_format=layout)
            with common.autocast(args.amp, device):
                # uniform t whatever --t-dist trained on: L_simple, comparable across runs
                total += loss(model, x, schedule, args.pred, self_cond=args.self_cond, t_dist="uniform").item() * len(x)
            n += len(x)
    return total / n


def sampler_settings(args):
    """The sampling flags, as keyword arguments of sample()."""
    return dict(sampler=args.sampler, sample_steps=args.sample_steps, eta=args.eta, spacing=args.spacing,
                variance=args.variance, pred=args.pred, clip=args.clip)


def sampling_network(ema, guide, args):
    """What the sampler calls: the sampling weights, autoguided by the guide unless --guidance is 1."""
    if args.guidance == 1:
        return ema
    if guide is None:
        common.fail("this checkpoint holds no autoguidance guide (it was made before ddpm.py had one); "
                    "sample it with --guidance 1")
    return Autoguided(ema, guide, args.guidance)


def generate(model, schedule, args, n, device):
    """Samples in batches of --sample-batch with the flags' sampler settings; returns (images, seconds per image)."""
    start, images = time.perf_counter(), []
    for i, b in enumerate(range(0, n, args.sample_batch)):
        with common.autocast(args.amp, device):
            images.append(sample(model, schedule, min(args.sample_batch, n - b), args.image_size, args.in_channels,
                                 seed=args.seed + i, **sampler_settings(args)).float().cpu())
    return torch.cat(images), (time.perf_counter() - start) / n


@torch.no_grad()
def update_average(average, model, decay, step):
    """EMA of the weights: theta_avg <- d theta_avg + (1 - d) theta; d = 0 copies. The decay ramps up as
    (1 + step) / (10 + step) so that early on the average is not dominated by the random initial weights."""
    d = min(decay, (1 + step) / (10 + step))
    for p_avg, p in zip(average.parameters(), model.parameters()):
        p_avg.lerp_(p, 1 - d)


def train(args):
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    data = common.load_data(args)
    args.in_channels = data.channels
    run = common.Run("ddpm", args, reopen=args.sample_only)
    model, schedule = build(args, data.channels)
    layout = memory_format(args, device)
    model, schedule = model.to(device, memory_format=layout), schedule.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    guide = copy.deepcopy(model).requires_grad_(False).eval()   # autoguidance: an EMA of the first guide_step steps
    parameters = common.count_parameters(model)
    print(f"U-Net: {parameters:,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0,
                            fused=device.type in ("cuda", "cpu"))
    scaler = common.grad_scaler(args.amp, device)
    steps = common.total_steps(args, data.train)
    guide_step = max(1, round(args.guide_at * steps))
    start = 0
    state = run.load_checkpoint(MODEL_FLAGS + (() if args.sample_only else RESUME_FLAGS), device, IMPLIED_FLAGS)
    if state:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        common.load_optimizer_state(opt, state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start = state["step"]
        if state.get("guide") is not None:
            guide.load_state_dict(state["guide"])
            guide_step = state["guide_step"]          # a longer resumed run keeps the guide it had
        else:                                          # made before autoguidance existed
            guide = None
        sampling_network(ema, guide, args)            # a checkpoint without a guide fails now, not after training
    if args.sample_only:
        steps = start
    net = common.distribute(model, args, device)      # what the training step calls (see common.distribute)
    batches = common.forever(data.train)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="ddpm", disable=args.sample_only)
    for step in bar:
        model.train()
        for group in opt.param_groups:
            group["lr"] = args.lr * common.lr_factor(step, steps, WARMUP, args.lr_decay)
        x, _ = next(batches)
        x = x.to(device, memory_format=layout)
        with common.autocast(args.amp, device):
            l = loss(net, x, schedule, args.pred, args.min_snr, args.self_cond, args.t_dist)
        common.check_finite(l, step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(l).backward()
        scaler.unscale_(opt)                            # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        scaler.step(opt)
        scaler.update()
        update_average(ema, model, args.ema, step)
        if guide is not None and step < guide_step:     # then frozen: a weaker model with the same errors
            update_average(guide, model, GUIDE_EMA, step)
        run.log(step + 1, "train", loss=l.item())
        bar.set_postfix(loss=f"{l.item():.4f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            common.check_replicas(model, step + 1)
            if common.is_main():
                val = evaluate(ema, data.val, schedule, args, device, max_batches=20)
                run.log(step + 1, "val", loss=val)
                tqdm.write(f"step {step + 1}: train loss ({args.t_dist} t) {l.item():.4f}, "
                           f"validation loss (uniform t, the weights sampled from) {val:.4f}")
                run.save_checkpoint(step + 1, model=model.state_dict(), ema=ema.state_dict(),
                                    guide=guide.state_dict() if guide is not None else None, guide_step=guide_step,
                                    optimizer=opt.state_dict(), scaler=scaler.state_dict())
                network = sampling_network(ema, guide, args) if step + 1 >= guide_step else ema
                run.save_grid(generate(network, schedule, args, 64, device)[0], f"samples_{step + 1:06d}.png")
    return run, sampling_network(ema, guide, args), ema, schedule, data, parameters, device, steps


def sampler_tag(args):
    """Names a --sample-only run's files after its sampler, e.g. ddim50_eta0 or ddpm1000_beta_tilde."""
    tag = f"{args.sampler}{args.sample_steps}_" + (f"eta{args.eta:g}" if args.sampler == "ddim" else args.variance)
    tag += "" if args.spacing == "uniform" else f"_{args.spacing}"
    return tag + ("" if args.clip else "_noclip") + ("" if args.guidance == 1 else f"_autoguide{args.guidance:g}")


def report(run, network, ema, schedule, data, parameters, device, steps, args):
    """Test loss of the sampling weights `ema`, the figures, and the Frechet distance of --fid-samples samples of
    `network` (ema, autoguided unless --guidance 1) against the test split. After --sample-only, files are named
    after the sampler (samples_<tag>.png, sampling_<tag>.json) and the test loss, which sampling does not change,
    is not recomputed."""
    network.eval()
    metrics, suffix = {}, f"_{sampler_tag(args)}" if args.sample_only else ""
    if not args.sample_only:
        metrics["test_loss"] = evaluate(ema, data.test, schedule, args, device)
        run.log(steps, "test", loss=metrics["test_loss"])
    images, metrics["seconds_per_image"] = generate(network, schedule, args, 64, device)
    run.save_grid(images, f"samples{suffix}.png")
    _, trajectory = sample(network, schedule, 8, args.image_size, args.in_channels, seed=args.seed,
                           keep_every=max(1, args.sample_steps // 8), **sampler_settings(args))
    run.save_grid(torch.stack([x for _, x in trajectory], 1).flatten(0, 1), f"reverse_process{suffix}.png",
                  nrow=len(trajectory))
    if args.fid_samples:
        quality = common.SampleQuality(args, data, device, metric=args.metric)
        samples, _ = generate(network, schedule, args, args.fid_samples, device)
        metrics["frechet_distance"] = quality.frechet(samples)
        probs = torch.cat([quality.classifier(b.to(device)).softmax(1).cpu() for b in samples.split(250)])
        metrics["confident_share"] = (probs.max(1).values >= 0.9).float().mean().item()
        metrics["frechet_note"] = quality.describe(args.fid_samples)
    return run.finish(parameters, f"sampling{suffix}.json" if args.sample_only else "final.json",
                      step=steps, **metrics)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="DDPM / DDIM (Ho et al. 2020; Song et al. 2021)")
    common.add_shared_flags(p, batch_size=64, lr=2e-3, steps=6500, eval_every=1000, image_size=16, amp="auto")
    common.add_lr_decay_flag(p, default=0.3)
    g = p.add_argument_group("model")
    g.add_argument("--channels", type=int, default=32, help="base channels of the U-Net (paper: 128)")
    g.add_argument("--channel-mult", type=lambda s: tuple(map(int, s.split(","))), default=(1, 2, 2),
                   help="channels per level as multiples of --channels, comma separated (paper: 1,2,2,2)")
    g.add_argument("--blocks", type=int, default=1, help="residual blocks per level (paper: 2)")
    g.add_argument("--attn-res", type=lambda s: tuple(int(r) for r in s.split(",") if r), default=(),
                   help="resolutions with self-attention besides the middle block, which always has it; comma "
                        "separated (default: none; paper: 16)")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in residual blocks (paper: 0.1 on CIFAR-10)")
    g.add_argument("--inject", default="scale-shift", choices=("shift", "scale-shift"),
                   help="how the time embedding enters each block: scale-shift (AdaGN, after the GroupNorm) or "
                        "shift (added before it; paper)")
    g = p.add_argument_group("diffusion")
    g.add_argument("--timesteps", type=int, default=1000, help="T, diffusion steps (paper: 1000)")
    g.add_argument("--schedule", default="linear", help="linear (paper) or cosine (Nichol & Dhariwal)")
    g.add_argument("--pred", default="eps", choices=("eps", "x0", "v"), help="what the network predicts (paper: eps)")
    g.add_argument("--t-dist", default="lognormal", choices=("uniform", "lognormal"),
                   help="training timesteps: uniform (paper, L_simple) or lognormal (the noise levels of EDM, "
                        "Karras et al. 2022, each draw uniform with probability 1/5; default, see the docstring)")
    g.add_argument("--min-snr", type=float, default=0.0,
                   help="gamma of Min-SNR loss weighting (Hang et al. 2023; 5 in the paper; measured only with "
                        "--t-dist uniform); 0: off")
    g.add_argument("--self-cond", action="store_true",
                   help="self-conditioning (Chen et al. 2023): the network also sees its own previous guess of x_0")
    g.add_argument("--ema", type=float, default=0.0,
                   help="EMA decay of the weights used for sampling; 0 (the default): the raw weights, which the "
                        "learning-rate decay to zero already averages; the paper: 0.9999 at a constant rate")
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"), help="DDIM (Song et al.) or ancestral DDPM")
    g.add_argument("--sample-steps", type=int, default=100, help="reverse steps (<= T; DDPM paper: all T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 the DDPM posterior")
    g.add_argument("--spacing", default="uniform", help="kept timesteps: uniform, quadratic or trailing")
    g.add_argument("--variance", default="beta_tilde", choices=("beta_tilde", "beta"),
                   help="DDPM sampler variance: posterior beta~_t or beta_t (both in the paper)")
    g.add_argument("--clip", type=int, default=1, help="1: clip predicted x_0 to [-1, 1] at every step; 0: don't")
    g.add_argument("--guidance", type=float, default=2.0,
                   help="autoguidance weight w: out_guide + w (out - out_guide); 1: no guidance, one network "
                        "evaluation per step (Karras et al. 2024)")
    g.add_argument("--guide-at", type=float, default=0.15,
                   help="the guide is an average of the weights (EMA, decay 0.99) over this fraction of the "
                        "training steps, then frozen")
    g.add_argument("--sample-batch", type=int, default=500, help="images per sampling batch")
    g.add_argument("--sample-only", action="store_true",
                   help="sample from run --name's checkpoint (default: the latest run) without training; "
                        "writes samples_<sampler>.png and sampling_<sampler>.json beside the run's own files")
    g = p.add_argument_group("evaluation")
    g.add_argument("--fid-samples", type=int, default=1000, help="samples for the Frechet distance; 0: skip")
    g.add_argument("--metric", default="classifier", help="Frechet features: classifier (offline) or inception")
    args = p.parse_args(argv)
    if not 0 < args.guide_at <= 1:
        common.fail(f"--guide-at is a fraction of the training steps in (0, 1], got {args.guide_at}")
    if args.min_snr < 0:
        common.fail(f"--min-snr is the weighting's gamma, > 0 (or 0: off), got {args.min_snr}")
    return args


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    trained = train(args)
    if common.is_main():                              # under torchrun, rank 0 alone reports
        report(*trained, args)


if __name__ == "__main__":
    main()
