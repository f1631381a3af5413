"""Class-conditional diffusion p(x | y) with classifier-free guidance, and conditions the network never saw.

Papers: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598 (guidance, label dropout);
Ho, Jain & Abbeel 2020, arXiv:2006.11239 (DDPM); Song, Meng & Ermon 2021, arXiv:2010.02502 (DDIM);
Dhariwal & Nichol 2021, arXiv:2105.05233 (per-block scale and shift, "AdaGN").

    python cddpm.py                                  # embedded shapes, 16px (see README for time and results)
    python cddpm.py --cond onehot                    # the one-hot condition through an MLP instead of a table
    python cddpm.py --sample-only --name <run> --guidance 4   # sample again from a run's checkpoint

Forward process, as in ddpm.py: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I), with the
linear schedule beta_t = 1e-4 .. 0.02 (scaled by 1000 / T for other T).

Condition. The network eps_theta(x_t, t, c) receives, besides x_t and t, a condition vector c in R^(K+1): for a
label y among K classes the one-hot e_y, and for "no label" the extra one-hot e_K (the null condition).
Any other vector is a condition the network never saw: a mix (1 - a) e_y + a e_y', a scaled 2 e_y, noise.
`--cond` chooses how c becomes a D-dimensional embedding:
    embedding:  cond(c) = E^T c, a learned table E of K+1 rows; for c = e_y exactly the lookup E[y]
                (nn.Embedding). Linear in c: mixing two one-hots mixes the two rows of E.
    onehot:     cond(c) = W_2 SiLU(W_1 c + b_1) + b_2, the one-hot vector through a small MLP. Not linear in c:
                the embedding of a mix is not the mix of the embeddings.
Both add cond(c) to the time embedding, emb = MLP(sinusoid(t)) + cond(c), which every residual block gets.
`--inject scale-shift` (the default; AdaGN, Dhariwal & Nichol) modulates the normalised features,
GroupNorm(h) (1 + s) + b with [s, b] = W emb; `--inject shift` adds a projection of emb to the features before
the norm, GroupNorm(h + W emb), the DDPM paper's block. The shift passes through the norm, which removes its
mean over each group of channels and divides it by the group's spread; the scale and shift act after the norm,
unweakened. In a 2,500-step run of the earlier, larger U-Net AdaGN lifted the conditional accuracy at w = 2
from 53.0% to 62.5%.

Objective. One network learns both p(x | y) and p(x): each training label is replaced by the null condition
with probability p_uncond (`--p-uncond`, default 0.1; the paper found 0.1-0.2 best),

    L(theta) = E_{t, (x_0, y), eps, m} || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t, c) ||^2,
    c = e_K if m = 1 else e_y,   m ~ Bernoulli(p_uncond),

the simplified DDPM objective (ddpm.py derives it from the variational bound) with the condition as input.

Guidance (Ho & Salimans, Eq. 6), the convention of this script:

    eps~(x_t, t, c) = (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, e_K)

w = 0 is the conditional model alone (no guidance), w = -1 the unconditional model, w > 0 pushes away from the
unconditional prediction. Since eps_theta = -sqrt(1 - alpha_bar_t) grad log p(x_t | c), eps~ follows the score of
p(x_t | y) p(y | x_t)^w: samples the implicit classifier p(y | x_t) finds more typical of y, trading diversity
for fidelity. (The other convention in use, eps(x) + s (eps(x, y) - eps(x)), is the same with s = 1 + w.)
Both predictions come from one network call on a batch of 2B. The samplers are ddpm.py's, with eps~ in place
of eps_theta: DDIM (`--eta`, 0 deterministic) or ancestral DDPM with the posterior variance beta~, over
`--sample-steps` uniformly spaced steps, the predicted x_0 clipped to [-1, 1] at every step.
Ancestral sampling is the default here (ddpm.py defaults to DDIM): guidance scales up the network's error,
(1 + w) err(x, y) - w err(x), and the fresh noise of each ancestral step washes out what a deterministic
DDIM chain carries to the end as grain. On a float32 2,500-step checkpoint of the larger U-Net (`--inject
shift`) at w = 2 (200 samples, 50 steps each): ancestral 45.5% conditional accuracy and Frechet distance 32.9,
DDIM 33.0% and 68.8.

Differences from the paper: a small U-Net on 16px shapes, so that a CPU run takes minutes: 1.1M parameters,
one residual block per level and self-attention only in the 4x4 middle. The budget is wall-clock time, and the
paper's shape at this width (two blocks per level, attention at 8x8 as well: `--blocks 2 --attn-res 8`, 1.7M
parameters, the default before) takes 1.8-1.9x as long per training step here: 6,000 steps of this one, with
the evaluation, ran in 16 minutes where 2,500 of the larger took 14.6, for 94.7% conditional accuracy at w = 2
against 62.5%: when training time is what runs out, a smaller network that sees more images wins. Also: 50 ancestral sampling steps (the paper: 256); no data augmentation; AdamW at
2e-3 after a warm-up, decayed linearly to zero over the last 30% of the steps (`--lr-decay`; ddpm.py's recipe,
which lowers the test loss of a short run by 5-8%); samples from the raw weights (`--ema 0`, as ddpm.py: with the
rate decayed to zero an average of the weights adds nothing: a 2,500-step run of the larger U-Net with
`--inject shift` reached 46.8% conditional accuracy at w = 2 with its EMA at 0.999 and 53.0% with its raw weights).
"""
import argparse
import copy
import math
import time

