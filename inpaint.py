"""Inpainting: the unobserved pixels sampled given the observed ones, with ddpm.py's model, against Deep Image Prior.

Papers: Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models",
arXiv:2201.09865; Song et al. 2021, "Score-Based Generative Modeling through SDEs", arXiv:2011.13456 (App. I.2,
replacement); Ulyanov, Vedaldi & Lempitsky 2018, "Deep Image Prior", arXiv:1711.10925; Meng et al. 2022,
"SDEdit", arXiv:2108.01073 (starting the reverse chain from a noised guess).

    python inpaint.py                                   # uses runs/ddpm/default (trains it first if missing)
    python inpaint.py --ckpt runs/ddpm/<run>/ckpt.pt --masks right-half --methods replace,repaint
    python inpaint.py --masks center --resample 10 --jump 10 --dip-iters 2000    # ablations

Problem. An image x in [-1, 1]^(C x H x W) is split by a binary mask m (1 = observed) into x_obs = m * x and
the rest. We want x_unobs ~ p(x_unobs | x_obs), where p(x) is the diffusion model of ddpm.py, trained on
complete images; nothing is retrained for inpainting. The test images come from the dataset the checkpoint
was trained on (its test split).

replace (Song et al.; RePaint's conditioning). The forward process noises every pixel independently, so the
observed pixels at any step can be drawn exactly: x_t^obs ~ q(x_t | x_0 = x) = N(sqrt(ab_t) x, (1 - ab_t) I).
One reverse step from t to s < t (kept steps of `--sample-steps`, with ab = alpha_bar) is

    x_s = m * (sqrt(ab_s) x + sqrt(1 - ab_s) z)  +  (1 - m) * x_s^model,   x_s^model ~ p_theta(x_s | x_t),  z ~ N(0, I)

with ddpm.py's ancestral step for p_theta (posterior variance beta~ recomputed for the skipped steps) and fresh
noise for the observed part. The final output pastes the observation exactly: m * x + (1 - m) * x_0.
The model only ever sees the observation through the noisy x_t, so the two parts can disagree: the filled-in
half is a plausible image on its own, not necessarily one that continues the observed half.

repaint (Lugmayr et al., Sec. 4.2, "resampling"). After reaching step k of the chain (every `--jump`-th kept
step), go back up `--jump` kept steps by the forward process in one draw,
    x_{t'} ~ q(x_{t'} | x_t) = N(sqrt(ab_{t'} / ab_t) x_t, (1 - ab_{t'} / ab_t) I),   t' the kept step jump steps up,
and descend again; `--resample` r passes in all (r = 1 is replace). Each pass lets the model harmonise the
unknown part with the observation it has seen so far. Cost: about r times the network calls of replace.

dip (Ulyanov et al.). A randomly initialised encoder-decoder f_theta maps a fixed noise image z to an image,
fitted to the observed pixels of one image,
    theta* = argmin_theta  sum_p m_p (f_theta(z)_p - x_p)^2 / sum_p m_p     (Adam, `--dip-iters` steps),
output m * x + (1 - m) * f_theta*(z). No training data: the prior is the network's structure, which fits smooth,
self-similar structure before noise. Run long enough it fits everything it is shown, and the hidden pixels
drift; the iteration budget is the regulariser (the curve of fitted- and hidden-pixel error, dip_curve.png,
shows it).

dip+ddpm (this script's combination). DIP alone fills with the right colours and a smooth continuation but
knows nothing of the data (no corners, no shape classes); the diffusion model knows the data but, started from
pure noise, spends most of its steps (and RePaint's resamplings) agreeing with the observation. So:
    1. DIP for `--hybrid-dip-iters` steps (50, against 300 for dip alone: only the colours and the coarse
       layout are wanted, and DIP gets those first),
    2. noise its composite m * x + (1 - m) * f(z) to the last kept step at or below `--hybrid-start` * (T - 1)
       (0.4), as SDEdit does: at that noise level the layout survives and DIP's missing detail does not,
    3. run RePaint's chain (`--hybrid-resample` passes; 1 is replace) from there.
Only the kept steps below the start are run, so the chain costs 0.4 of RePaint's with the same passes: the DIP
start replaces the noisiest part of the chain, where the model has not yet committed to anything.

Evaluation, on the first `--num-images` test images: PSNR and SSIM (common.psnr and common.ssim, on the
images' [0, 1] range; SSIM as in Wang et al. 2004 and written out there) over the whole image and over the
hidden pixels only, and seconds per image. LPIPS needs pretrained weights that cannot be downloaded offline,
so it is not reported. A sampler that draws a plausible completion is not rewarded by PSNR for differing from
the ground truth where the observation leaves the answer open (a right half can hold a triangle or a square):
PSNR favours the posterior mean, i.e. blur, and the figures show what the numbers do not.
"""
import argparse
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common
import ddpm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MASKS = ("right-half", "left-half", "top-half", "center", "box", "random-pixels", "stripes")
METHODS = ("replace", "repaint", "dip", "dip+ddpm")
DIP_INPUT_CHANNELS = 32     # channels of the fixed noise image z (Ulyanov et al.: 32)
DIP_INPUT_SCALE = 0.1       # z ~ U(0, 0.1) (Ulyanov et al.)
DIP_SKIP = 4                # channels of each skip connection (Ulyanov et al.'s inpainting nets: 4)
DIP_CHANNELS = (32, 64, 64, 128, 128)   # per level; levels: log2(size) - 1 of them, so 16px and 32px end at 2x2
DIP_CURVE_EVERY = 10        # DIP iterations between the points of dip_curve.png