import matplotlib
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODEL_FLAGS = ("image_size", "channels", "channel_mult", "blocks", "attn_res", "heads", "dropout", "timesteps",
               "cond", "inject", "num_classes")
GROUPS = 8              # GroupNorm groups
RES_SCALE = 2 ** -0.5   # keeps the residual sum at unit variance when both branches have it
WARMUP = 200            # optimiser steps of linear learning-rate warmup
GRAD_CLIP = 1.0         # global gradient-norm clip


# ----------------------------------------------------------------------------- conditional U-Net

def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps (Transformer positional encoding): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ConditionEncoder(nn.Module):
    """cond(c): condition vectors (B, K+1) -> embeddings (B, D), by a lookup table or an MLP (see the docstring)."""

    def __init__(self, num_classes, dim, kind):
        super().__init__()
        self.kind = kind
        if kind == "embedding":
            self.table = nn.Embedding(num_classes + 1, dim)
        elif kind == "onehot":
            self.mlp = nn.Sequential(nn.Linear(num_classes + 1, dim), nn.SiLU(), nn.Linear(dim, dim))
        else:
            common.fail(f"unknown --cond {kind!r}; choose embedding or onehot")

    def forward(self, c):
        # c @ E equals the lookup E[y] for a one-hot c and extends it linearly to any other vector
        return c @ self.table.weight if self.kind == "embedding" else self.mlp(c)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, the embedding as a shift (or scale and shift), GroupNorm -> SiLU -> dropout -> conv."""

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
        else:                                 # a per-channel shift, then GroupNorm
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


class ConditionalUNet(nn.Module):
    """eps_theta(x_t, t, c): ddpm.py's U-Net with the condition embedding added to the time embedding."""

    def __init__(self, num_classes, image_size=16, in_channels=3, channels=32, channel_mult=(1, 2, 2), blocks=1,
                 attn_res=(), heads=4, dropout=0.0, cond="embedding", inject="scale-shift"):
        super().__init__()
        if inject not in ("shift", "scale-shift"):
            common.fail(f"unknown --inject {inject!r}; choose shift or scale-shift")
        emb_dim, ss = 4 * channels, inject == "scale-shift"
        self.channels, self.num_classes = channels, num_classes
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond = ConditionEncoder(num_classes, emb_dim, cond)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
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

    def forward(self, x, t, c):
        emb = self.time_mlp(timestep_embedding(t, self.channels)) + self.cond(c)    # (B, D)
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


# ----------------------------------------------------------------------------- conditions

def one_hot(y, num_classes):
    """Labels (B,) in 0..K (K: the null condition) -> condition vectors (B, K+1)."""
    return F.one_hot(y, num_classes + 1).float()


def drop_labels(y, num_classes, p_uncond, generator=None):
    """Replace each label by the null label K with probability p_uncond (the guidance training of Ho & Salimans)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, num_classes), y)


def interpolate(a, b, alphas, num_classes):
    """Condition vectors (1 - alpha) e_a + alpha e_b for each alpha: (len(alphas), K+1)."""
    ea, eb = one_hot(torch.tensor([a, b]), num_classes)
    return torch.stack([(1 - alpha) * ea + alpha * eb for alpha in alphas])


def unseen_conditions(num_classes, seed=0):
    """Named condition vectors never seen in training: their rows are what the figure and final.json show."""
    e = one_hot(torch.arange(num_classes), num_classes)
    g = torch.Generator().manual_seed(seed)
    return {
        "mix of classes 0, 1, 2": (e[0] + e[1] + e[2]) / 3,
        "2 x class 0": 2 * e[0],
        "0.5 x class 0": 0.5 * e[0],
        "zero vector": torch.zeros(num_classes + 1),
        "random N(0, 1/K)": torch.randn(num_classes + 1, generator=g) / math.sqrt(num_classes),
    }


# ----------------------------------------------------------------------------- diffusion

class Schedule(nn.Module):
    """The linear schedule: beta_t and alpha_bar_t for t = 0..T-1 (paper t = 1..T), as buffers."""

    def __init__(self, timesteps=1000):
        super().__init__()
        scale = 1000 / timesteps                # Ho et al.'s 1e-4..0.02 is for T = 1000
        betas = torch.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=torch.float64)
        self.timesteps = timesteps
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, dim=0).float())


def loss(model, x0, y, schedule, p_uncond, num_classes):
    """|| eps - eps_theta(x_t, t, c) ||^2 averaged over batch and pixels, with labels dropped to null at p_uncond.
    (num_classes is passed, not read from the model, which may be wrapped by DistributedDataParallel.)"""
    t = torch.randint(0, schedule.timesteps, (len(x0),), device=x0.device)
    eps = torch.randn_like(x0)
    ab = schedule.alpha_bar[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    c = one_hot(drop_labels(y, num_classes, p_uncond), num_classes)
    return F.mse_loss(model(xt, t, c).float(), eps)


def guided_eps(model, x, t, c, w):
    """eps~ = (1 + w) eps(x_t, t, c) - w eps(x_t, t, null): conditional and unconditional in one batch of 2B.
    w is one number, or one per image (B,)."""
    null = one_hot(torch.full((len(x),), model.num_classes, device=x.device), model.num_classes)
    eps_c, eps_null = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, null])).float().chunk(2)
    w = torch.as_tensor(w, dtype=torch.float32, device=x.device).view(-1, 1, 1, 1)
    return (1 + w) * eps_c - w * eps_null


@torch.no_grad()
def sample(model, schedule, c, image_size, channels=3, *, guidance=0.0, sampler="ddpm", sample_steps=50, eta=0.0,
           clip=True, seed=0, shared_noise=False):
    """One image per condition vector in c (N, K+1), by the reverse chain over sample_steps uniform steps.

    Between kept steps t > s (ab_s = 1 after the last), with x0 and eps from eps~ (x0 clipped, eps re-derived):
    ddim  x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z,  sigma^2 = eta^2 beta~
    ddpm  x_s = mu~(x0, x_t) + sqrt(beta~) z,  beta~ = (1 - ab_s) / (1 - ab) (1 - ab / ab_s)
    guidance is w, one number or one per image. All noise comes from a generator seeded with `seed`; with
    shared_noise every image gets the same x_T and the same z at every step, so that images differ only by
    their condition and guidance (the figures' rows and columns)."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    c = c.to(device)
    draw = lambda: torch.randn(1 if shared_noise else len(c), channels, image_size, image_size, generator=g,
                               device=device).expand(len(c), -1, -1, -1)
    x = draw()
    if not 1 <= sample_steps <= schedule.timesteps:
        common.fail(f"--sample-steps must be between 1 and --timesteps {schedule.timesteps}, got {sample_steps}")
    ts = torch.linspace(schedule.timesteps - 1, 0, sample_steps).round().long().unique().flip(0).tolist()
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1          # the next kept step; -1: the clean image x_0
        ab = schedule.alpha_bar[t]
        ab_s = schedule.alpha_bar[s] if s >= 0 else torch.ones((), device=device)
        eps = guided_eps(model, x, torch.full((len(x),), t, device=device), c, guidance)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        beta = 1 - ab / ab_s                                # the skipped steps' beta, from alpha_bar
        beta_tilde = (1 - ab_s) / (1 - ab) * beta
        if sampler == "ddim":
            sigma2 = eta ** 2 * beta_tilde
            mean = ab_s.sqrt() * x0 + (1 - ab_s - sigma2).clamp(min=0).sqrt() * eps
        elif sampler == "ddpm":
            sigma2 = beta_tilde
            mean = ab_s.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_s) / (1 - ab) * x
        else:
            common.fail(f"unknown --sampler {sampler!r}; choose ddpm or ddim")
        noise = draw() if s >= 0 else 0
        x = mean + sigma2.sqrt() * noise
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- training