# ----------------------------------------------------------------------------- masks

def make_mask(kind, n, size, fraction=0.5, stripe_width=2, seed=0):
    """(n, 1, size, size) with 1 = observed, 0 = to fill in. The halves hide half the image; `fraction` is the
    hidden share for the others, as closely as whole pixels allow: center and box hide a square of that area
    (box at a random place per image), random-pixels that share of the pixels (exactly, per image), stripes
    horizontal bands of stripe_width rows, one every round(stripe_width / fraction) rows."""
    if not 0 < fraction < 1:
        common.fail(f"--fraction must be between 0 and 1 (the share of pixels to fill in), got {fraction}")
    if kind == "stripes" and stripe_width < 1:
        common.fail(f"--stripe-width must be at least 1, got {stripe_width}")
    g = torch.Generator().manual_seed(seed)
    known = torch.ones(n, 1, size, size)
    half = size // 2
    if kind == "right-half":
        known[..., half:] = 0
    elif kind == "left-half":
        known[..., :size - half] = 0
    elif kind == "top-half":
        known[..., :size - half, :] = 0
    elif kind in ("center", "box"):
        side = max(1, round(fraction ** 0.5 * size))
        for i in range(n):
            top, left = ((size - side) // 2,) * 2 if kind == "center" else \
                torch.randint(0, size - side + 1, (2,), generator=g).tolist()
            known[i, :, top:top + side, left:left + side] = 0
    elif kind == "random-pixels":
        hidden = round(fraction * size * size)
        for i in range(n):
            known[i].view(-1)[torch.randperm(size * size, generator=g)[:hidden]] = 0
    elif kind == "stripes":
        period = round(stripe_width / fraction)
        if period <= stripe_width:
            common.fail(f"--fraction {fraction} with --stripe-width {stripe_width} would hide every row")
        known[..., torch.arange(size) % period < stripe_width, :] = 0
    else:
        common.fail(f"unknown --masks entry {kind!r}; choose from {', '.join(MASKS)}")
    return known


# ----------------------------------------------------------------------------- diffusion inpainting

def resampling_path(levels, jump, resample):
    """The positions 0..levels-1 along the kept steps that the chain visits (0: the noisiest, levels-1: x_0).
    A step to k+1 is a reverse step; a step back to k-jump is RePaint's jump up. At every jump-th position,
    counted back from the last one before x_0 (as RePaint's schedule counts from t = 0), the chain jumps back
    resample-1 times (Lugmayr et al., Sec. 4.2 and their code's get_schedule_jump)."""
    if jump < 1 or resample < 1:
        common.fail(f"--jump and --resample must be at least 1, got {jump} and {resample}")
    remaining = {k: resample - 1 for k in range(levels - 2, jump - 1, -jump)}
    path, k = [0], 0
    while k < levels - 1:
        k += 1
        path.append(k)
        if remaining.get(k, 0) > 0:
            remaining[k] -= 1
            k -= jump
            path.append(k)
    return path


@torch.no_grad()
def diffusion_inpaint(model, schedule, observed, known, *, sample_steps=50, jump=5, resample=1, start=1.0,
                      init=None, pred="eps", clip=True, seed=0, keep_path=False):
    """Fill the pixels where known == 0 by the replace chain (resample = 1) or RePaint's (resample > 1).

    observed holds the image where known == 1 (what it holds elsewhere is never read). The chain runs over the
    kept steps of ddpm.timestep_sequence at or below start * (T - 1); with start = 1 it starts from pure noise,
    below that from q(x_t | x_0 = m * observed + (1 - m) * init) at its first kept step, init a full guess.
    keep_path=True also returns every state the chain visits, as pairs (t, x_t), t = -1 for the output."""
    if start < 1 and init is None:
        common.fail("a chain that starts below T needs a guess to noise (init); pure noise belongs to t = T")
    device = observed.device
    g = torch.Generator(device=device).manual_seed(seed)
    noise = lambda: torch.randn(observed.shape, generator=g, device=device)
    observed = observed * known
    top = round(start * (schedule.timesteps - 1))
    levels = [t for t in ddpm.timestep_sequence(schedule.timesteps, sample_steps).tolist() if t <= top] + [-1]
    alpha_bar = lambda k: schedule.alpha_bar[levels[k]] if levels[k] >= 0 else torch.ones((), device=device)
    if init is None:
        x = noise()
    else:
        guess = observed + (1 - known) * init
        x = alpha_bar(0).sqrt() * guess + (1 - alpha_bar(0)).sqrt() * noise()
    path = resampling_path(len(levels), jump, resample)
    visited, x0 = [(levels[0], x.cpu())], None     # x0: the last x_0 prediction, for a self-conditioned model
    for k, k_next in zip(path, path[1:]):
        if k_next < k:          # jump up: x_t' ~ q(x_t' | x_t), one draw for the jump's steps
            ratio = alpha_bar(k_next) / alpha_bar(k)
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * noise()
        else:
            t, s = levels[k], levels[k_next]
            x_model, x0 = ddpm.reverse_step(model, schedule, x, t, s, noise() if s >= 0 else 0, sampler="ddpm",
                                            pred=pred, clip=clip, x0_estimate=x0)
            ab_s = alpha_bar(k_next)
            x_obs = ab_s.sqrt() * observed + (1 - ab_s).sqrt() * noise() if s >= 0 else observed  # fresh noise
            x = known * x_obs + (1 - known) * x_model
        if keep_path:
            visited.append((levels[k_next], x.cpu()))
    x = observed + (1 - known) * x.clamp(-1, 1)
    return (x, visited) if keep_path else x


# ----------------------------------------------------------------------------- Deep Image Prior

class PerImageConv(nn.Module):
    """n independent convolutions, one per image: (n, C_in, H, W) -> (n, C_out, H', W'). One grouped convolution
    (groups = n) runs them all, so image i only ever meets its own weights: the same as n separate networks."""

    def __init__(self, n, c_in, c_out, kernel, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(n * c_in, n * c_out, kernel, stride, padding=kernel // 2, groups=n,
                              padding_mode="reflect")

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.conv(x.reshape(1, n * c, h, w))
        return y.view(n, -1, *y.shape[-2:])


class PerImageNormAct(nn.Module):
    """Normalisation over each image's pixels, per channel, with per-image scale and shift, then LeakyReLU(0.2):
    Ulyanov et al.'s BatchNorm with a batch of one image, kept separate per image."""

    def __init__(self, n, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n, c, 1, 1)), nn.Parameter(torch.zeros(n, c, 1, 1))

    def forward(self, x):
        return F.leaky_relu(F.instance_norm(x) * self.weight + self.bias, 0.2)


class DeepImagePrior(nn.Module):
    """n independent copies of Ulyanov et al.'s encoder-decoder with skip connections, sized for small images:
    each level halves the resolution (strided conv), a 1x1 conv keeps DIP_SKIP channels for the skip, and the
    decoder upsamples bilinearly, concatenates the skip and convolves. Output in [-1, 1] by tanh."""

    def __init__(self, n, out_channels=3, image_size=16):
        super().__init__()
        channels = DIP_CHANNELS[:max(1, image_size.bit_length() - 2)]       # 16px: 3 levels, 16 -> 8 -> 4 -> 2
        unit = lambda c_in, c_out, k, stride=1: nn.Sequential(PerImageConv(n, c_in, c_out, k, stride),
                                                              PerImageNormAct(n, c_out))
        self.down, self.skip, self.up = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c_prev = DIP_INPUT_CHANNELS
        for c in channels:
            self.skip.append(unit(c_prev, DIP_SKIP, 1))
            self.down.append(nn.Sequential(unit(c_prev, c, 3, stride=2), unit(c, c, 3)))   # (n, c, H/2, W/2)
            c_prev = c
        for i, c in reversed(list(enumerate(channels))):
            c_deeper = channels[i + 1] if i + 1 < len(channels) else c
            self.up.append(nn.Sequential(unit(c_deeper + DIP_SKIP, c, 3), unit(c, c, 1)))
        self.head = PerImageConv(n, channels[0], out_channels, 1)

    def forward(self, z):
        skips, h = [], z
        for skip, down in zip(self.skip, self.down):
            skips.append(skip(h))
            h = down(h)
        for up, s in zip(self.up, reversed(skips)):
            h = F.interpolate(h, size=s.shape[-2:], mode="bilinear", align_corners=False)
            h = up(torch.cat([h, s], dim=1))                                # (n, C + DIP_SKIP, H, W) -> (n, C, H, W)
        return torch.tanh(self.head(h))


def dip_inpaint(observed, known, *, iters=300, lr=0.01, input_noise=1 / 30, seed=0, truth=None):
    """Deep Image Prior for each image: fit f_theta(z) to the observed pixels for `iters` Adam steps, return the
    composite m * x + (1 - m) * f(z). input_noise perturbs z at every step (Ulyanov et al.'s inpainting
    setting). With truth (the full images, for the curve only, never for fitting), also returns the mean
    squared error of the fitted and of the hidden pixels every DIP_CURVE_EVERY steps."""
    n, c, h, w = observed.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DeepImagePrior(n, c, min(h, w)).to(observed.device)
        z = DIP_INPUT_SCALE * torch.rand(n, DIP_INPUT_CHANNELS, h, w, device=observed.device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        observed, curve = observed * known, []
        for it in range(iters):
            out = net(z + input_noise * torch.randn_like(z))
            # per image: mean over its observed pixels; summed over images so that each image's gradient is its own
            per_image = ((out - observed) ** 2 * known).sum((1, 2, 3)) / (known.sum((1, 2, 3)) * c).clamp(min=1)
            opt.zero_grad(set_to_none=True)
            per_image.sum().backward()
            opt.step()
            if truth is not None and (it + 1) % DIP_CURVE_EVERY == 0:
                err = (out.detach() - truth) ** 2
                curve.append((it + 1, common.region_mean(err, known).mean().item(),
                              common.region_mean(err, 1 - known).mean().item()))
        with torch.no_grad():
            fill = net(z)
    result = observed + (1 - known) * fill
    return (result, curve) if truth is not None else result


# ----------------------------------------------------------------------------- methods and evaluation

def inpaint(method, model, schedule, observed, known, args, truth=None):
    """Run one method on a batch; returns the completed images (and the DIP curve for dip, given truth)."""
    chain = dict(sample_steps=args.sample_steps, jump=args.jump, pred=args.pred, clip=args.clip, seed=args.seed)
    if method == "replace":
        return diffusion_inpaint(model, schedule, observed, known, resample=1, **chain)
    if method == "repaint":
        return diffusion_inpaint(model, schedule, observed, known, resample=args.resample, **chain)
    dip = dict(lr=args.dip_lr, input_noise=args.dip_input_noise, seed=args.seed)
    if method == "dip":
        return dip_inpaint(observed, known, iters=args.dip_iters, truth=truth, **dip)
    if method == "dip+ddpm":
        guess = dip_inpaint(observed, known, iters=args.hybrid_dip_iters, **dip)
        return diffusion_inpaint(model, schedule, observed, known, resample=args.hybrid_resample,
                                 start=args.hybrid_start, init=guess, **chain)
    common.fail(f"unknown --methods entry {method!r}; choose from {', '.join(METHODS)}")


def scores(output, truth, known):
    """PSNR and SSIM (means over images) of the whole image and of the filled-in pixels."""
    hidden = 1 - known
    return {"psnr": common.psnr(output, truth).mean().item(),
            "psnr_hidden": common.psnr(output, truth, hidden).mean().item(),
            "ssim": common.ssim(output, truth).mean().item(),
            "ssim_hidden": common.ssim(output, truth, hidden).mean().item()}


def evaluate(model, schedule, images, args, run):
    """Every mask x method on `images`: scores and seconds per image; a comparison figure per mask and the DIP
    curve. Returns {mask: {method: {...}}}."""
    results, curves = {}, {}
    for kind in args.masks:
        known = make_mask(kind, len(images), images.shape[-1], args.fraction, args.stripe_width, args.seed)
        known = known.to(images.device)
        observed = images * known          # the hidden pixels never reach a method (dip's error curve aside)
        rows, results[kind] = [observed], {}
        for method in args.methods:
            start = time.perf_counter()
            output = inpaint(method, model, schedule, observed, known, args,
                             truth=images if method == "dip" else None)
            seconds = (time.perf_counter() - start) / len(images)
            if method == "dip":
                output, curves[kind] = output
            results[kind][method] = {**scores(output, images, known), "seconds_per_image": seconds}
            rows.append(output)
            print(f"{kind:>13} {method:>9}: PSNR {results[kind][method]['psnr_hidden']:5.2f} dB, "
                  f"SSIM {results[kind][method]['ssim_hidden']:.3f} on the hidden pixels, {seconds:.3f} s/image")
        comparison_figure(run.dir / f"inpaint_{kind}.png", rows + [images], ["observed", *args.methods, "truth"])
    if any(curves.values()):                   # --dip-iters under DIP_CURVE_EVERY leaves no points
        dip_curve_figure(run.dir / "dip_curve.png", curves)
    return results


# ----------------------------------------------------------------------------- figures and tables

def comparison_figure(path, rows, labels, columns=8):
    """Rows of images (observed / each method / ground truth), one column per test image, labelled."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(columns * 0.8, len(rows) * 0.9))
    for ax, images, label in zip(axes, rows, labels):
        grid = torchvision.utils.make_grid((images[:columns].float().cpu() + 1) / 2, nrow=columns, pad_value=1)
        ax.imshow(grid.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")           # keeps the long row labels whole
    plt.close(fig)


def chain_figure(path, model, schedule, image, args, frames=12):
    """RePaint's path for one image and the first mask: t against the move number (each jump a step back up),
    and `frames` states evenly spaced over those below t = T/3, where the image takes shape."""
    known = make_mask(args.masks[0], 1, image.shape[-1], args.fraction, args.stripe_width, args.seed).to(image.device)
    _, visited = diffusion_inpaint(model, schedule, image * known, known, sample_steps=args.sample_steps,
                                   jump=args.jump, resample=args.resample, pred=args.pred, clip=args.clip,
                                   seed=args.seed, keep_path=True)
    late = [i for i, (t, _) in enumerate(visited) if t < schedule.timesteps // 3]
    shown = [late[round(j * (len(late) - 1) / (frames - 1))] for j in range(frames)]
    fig = plt.figure(figsize=(frames * 0.7, 3))
    ax = fig.add_subplot(2, 1, 1)
    ax.plot([max(t, 0) for t, _ in visited], lw=1)
    ax.plot(shown, [max(visited[i][0], 0) for i in shown], "o", markersize=3)
    ax.set(xlabel="move", ylabel="t", title=f"RePaint path ({args.masks[0]}, jump {args.jump}, "
                                            f"resample {args.resample}): {len(visited) - 1} moves")
    for j, i in enumerate(shown):
        ax = fig.add_subplot(2, frames, frames + j + 1)
        t, x = visited[i]
        ax.imshow(((x[0].float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title("output" if t < 0 else f"t={t}", fontsize=6)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dip_curve_figure(path, curves):
    """DIP's squared error on the pixels it fits and on the hidden ones, against iterations, per mask."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (kind, curve) in enumerate(curves.items()):
        its, fitted, hidden = zip(*curve)
        ax.plot(its, fitted, "--", color=f"C{i}", lw=1)
        ax.plot(its, hidden, "-", color=f"C{i}", label=kind)
    ax.set(xlabel="DIP iteration", ylabel="mean squared error ([-1, 1] range)", yscale="log",
           title="DIP: observed (dashed) and hidden (solid) pixels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def quality_time_figure(path, results):
    """PSNR of the hidden pixels against seconds per image: one marker per method, one colour per mask."""
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = dict(zip(METHODS, "os^D"))
    for i, (kind, by_method) in enumerate(results.items()):
        for method, r in by_method.items():
            ax.scatter(r["seconds_per_image"], r["psnr_hidden"], color=f"C{i}", marker=markers[method],
                       label=kind if method == next(iter(by_method)) else None)
    for method, marker in markers.items():
        ax.scatter([], [], color="gray", marker=marker, label=method)
    ax.set(xscale="log", xlabel="seconds per image", ylabel="PSNR of the hidden pixels (dB)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(results):
    """Method x mask: PSNR / SSIM of the hidden pixels, and seconds per image."""
    masks = list(results)
    methods = list(results[masks[0]])
    lines = ["| method | " + " | ".join(masks) + " | s/image |", "|---" * (len(masks) + 2) + "|"]
    for m in methods:
        cells = [f"{results[k][m]['psnr_hidden']:.2f} / {results[k][m]['ssim_hidden']:.3f}" for k in masks]
        seconds = sum(results[k][m]["seconds_per_image"] for k in masks) / len(masks)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {seconds:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the diffusion model

def load_ddpm(args, device):
    """ddpm.py's sampling weights (the checkpoint's `ema` entry: the raw weights under ddpm.py's default --ema 0) and
    schedule from --ckpt, and its run arguments; with the default --ckpt missing, train ddpm.py's default model first."""
    path = Path(args.ckpt or Path(args.out) / "ddpm" / "default" / "ckpt.pt")
    if not path.exists():
        if args.ckpt:
            common.fail(f"--ckpt {path} does not exist; train a model with python ddpm.py, or leave out --ckpt")
        print(f"no DDPM at {path}: training ddpm.py's default model first (about 20 minutes on a 2-core CPU)")
        ddpm.main(["--name", "default", "--out", args.out, "--data-dir", args.data_dir, "--device", args.device])
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        state["args"] = {**ddpm.IMPLIED_FLAGS, **state["args"]}         # e.g. made before --self-cond: without it
        unrecorded = ", ".join(common.unrecorded_flags(state["args"], ddpm.MODEL_FLAGS))
        if unrecorded:
            common.fail(f"--ckpt {path} does not record {unrecorded}: it was made by an older version of ddpm.py; "
                        "move that run away (python inpaint.py then trains the current default) or pass --ckpt")
        model_args = argparse.Namespace(**state["args"])
        model, schedule = ddpm.build(model_args, model_args.in_channels)
        model.load_state_dict(state["ema"])
    except Exception as e:                    # unreadable, or another script's checkpoint
        common.fail(f"--ckpt {path} is not a checkpoint of ddpm.py ({type(e).__name__}: {e})")
    model_args.data_dir, model_args.device, args.ckpt = args.data_dir, args.device, str(path)
    return model.to(device).eval(), schedule.to(device), model_args


def test_images(model_args, n):
    """The first n images of the test split of the checkpoint's dataset."""
    data = common.load_data(model_args)
    images = []
    for x, *_ in data.test:
        images.append(x)
        if sum(len(b) for b in images) >= n:
            break
    return torch.cat(images)[:n]


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Inpainting with a DDPM (replace, RePaint) against Deep Image Prior")
    g = p.add_argument_group("data and model")
    g.add_argument("--ckpt", default=None,
                   help="a ddpm.py checkpoint (default: <out>/ddpm/default/ckpt.pt, trained first if missing); "
                        "the test images come from its dataset")
    g.add_argument("--data-dir", default="data", help="where real datasets are (as for ddpm.py)")
    g.add_argument("--num-images", type=int, default=64, help="test images to inpaint")
    g = p.add_argument_group("masks")
    g.add_argument("--masks", type=lambda s: s.split(","), default=list(MASKS),
                   help=f"comma separated, from {', '.join(MASKS)} (default: all)")
    g.add_argument("--fraction", type=float, default=0.5,
                   help="share of pixels to fill in for center, box, random-pixels, stripes (halves: 0.5)")
    g.add_argument("--stripe-width", type=int, default=2, help="rows per hidden stripe")
    g = p.add_argument_group("methods")
    g.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                   help=f"comma separated, from {', '.join(METHODS)} (default: all)")
    g.add_argument("--sample-steps", type=int, default=50, help="kept steps of the reverse chain (RePaint: 250)")
    g.add_argument("--jump", type=int, default=5, help="RePaint's jump length j, in kept steps (RePaint: 10)")
    g.add_argument("--resample", type=int, default=3, help="RePaint's passes r per jump; 1 = replace (RePaint: 10)")
    g.add_argument("--clip", type=int, default=1, help="1: clip predicted x_0 to [-1, 1] at every step; 0: don't")
    g.add_argument("--dip-iters", type=int, default=300, help="Deep Image Prior's Adam steps (its early stopping)")
    g.add_argument("--dip-lr", type=float, default=0.01, help="Deep Image Prior's learning rate (Ulyanov et al.)")
    g.add_argument("--dip-input-noise", type=float, default=1 / 30,
                   help="std of the noise added to z at every DIP step (Ulyanov et al. for inpainting: 1/30)")
    g.add_argument("--hybrid-dip-iters", type=int, default=50, help="dip+ddpm: DIP steps before the chain")
    g.add_argument("--hybrid-start", type=float, default=0.4,
                   help="dip+ddpm: the chain starts at this fraction of T from the noised DIP fill")
    g.add_argument("--hybrid-resample", type=int, default=3, help="dip+ddpm: RePaint passes (1: replace)")
    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0, help="seeds masks, noise and DIP initialisation")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--out", default="runs", help="runs root: this run writes to <out>/inpaint/<name>/")
    g.add_argument("--name", default=None, help="run name (default: a timestamp)")
    args = p.parse_args(argv)
    for kind in args.masks:
        if kind not in MASKS:
            p.error(f"unknown --masks entry {kind!r}; choose from {', '.join(MASKS)}")
    for method in args.methods:
        if method not in METHODS:
            p.error(f"unknown --methods entry {method!r}; choose from {', '.join(METHODS)}")
    if not 0 < args.hybrid_start <= 1:
        p.error(f"--hybrid-start must be in (0, 1], got {args.hybrid_start}")
    for flag in ("num_images", "sample_steps", "jump", "resample", "dip_iters", "hybrid_dip_iters",
                 "hybrid_resample", "stripe_width"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 0 < args.fraction < 1:
        p.error(f"--fraction must be between 0 and 1 (the share of pixels to fill in), got {args.fraction}")
    if common.world_size() > 1:
        p.error("inpaint.py runs in one process (it fits one image at a time): start it with python, not torchrun")
    return args


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    device = common.get_device(args.device)
    model, schedule, model_args = load_ddpm(args, device)
    args.pred, args.resume = model_args.pred, False           # common.Run asks; nothing here resumes
    run = common.Run("inpaint", args)
    images = test_images(model_args, args.num_images).to(device)
    samples = ddpm.sample(model, schedule, 64, model_args.image_size, model_args.in_channels, seed=args.seed,
                          **ddpm.sampler_settings(model_args))
    run.save_grid(samples, "samples.png")                  # plain samples of p(x) first, as the brief asks
    chain_figure(run.dir / "repaint_chain.png", model, schedule, images[:1], args)
    results = evaluate(model, schedule, images, args, run)
    quality_time_figure(run.dir / "quality_vs_time.png", results)
    table = markdown_table(results)
    (run.dir / "results.md").write_text(table + "\n")
    print(table)
    run.finish(common.count_parameters(model), ddpm_checkpoint=args.ckpt,
               dip_parameters_per_image=common.count_parameters(DeepImagePrior(1, model_args.in_channels,
                                                                                model_args.image_size)),
               num_images=len(images), results=results)


if __name__ == "__main__":
    main()