def build(args, num_classes, channels):
    model = ConditionalUNet(num_classes, args.image_size, channels, args.channels, args.channel_mult, args.blocks,
                            args.attn_res, args.heads, args.dropout, args.cond, args.inject)
    return model, Schedule(args.timesteps)


def memory_format(args, device):
    """The faster layout for this U-Net. channels_last (NHWC) speeds a float32 training step 1.0-1.2x on this CPU,
    but under bf16 autocast oneDNN runs it slower than the default NCHW (16px: 1.35x against 1.58x float32 NCHW,
    the paper-shaped U-Net 0.95x against 1.53x; 32px: 1.28x against 1.67x; bench/ddpm_speed.py), so autocast on
    a CPU keeps NCHW. GPUs prefer NHWC either way."""
    cpu_autocast = device.type == "cpu" and common.amp_enabled(args.amp, device)
    return torch.contiguous_format if cpu_autocast else torch.channels_last


@torch.no_grad()
def evaluate(model, loader, schedule, args, device, max_batches=None):
    """Mean loss over a loader (labels dropped at --p-uncond as in training), with t, noise and drops seeded."""
    model.eval()
    total, n, layout = 0.0, 0, memory_format(args, device)
    with torch.random.fork_rng(devices=[]):    # the training run's random stream is left untouched
        torch.manual_seed(1)
        for b, (x, y) in enumerate(loader):
            if max_batches and b == max_batches:
                break
            x, y = x.to(device, memory_format=layout), y.to(device)
            with common.autocast(args.amp, device):
                total += loss(model, x, y, schedule, args.p_uncond, model.num_classes).item() * len(x)
            n += len(x)
    return total / n


def generate(model, schedule, args, c, device, guidance=None, shared_noise=False, seed=0):
    """Samples for condition vectors c in batches of --sample-batch, guidance --guidance unless given (a number or
    one per image), noise seeded by --seed + seed; returns (images, seconds per image)."""
    start, images = time.perf_counter(), []
    w = torch.as_tensor(args.guidance if guidance is None else guidance, dtype=torch.float32).expand(len(c))
    for i, b in enumerate(range(0, len(c), args.sample_batch)):
        with common.autocast(args.amp, device):
            images.append(sample(model, schedule, c[b:b + args.sample_batch], args.image_size, args.in_channels,
                                 guidance=w[b:b + args.sample_batch], sampler=args.sampler,
                                 sample_steps=args.sample_steps, eta=args.eta, clip=args.clip,
                                 seed=args.seed + seed + i, shared_noise=shared_noise).float().cpu())
    return torch.cat(images), (time.perf_counter() - start) / len(c)


def class_grid_conditions(num_classes, per_class=8):
    """One row per class: labels 0,0,...,0,1,1,... as condition vectors."""
    return one_hot(torch.arange(num_classes).repeat_interleave(per_class), num_classes)


def train(args):
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    data = common.load_data(args)
    args.in_channels, args.num_classes = data.channels, data.num_classes
    if data.num_classes < 2:
        common.fail(f"--dataset {args.dataset} has {data.num_classes} class; a class-conditional model needs labels")
    args.interpolate = args.interpolate or (0, min(4, data.num_classes - 1))
    if not all(0 <= i < data.num_classes for i in args.interpolate):
        common.fail(f"--interpolate {args.interpolate}: class indices must be in 0..{data.num_classes - 1}")
    run = common.Run("cddpm", args, reopen=args.sample_only)
    model, schedule = build(args, data.num_classes, data.channels)
    layout = memory_format(args, device)
    model, schedule = model.to(device, memory_format=layout), schedule.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    parameters = common.count_parameters(model)
    print(f"conditional U-Net: {parameters:,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type in ("cuda", "cpu"))
    scaler = common.grad_scaler(args.amp, device)
    steps, start = common.total_steps(args, data.train), 0
    state = run.load_checkpoint(MODEL_FLAGS, device)
    if state:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        common.load_optimizer_state(opt, state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start = state["step"]
    if args.sample_only:
        steps = start
    net = common.distribute(model, args, device)      # what the training step calls (see common.distribute)
    batches = common.forever(data.train)
    grid_conditions = class_grid_conditions(data.num_classes)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="cddpm", disable=args.sample_only)
    for step in bar:
        model.train()
        for group in opt.param_groups:
            group["lr"] = args.lr * common.lr_factor(step, steps, WARMUP, args.lr_decay)
        x, y = next(batches)
        x, y = x.to(device, memory_format=layout), y.to(device)
        with common.autocast(args.amp, device):
            l = loss(net, x, y, schedule, args.p_uncond, data.num_classes)
        common.check_finite(l, step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(l).backward()
        scaler.unscale_(opt)                            # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        scaler.step(opt)
        scaler.update()
        decay = min(args.ema, (1 + step) / (10 + step))     # EMA of the weights, warmed up as in ddpm.py
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        run.log(step + 1, "train", loss=l.item())
        bar.set_postfix(loss=f"{l.item():.4f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            common.check_replicas(model, step + 1)
            if common.is_main():
                val = evaluate(ema, data.val, schedule, args, device, max_batches=20)
                run.log(step + 1, "val", loss=val)
                tqdm.write(f"step {step + 1}: train loss {l.item():.4f}, validation loss (sampling weights) {val:.4f}")
                run.save_checkpoint(step + 1, model=model.state_dict(), ema=ema.state_dict(),
                                    optimizer=opt.state_dict(), scaler=scaler.state_dict())
                run.save_grid(generate(ema, schedule, args, grid_conditions, device)[0],
                              f"samples_{step + 1:06d}.png")
    return run, ema, schedule, data, parameters, device, steps


# ----------------------------------------------------------------------------- figures and evaluation

def figures(run, ema, schedule, data, args, device, suffix):
    """The class grid, the guidance sweep, the interpolation and the unseen conditions; returns their statistics."""
    k, stats = data.num_classes, {}
    images, stats["seconds_per_image"] = generate(ema, schedule, args, class_grid_conditions(k), device)
    run.save_grid(images, f"samples{suffix}.png", nrow=8)
    # guidance sweep: a row per w, a column per class; all the w's of a column share one noise draw
    ws = torch.tensor(args.guidance_sweep)
    columns = [generate(ema, schedule, args, one_hot(torch.full((len(ws),), y), k), device, guidance=ws,
                        shared_noise=True, seed=100 + y)[0] for y in range(k)]
    run.save_grid(torch.stack(columns, 1).flatten(0, 1), f"guidance_sweep{suffix}.png", nrow=k)
    # interpolation (1 - alpha) e_a + alpha e_b: a row per noise draw, shared along the row
    a, b = args.interpolate
    alphas = torch.linspace(0, 1, 9).tolist()
    rows = [generate(ema, schedule, args, interpolate(a, b, alphas, k), device, shared_noise=True, seed=200 + r)[0]
            for r in range(4)]
    run.save_grid(torch.cat(rows), f"interpolation{suffix}.png", nrow=len(alphas))
    # unseen condition vectors: a row each, and what the reference classifier makes of their samples
    quality = common.SampleQuality(args, data, device, metric=args.metric)
    unseen, grid = {}, []
    for name, vector in unseen_conditions(k, args.seed).items():
        images, _ = generate(ema, schedule, args, vector.expand(args.unseen_samples, -1), device)
        grid.append(images[:8])
        shares = torch.bincount(quality.predict(images), minlength=k).float() / len(images)
        unseen[name] = {data.classes[i]: round(shares[i].item(), 3) for i in shares.argsort(descending=True)[:3]}
        print(f"unseen condition {name}: classified as {unseen[name]}")
    run.save_grid(torch.cat(grid), f"unseen_conditions{suffix}.png", nrow=8)
    stats["unseen_conditions"] = unseen
    return stats, quality


def guidance_metrics(ema, schedule, data, args, device, quality):
    """Frechet distance and conditional accuracy of --fid-samples class-balanced samples for each w of the sweep."""
    labels = torch.arange(args.fid_samples) % data.num_classes
    results = []
    for w in args.guidance_sweep:
        images, _ = generate(ema, schedule, args, one_hot(labels, data.num_classes), device, guidance=w)
        results.append({"guidance": w, "frechet_distance": quality.frechet(images),
                        "conditional_accuracy": quality.conditional_accuracy(images, labels)})
        print(f"guidance w = {w:g}: Frechet distance {results[-1]['frechet_distance']:.1f}, "
              f"conditional accuracy {results[-1]['conditional_accuracy']:.1%}")
    return results


def plot_guidance(results, path, note):
    ws = [r["guidance"] for r in results]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(ws, [100 * r["conditional_accuracy"] for r in results], "o-", color="C0")
    ax.set(xlabel="guidance w  (eps~ = (1 + w) eps(x, y) - w eps(x))", ylabel="conditional accuracy (%)")
    ax.yaxis.label.set_color("C0")
    right = ax.twinx()
    right.plot(ws, [r["frechet_distance"] for r in results], "s--", color="C1")
    right.set_ylabel("Frechet distance", color="C1")
    ax.set_title(note, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sampler_tag(args):
    """Names a --sample-only run's files after its sampler and guidance, e.g. ddim50_eta0_w2."""
    tag = f"{args.sampler}{args.sample_steps}" + (f"_eta{args.eta:g}" if args.sampler == "ddim" else "")
    return f"{tag}_w{args.guidance:g}" + ("" if args.clip else "_noclip")


def report(run, ema, schedule, data, parameters, device, steps, args):
    """Test loss, figures, and the guidance sweep of Frechet distance and conditional accuracy."""
    ema.eval()
    metrics, suffix = {}, f"_{sampler_tag(args)}" if args.sample_only else ""
    if not args.sample_only:
        metrics["test_loss"] = evaluate(ema, data.test, schedule, args, device)
        run.log(steps, "test", loss=metrics["test_loss"])
    stats, quality = figures(run, ema, schedule, data, args, device, suffix)
    metrics.update(stats)
    if args.fid_samples:
        sweep = guidance_metrics(ema, schedule, data, args, device, quality)
        best = max(sweep, key=lambda r: r["conditional_accuracy"])
        metrics.update(guidance_sweep=sweep, best_guidance=best["guidance"],
                       best_conditional_accuracy=best["conditional_accuracy"],
                       frechet_note=quality.describe(args.fid_samples))
        plot_guidance(sweep, run.dir / f"guidance{suffix}.png", metrics["frechet_note"])
    return run.finish(parameters, f"sampling{suffix}.json" if args.sample_only else "final.json",
                      step=steps, **metrics)


def floats(s):
    return tuple(float(v) for v in s.split(","))


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Class-conditional DDPM with classifier-free guidance (Ho & Salimans 2022)")
    common.add_shared_flags(p, batch_size=64, lr=2e-3, steps=6000, eval_every=500, image_size=16, amp="auto")
    common.add_lr_decay_flag(p, default=0.3)
    g = p.add_argument_group("model")
    g.add_argument("--cond", default="embedding", choices=("embedding", "onehot"),
                   help="condition encoder: embedding (a learned table, linear in c) or onehot (the one-hot through an MLP)")
    g.add_argument("--inject", default="scale-shift", choices=("shift", "scale-shift"),
                   help="how the time + condition embedding enters each block: scale-shift (AdaGN, after the "
                        "GroupNorm) or shift (added before it: the DDPM paper's block)")
    g.add_argument("--channels", type=int, default=32, help="base channels of the U-Net")
    g.add_argument("--channel-mult", type=lambda s: tuple(map(int, s.split(","))), default=(1, 2, 2),
                   help="channels per level as multiples of --channels, comma separated")
    g.add_argument("--blocks", type=int, default=1, help="residual blocks per level (the paper: 2)")
    g.add_argument("--attn-res", type=lambda s: tuple(int(r) for r in s.split(",") if r), default=(),
                   help="resolutions with self-attention besides the middle block, which always has it; comma "
                        "separated (default: none; the paper: 16)")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in residual blocks")
    g = p.add_argument_group("diffusion and guidance")
    g.add_argument("--timesteps", type=int, default=1000, help="T, diffusion steps")
    g.add_argument("--p-uncond", type=float, default=0.1,
                   help="probability of training on the null label instead of y (paper: 0.1-0.2 best)")
    g.add_argument("--ema", type=float, default=0.0,
                   help="EMA decay of the weights used for sampling; 0 (the default): the raw weights, which the "
                        "learning-rate decay to zero already averages; the paper: 0.9999 at a constant rate")
    g.add_argument("--guidance", type=float, default=2.0,
                   help="w in eps~ = (1 + w) eps(x, y) - w eps(x): 0 the conditional model alone, -1 the unconditional, "
                        "> 0 stronger guidance (for the figures; the evaluation sweeps --guidance-sweep)")
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default="ddpm", choices=("ddim", "ddpm"),
                   help="ancestral DDPM (default: its fresh noise corrects guided errors) or DDIM")
    g.add_argument("--sample-steps", type=int, default=50, help="reverse steps, uniformly spaced (<= T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 the DDPM posterior")
    g.add_argument("--clip", type=int, default=1, help="1: clip predicted x_0 to [-1, 1] at every step; 0: don't")
    g.add_argument("--sample-batch", type=int, default=500, help="images per sampling batch")
    g.add_argument("--sample-only", action="store_true",
                   help="sample from run --name's checkpoint (default: the latest run) without training; "
                        "writes its figures and sampling_<sampler>_w<guidance>.json beside the run's own files")
    g = p.add_argument_group("evaluation")
    g.add_argument("--guidance-sweep", type=floats, default=(0.0, 1.0, 2.0, 4.0),
                   help="guidance scales w to evaluate and show, comma separated")
    g.add_argument("--fid-samples", type=int, default=400,
                   help="class-balanced samples per guidance scale for Frechet distance and accuracy; 0: skip")
    g.add_argument("--unseen-samples", type=int, default=30, help="samples per unseen condition vector")
    g.add_argument("--interpolate", type=lambda s: tuple(map(int, s.split(","))), default=None,
                   help="the two class indices to interpolate between, e.g. 0,4 (the default: circle and cross "
                        "on shapes; 0,1 with fewer than five classes)")
    g.add_argument("--metric", default="classifier", help="Frechet features: classifier (offline) or inception")
    args = p.parse_args(argv)
    if not 0 <= args.p_uncond < 1:
        common.fail(f"--p-uncond must be in [0, 1), got {args.p_uncond}: the model needs some labelled training")
    return args


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    trained = train(args)
    if common.is_main():                              # under torchrun, rank 0 alone reports
        report(*trained, args)


if __name__ == "__main__":
    main()
