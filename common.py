"""Shared plumbing for the course scripts: data, run records, checkpoints and the sample-quality metric.

Nothing here is a model a script is meant to teach. It holds what every script would otherwise copy:

  * `load_data`: one call gives train/validation/test loaders, the number of classes and their names, for the
    embedded `shapes` set (procedurally drawn, offline), torchvision's real datasets (downloaded on first use),
    a generic image `folder` and the `list` layout of the course's mini-ImageNet. Images come in [-1, 1].
  * `Run`: the run directory runs/<script>/<name>/ with args.json, metrics.jsonl, loss.png, image grids,
    final.json and an atomically written checkpoint that `--resume` continues from.
  * `frechet_distance` and `SampleQuality`: the Frechet distance between real and generated images in the
    features of Inception-v3 (the standard FID) or of a small reference classifier trained on the dataset
    (works offline; it also judges conditional samples: is a sample drawn for class y classified as y?).
  * `psnr` and `ssim`: restoration quality against the ground truth, over whole images or a region.
  * `load_sequences`, `load_corpus`, `read_wav`: texts, waveforms and plain-text corpora for rnn.py, embedded
    (functions of the standard library, its help topics), downloaded, or from a folder, CSV or text file.

Command line:
    python common.py table runs/ddpm                   # Markdown table: differing flags against final metrics
    python common.py classifier --dataset shapes       # train (or load) the reference classifier, print accuracy
"""
import argparse
import ast
import atexit
import contextlib
import csv
import datetime
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import tarfile
import tempfile
import time
import traceback
import wave
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from tqdm import tqdm

# Derived artefacts (the generated shapes arrays, reference classifiers) live here, never beside user data.
CACHE_DIR = Path(os.environ.get("DLCOURSE_CACHE", Path.home() / ".cache" / "dlcourse"))
VAL_SIZE = 5000          # images carved off a training set for each missing split (validation, test)
VAL_FRACTION = 0.1       # ... but never more than this share of it
SPLIT_SEED = 1234        # fixed, so the carved split is the same for every run whatever its --seed
IN_MEMORY_BYTES = 8 << 30  # decoded uint8 images up to this size are held in memory, larger sets decode per batch


def fail(message):
    """Stop with a one-line message for the user instead of a stack trace."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------- device, seed, flags

def get_device(name="auto"):
    """CUDA, then Apple's MPS, then the CPU; `--device cpu|cuda|cuda:1|mps` overrides. Under torchrun the process
    first joins the others (see join_processes) and takes GPU number LOCAL_RANK."""
    if world_size() > 1:
        return join_processes(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        fail(f"--device {name}: not available on this machine; use --device auto")
    return device


def native_bf16(device, cpuinfo=Path("/proc/cpuinfo")):
    """Does the hardware compute in bf16 itself? GPUs from Ampere on; CPUs with AVX-512 BF16 or AMX, read from
    Linux's /proc/cpuinfo (oneDNN's own check accepts any AVX-512 CPU, where bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu" and cpuinfo.exists():
        flags = cpuinfo.read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def amp_enabled(amp, device):
    """Does --amp turn autocast on? bf16 and fp16 always, off never; auto where the hardware runs bf16 natively,
    since older CPUs and GPUs emulate it and get slower (on those GPUs, fp16 is the fast choice)."""
    return amp in ("bf16", "fp16") or (amp == "auto" and native_bf16(device))


def autocast(amp, device):
    """bf16 or fp16 autocast for --amp bf16|fp16, none for --amp off; --amp auto: see amp_enabled."""
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                          enabled=amp_enabled(amp, device))


def grad_scaler(amp, device):
    """fp16 represents nothing below 6e-8, so small gradients would underflow to zero. The scaler multiplies the
    loss by a large factor S before backward and divides the gradients by S before the step; a step whose
    gradients overflowed (inf or NaN) is skipped and S halved, and S doubles after 2000 clean steps. bf16 has
    float32's exponent range and needs none: for --amp other than fp16 the scaler passes everything through."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def load_optimizer_state(opt, state):
    """opt.load_state_dict(state), with every per-parameter tensor (Adam's moments) then laid out in memory as its
    parameter is. load_state_dict keeps the saved strides, and a fused optimizer walks raw memory, so a run resumed
    in another layout (ddpm.py's depends on --amp) would otherwise pair moments with the wrong weights, silently."""
    opt.load_state_dict(state)
    for p, per_param in opt.state.items():
        for k, v in per_param.items():
            if torch.is_tensor(v) and v.shape == p.shape:
                per_param[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def seed_everything(seed):
    """Seeds Python, NumPy and torch. Under torchrun each process adds its rank: the noise it draws (diffusion
    times, latent codes, dropout masks) must differ from the other processes', or its share of the batch would
    repeat theirs. Rank 0 draws what a single process would; the data order has its own generator (make_loader)."""
    seed += rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- several processes (torchrun)
#
# `torchrun --nproc_per_node=N script.py ...` starts N copies of a script, with RANK, LOCAL_RANK and WORLD_SIZE
# in their environment. Each process holds a replica of the model and trains it on 1/N of every batch (its
# `shard`); DistributedDataParallel averages the gradients across processes during backward, so every replica
# takes the same step, the one a single process would take on the whole batch. --batch-size stays the global
# batch: the same command trains the same model on 1 or N GPUs. Rank 0 alone evaluates, samples and writes.

def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))


def world_size():
    """The number of processes: torchrun's WORLD_SIZE (read from the environment until they have joined), else 1."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main():
    """The process that evaluates, samples and writes the run's files (the only one without torchrun)."""
    return rank() == 0


def join_processes(name="auto"):
    """Join torchrun's process group (NCCL between GPUs, Gloo between CPU processes) and return this process's
    device."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if name == "auto" and torch.cuda.is_available():
        name = f"cuda:{local_rank}"
    elif name not in ("cpu", "auto"):
        fail(f"--device {name} under torchrun: use --device auto (one GPU per process) or cpu")
    device = torch.device("cpu" if name == "auto" else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        # Rank 0 evaluates and samples while the others wait at their next gradient exchange: allow it an hour.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=1))
        atexit.register(torch.distributed.destroy_process_group)   # leave the group cleanly, as PyTorch asks
    return device


def _quiet_other_ranks():
    """Under torchrun, the processes other than rank 0 print nothing (one progress bar, one report), from the
    start, before they join; an error that stops one still reaches the terminal."""
    if rank() > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *error: traceback.print_exception(*error, file=sys.__stderr__)


_quiet_other_ranks()


def distribute(model, args, device):
    """The module the training step calls: `model` itself in one process; under torchrun, wrapped in
    DistributedDataParallel (which starts every replica from rank 0's weights and averages gradients during
    backward), with its batch norms synchronised across GPUs so that their statistics are the whole batch's
    (SyncBatchNorm runs on GPUs only: CPU processes normalise by their own shard); with --compile, compiled.
    The parameters are shared with `model`, so evaluate, sample and save `model`."""
    net = model
    if world_size() > 1:
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if args.compile else net


def check_replicas(model, step):
    """Under torchrun, stop if the processes' weights have drifted apart (a forward pass that bypassed
    DistributedDataParallel, so that its gradients were never averaged). Costs one all-reduce of four numbers."""
    if world_size() == 1:
        return
    total = torch.stack([sum(p.detach().double().sum() for p in model.parameters()),
                         sum(p.detach().double().square().sum() for p in model.parameters())])
    spread = torch.stack([total, -total])           # after a MAX all-reduce: the largest sums and minus the smallest
    torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
    if not torch.allclose(spread[0], -spread[1], rtol=1e-9, atol=0):
        fail(f"at step {step} the processes' weights differ: the gradients were not averaged across processes")


def mean_over_processes(values):
    """The mean of a tensor over the processes (NCCL exchanges GPU tensors only, so it travels through the GPU)."""
    on_gpu = torch.distributed.get_backend() == "nccl"
    values = values.to(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
    torch.distributed.all_reduce(values)
    return values.cpu() / world_size()


@contextlib.contextmanager
def main_first():
    """Under torchrun, rank 0 runs the block (downloads a dataset, writes a cache) before the others run it
    (and read what it wrote): N processes writing the same files at once would trip over each other."""
    if world_size() > 1 and not is_main():
        torch.distributed.barrier()
    yield
    if world_size() > 1 and is_main():
        torch.distributed.barrier()


def gather(obj):
    """[every process's obj], in rank order (one process: [obj])."""
    if world_size() == 1:
        return [obj]
    objects = [None] * world_size()
    torch.distributed.all_gather_object(objects, obj)
    return objects


def shard(batch):
    """This process's share of a global batch of indices: every world_size()-th one from its rank on."""
    return batch[rank()::world_size()]


class Shards:
    """A batch sampler yielding this process's shard of each global batch of another one (see shard)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return (shard(batch) for batch in self.batches)

    def __len__(self):
        return len(self.batches)


def count_parameters(model):
    """Trainable parameters (the number a report quotes)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_shared_flags(p, *, batch_size=128, lr=2e-4, steps=None, epochs=1, eval_every=500, image_size=32, amp="off"):
    """The flags every training script has, with one meaning each; scripts pass their own defaults."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="shapes", help=f"one of {', '.join(DATASETS)} (shapes: embedded, offline)")
    g.add_argument("--data-dir", default="data", help="where real datasets are downloaded; the root for folder/list")
    g.add_argument("--image-size", type=int, default=image_size, help="images are resized to this many pixels square")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (0: load in-process)")
    g.add_argument("--split-sizes", type=lambda s: tuple(int(n) for n in s.split(",")), default=(50_000, 5_000, 10_000),
                   help="shapes only: train,validation,test image counts (default 50000,5000,10000, as CIFAR-10)")
    return add_training_flags(p, batch_size=batch_size, lr=lr, steps=steps, epochs=epochs, eval_every=eval_every,
                              amp=amp)


def add_training_flags(p, *, batch_size=128, lr=2e-4, steps=None, epochs=1, eval_every=500, amp="off"):
    """The optimisation and system flags of add_shared_flags, for a script with data flags of its own."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="examples (images, sequences) per optimiser step, over all processes under torchrun")
    g.add_argument("--epochs", type=int, default=epochs, help="passes over the training set (unless --steps)")
    g.add_argument("--steps", type=int, default=steps, help="optimiser steps; overrides --epochs")
    g.add_argument("--lr", type=float, default=lr, help="learning rate")
    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order and sampling")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--out", default="runs", help="runs root: this run writes to <out>/<script>/<name>/")
    g.add_argument("--name", default=None, help="run name (default: a timestamp)")
    g.add_argument("--resume", action="store_true", help="continue run --name (default: the latest) from its checkpoint")
    g.add_argument("--eval-every", type=int, default=eval_every, help="optimiser steps between validations")
    g.add_argument("--amp", default=amp, choices=("off", "bf16", "fp16", "auto"),
                   help="mixed precision: bf16 or fp16 autocast (fp16 with a gradient scaler); auto: bf16 where the "
                        "hardware computes it natively (GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX)")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained model (slow first steps)")
    return p


def total_steps(args, train_loader):
    """--steps if given, else --epochs passes over the training loader."""
    return args.steps if args.steps is not None else args.epochs * len(train_loader)


def lr_factor(step, steps, warmup, decay_fraction):
    """The learning rate of optimiser step `step` (0-based) of `steps`, as a share of the peak: a linear warm-up
    over the first `warmup` steps, then constant, then a linear decay towards zero over the last `decay_fraction`
    (in [0, 1); 0: no decay) of the steps. The decay ends at 1 / (decay steps), so the last step still moves the
    weights. A run resumed with a larger --steps decays over the new total: from where the new schedule stands."""
    decay_steps = decay_fraction * steps
    return min(1.0, (step + 1) / warmup, (steps - step) / decay_steps if decay_steps > 0 else 1.0)


def add_lr_decay_flag(p, default):
    """--lr-decay, the decay_fraction of lr_factor, refused with a one-line error outside [0, 1)."""
    def fraction(text):
        value = float(text)
        if not 0 <= value < 1:
            fail(f"--lr-decay must be in [0, 1), got {value}")
        return value
    p.add_argument("--lr-decay", type=fraction, default=default,
                   help="share of the steps over which the learning rate decays linearly to zero at the end (0: none)")


def forever(loader, skip=0):
    """Batches without end, epoch after epoch (each epoch reshuffled), for step-counted training loops. A run
    resumed at step `skip` passes it to continue with the batches an uninterrupted run would have seen next."""
    step = 0
    while True:
        for batch in loader:          # the skipped batches are still drawn, so each epoch's shuffle is the same
            if step >= skip:
                yield batch
            step += 1


def check_finite(loss, step, advice="lower --lr, or check the data (are images in [-1, 1]?)"):
    value = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        fail(f"the loss became {value} at step {step}: {advice}")


# ----------------------------------------------------------------------------- the embedded Shapes dataset
#
# Ten shape classes drawn as signed distance functions (SDFs): sd(p) < 0 inside. A pixel's coverage is
# clamp(0.5 - sd, 0, 1) with sd in pixels: a one-pixel linear ramp across the edge, i.e. anti-aliasing by the
# area of a pixel-wide box filter. The image blends background and foreground colour by the coverage; the
# binary mask is coverage > 0.5. Every shape lives in a unit frame (circumradius about 1) and is placed by
# its generative factors.

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "diamond", "hexagon", "crescent")
# Rotation is not recoverable for circle and ring, and only modulo the symmetry angle for the regular shapes.
FACTOR_NAMES = ("class", "fg_hue", "bg_hue", "scale", "x", "y", "rotation")
SCALE_RANGE = (0.18, 0.32)     # circumradius as a fraction of the image side
CENTRE_RANGE = (0.33, 0.67)    # centre, fraction of the side; with SCALE_RANGE every shape stays inside
FG_SAT_VAL, BG_SAT_VAL = (0.85, 0.95), (0.6, 0.3)   # bright saturated shapes on dark backgrounds
SHAPES_VERSION = 1             # bump when drawing changes, so stale caches are not reused


def _regular_polygon(k, phase=math.pi / 2):
    a = phase + 2 * math.pi * torch.arange(k) / k
    return torch.stack([a.cos(), a.sin()], 1)


def _star(points=5, inner=0.45):
    a = math.pi / 2 + math.pi * torch.arange(2 * points) / points
    r = torch.tensor([1.0, inner]).repeat(points)
    return torch.stack([r * a.cos(), r * a.sin()], 1)


def _cross(w=0.3):
    xy = [(w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1), (w, 1)]
    return 0.95 * torch.tensor(xy)


def _heart(n=32):
    t = 2 * math.pi * torch.arange(n) / n       # the classic parametric heart curve
    x = 16 * t.sin() ** 3
    y = 13 * t.cos() - 5 * (2 * t).cos() - 2 * (3 * t).cos() - (4 * t).cos() + 2.5
    xy = torch.stack([x, y], 1)
    return xy / xy.norm(dim=1).max()


POLYGONS = {
    "square": _regular_polygon(4, phase=math.pi / 4), "triangle": _regular_polygon(3), "star": _star(),
    "cross": _cross(), "heart": _heart(), "hexagon": _regular_polygon(6),
    "diamond": torch.tensor([[0.0, 1.0], [-0.55, 0.0], [0.0, -1.0], [0.55, 0.0]]),  # a rhombus, never a square
}


def _sd_polygon(p, v):
    """Signed distance from points p (N, P, 2) to the closed polygon v (K, 2) (after Quilez's sdPolygon).

    Distance: to the nearest point of the nearest edge. Sign: cast a ray from p to the right; every edge that
    straddles p's height with p on the matching side flips inside/outside (even-odd rule)."""
    e = v.roll(-1, 0) - v                                            # (K, 2) edges
    w = p[:, :, None, :] - v                                         # (N, P, K, 2)
    h = ((w * e).sum(-1) / (e * e).sum(-1)).clamp(0, 1)              # nearest point on each edge
    d = (w - e * h[..., None]).norm(dim=-1).amin(-1)                 # (N, P)
    above, above_next = p[..., 1:2] >= v[:, 1], p[..., 1:2] >= v.roll(-1, 0)[:, 1]
    left = e[:, 0] * w[..., 1] > e[:, 1] * w[..., 0]
    crossings = ((above & ~above_next & left) | (~above & above_next & ~left)).sum(-1)
    return torch.where(crossings % 2 == 1, -d, d)


def _sd_shape(name, p):
    r = p.norm(dim=-1)
    if name == "circle":
        return r - 0.9
    if name == "ring":
        return (r - 0.72).abs() - 0.22
    if name == "crescent":      # a disc minus a shifted disc; max() bounds the distance (exact enough for the edge)
        return torch.maximum(r - 0.95, 0.75 - (p - torch.tensor([0.42, 0.0])).norm(dim=-1))
    return _sd_polygon(p, POLYGONS[name])


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB, h in [0, 1); returns (N, 3)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * h[:, None]) % 6
    return v - v * s * (torch.minimum(k, 4 - k).clamp(0, 1))


def render_shapes(factors, size, chunk=256):
    """Draw shapes from a (N, 7) factor array (FACTOR_NAMES) -> uint8 images (N, 3, S, S), bool masks (N, S, S)."""
    f = torch.as_tensor(factors, dtype=torch.float32)
    centres = (torch.arange(size) + 0.5) / size
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    grid = torch.stack([gx, -gy], -1).reshape(1, -1, 2)              # y up, so rotation is counter-clockwise
    coverage = torch.zeros(len(f), size * size)
    for c, name in enumerate(SHAPE_CLASSES):
        for idx in (f[:, 0] == c).nonzero().squeeze(1).split(chunk):
            fc = f[idx]
            q = grid - torch.stack([fc[:, 4], -fc[:, 5]], 1)[:, None]  # into the shape's frame: translate,
            cos, sin = fc[:, 6].cos()[:, None], fc[:, 6].sin()[:, None]  # rotate by -rotation, divide by scale
            q = torch.stack([cos * q[..., 0] + sin * q[..., 1], cos * q[..., 1] - sin * q[..., 0]], -1)
            scale = fc[:, 3:4]
            sd_pixels = _sd_shape(name, q / scale[:, :, None]) * scale * size
            coverage[idx] = (0.5 - sd_pixels).clamp(0, 1)
    fg = _hsv_to_rgb(f[:, 1], *FG_SAT_VAL)[:, :, None]
    bg = _hsv_to_rgb(f[:, 2], *BG_SAT_VAL)[:, :, None]
    rgb = bg + (fg - bg) * coverage[:, None]
    images = (rgb * 255).round().to(torch.uint8).reshape(len(f), 3, size, size)
    return images, (coverage > 0.5).reshape(len(f), size, size)


def sample_factors(n, rng):
    """Independent, uniformly drawn generative factors (N, 7); rotation in radians.

    One (N, 7) uniform draw, row by row, so the first k items are the same whatever N is."""
    u = rng.random((n, len(FACTOR_NAMES)))
    lerp = lambda col, lo, hi: lo + (hi - lo) * u[:, col]
    return np.stack([np.floor(u[:, 0] * len(SHAPE_CLASSES)), u[:, 1], u[:, 2], lerp(3, *SCALE_RANGE),
                     lerp(4, *CENTRE_RANGE), lerp(5, *CENTRE_RANGE), lerp(6, 0, 2 * math.pi)], 1).astype(np.float32)


def shapes_split(split, n, size, seed=0):
    """One split of `shapes` as (images uint8, labels, masks, factors), generated once and cached.

    Each split draws from its own random stream (seeded by seed and split name), so the splits are disjoint
    draws and a split's content does not depend on the sizes of the others."""
    path = CACHE_DIR / "shapes" / f"v{SHAPES_VERSION}-{size}px-seed{seed}-{split}-{n}.npz"
    if path.exists():
        z = np.load(path)
        return tuple(torch.from_numpy(z[k]) for k in ("images", "labels", "masks", "factors"))
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split)])
    factors = sample_factors(n, rng)
    images, masks = render_shapes(factors, size)
    labels = torch.from_numpy(factors[:, 0].astype(np.int64))
    with _atomic_path(path) as tmp:
        np.savez(tmp, images=images.numpy(), labels=labels.numpy(), masks=masks.numpy(), factors=factors)
    return images, labels, masks, torch.from_numpy(factors)


# ----------------------------------------------------------------------------- datasets held as uint8 arrays

class ImageArray(Dataset):
    """Images as uint8 (N, C, H, W) in memory (or as files decoded per batch when too large), with labels and
    optional extra per-item fields (`mask`, `factors`).

    Indexed by a list of indices (the loaders use a BatchSampler), so a batch is one tensor indexing, not
    B Python calls and a collate. Returns a tuple of the requested `fields`, images scaled to [-1, 1]."""

    def __init__(self, images, labels, fields=("image", "label"), files=None, size=None, **extra):
        self.images, self.labels, self.files, self.size = images, labels, files, size
        self.extra = extra
        missing = [f for f in fields if f not in ("image", "label", *extra)]
        if missing:
            fail(f"this dataset has no {', '.join(missing)} (only shapes has mask and factors)")
        self.fields = fields

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        idx = torch.as_tensor(idx)
        if self.images is not None:
            pixels = self.images[idx]
        else:
            pixels = torch.stack([_decode(self.files[i], self.size) for i in idx.tolist()])
        out = {"image": pixels.float() / 127.5 - 1, "label": self.labels[idx]}
        out.update({k: v[idx] for k, v in self.extra.items()})
        return tuple(out[f] for f in self.fields)


def to_uint8(images):
    """Undo the loaders' scaling: [-1, 1] floats -> uint8 in [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _resize(images, size):
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), antialiased; unchanged if already that size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = [F.interpolate(b.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
           for b in images.split(1024)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def _decode(path, size):
    """Decode one image file to uint8 (3, size, size): upright (EXIF), centre-cropped to a square, resized."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            pixels = torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB"))).permute(2, 0, 1)
    except (OSError, ValueError) as e:
        fail(f"cannot read image {path}: {e}")
    h, w = pixels.shape[1:]
    side = min(h, w)
    pixels = pixels[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    return _resize(pixels[None], size)[0]


def _decode_all(files, size, what):
    if len(files) * 3 * size * size > IN_MEMORY_BYTES:
        return None        # too large for memory: ImageArray decodes each batch from the files
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:      # PIL releases the GIL while decoding
        images = list(tqdm(pool.map(lambda f: _decode(f, size), files), total=len(files),
                           desc=f"decoding {what}", leave=False, disable=len(files) < 5000))
    return torch.stack(images)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _folder_split(root, extensions=IMAGE_EXTENSIONS, what="images"):
    """<root>/<class>/<file> -> (files, labels, class names), the files those with one of `extensions`."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        fail(f"{root} has no class subfolders: expected <root>/<class>/*{'|'.join(extensions[:2])} (one folder per class)")
    files, labels = [], []
    for c, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in extensions)
        if not found:
            fail(f"class folder {root / name} holds no {what} ({', '.join(extensions)})")
        files += found
        labels += [c] * len(found)
    return files, torch.tensor(labels), classes


def _read_list(path, root):
    """A mini-ImageNet list file: one `relative/path label` per line -> (files, label strings)."""
    files, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            fail(f"{path}:{n}: expected 'path label', got {line!r}")
        file = root / parts[0]
        if not file.exists():
            fail(f"{path}:{n}: image {file} does not exist")
        files.append(file)
        labels.append(parts[1])
    if not files:
        fail(f"{path} lists no images")
    return files, labels


def _label_order(names):
    """Sort class names numerically when they are all integers, else alphabetically."""
    # the key puts integer names first, in numeric order ("2" before "10"), then the rest alphabetically
    return sorted(set(names), key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))


def _carve(n, size):
    """A fixed random split of range(n) into (rest, size held out), the same for every run."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[size:], perm[:size]


def _held_out_size(n):
    return min(VAL_SIZE, int(n * VAL_FRACTION))


def _color_mnist(images, labels, seed):
    """MNIST binarised at half intensity, the digit painted a random bright colour on a dark background."""
    rng = torch.Generator().manual_seed(seed)
    digit = (images > 127).float()[:, None]                                  # (N, 1, 28, 28)
    fg = _hsv_to_rgb(torch.rand(len(images), generator=rng), 0.9, 1.0)[:, :, None, None]
    bg = _hsv_to_rgb(torch.rand(len(images), generator=rng), 0.5, 0.15)[:, :, None, None]
    return (255 * (bg + (fg - bg) * digit)).round().to(torch.uint8), labels


def _torchvision_split(name, root, train):
    """(uint8 images (N, C, H, W), labels, class names) of one split of a torchvision dataset (downloads)."""
    tv = torchvision.datasets
    if name in ("cifar10", "cifar100"):
        d = (tv.CIFAR10 if name == "cifar10" else tv.CIFAR100)(root, train=train, download=True)
        return torch.from_numpy(d.data).permute(0, 3, 1, 2), torch.tensor(d.targets), d.classes
    if name == "svhn":
        d = tv.SVHN(root, split="train" if train else "test", download=True)
        return torch.from_numpy(d.data), torch.from_numpy(d.labels).long(), [str(i) for i in range(10)]
    if name == "stl10":
        d = tv.STL10(root, split="train" if train else "test", download=True)
        return torch.from_numpy(d.data), torch.from_numpy(d.labels).long(), d.classes
    if name == "mnist-color":
        d = tv.MNIST(root, train=train, download=True)
        return (*_color_mnist(d.data, d.targets, seed=SPLIT_SEED + train), d.classes)
    fail(f"no torchvision split for {name}")


def _load_celeba(root, size, fields):
    """CelebA's own train/valid/test splits; the label is the 'Male' attribute (0 female, 1 male)."""
    splits = []
    for split in ("train", "valid", "test"):
        d = torchvision.datasets.CelebA(root, split=split, target_type="attr", download=True)
        files = [Path(d.root) / d.base_folder / "img_align_celeba" / f for f in d.filename]
        labels = d.attr[:, d.attr_names.index("Male")].long()
        splits.append(ImageArray(_decode_all(files, size, f"celeba {split}"), labels, fields, files=files, size=size))
    return splits, ["female", "male"]


class Data(NamedTuple):
    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    classes: list
    channels: int


TORCHVISION = ("cifar10", "cifar100", "svhn", "stl10", "mnist-color")
DATASETS = ("shapes", *TORCHVISION, "celeba", "folder", "list")


def load_datasets(name="shapes", data_dir="data", image_size=32, fields=("image", "label"), sizes=None):
    """(train, val, test) ImageArrays and the class names. `sizes` = (train, val, test) counts for shapes."""
    root = Path(data_dir)
    if name == "shapes":
        sizes = sizes or (50_000, 5_000, 10_000)
        splits = []
        for split, n in zip(("train", "val", "test"), sizes):
            images, labels, masks, factors = shapes_split(split, n, image_size)
            splits.append(ImageArray(images, labels, fields, mask=masks, factors=factors))
        return splits, list(SHAPE_CLASSES)
    if name in TORCHVISION:
        try:
            train_images, train_labels, classes = _torchvision_split(name, root / name, train=True)
            test_images, test_labels, _ = _torchvision_split(name, root / name, train=False)
        except ImportError as e:                # torchvision reads SVHN's .mat files with scipy
            fail(f"--dataset {name} needs the package {e.name}: pip install {e.name}")
        except (OSError, RuntimeError) as e:    # URLError is an OSError; torchvision raises RuntimeError too
            fail(f"{name} is not in {root / name} and could not be downloaded ({type(e).__name__}: {e}); "
                 f"point --data-dir at a copy, or use the offline default --dataset shapes")
        rest, val = _carve(len(train_labels), _held_out_size(len(train_labels)))
        train_images, test_images = _resize(train_images, image_size), _resize(test_images, image_size)
        return [ImageArray(train_images[rest], train_labels[rest], fields),
                ImageArray(train_images[val], train_labels[val], fields),
                ImageArray(test_images, test_labels, fields)], classes
    if name == "celeba":
        try:
            splits, classes = _load_celeba(root, image_size, fields)
        except ImportError as e:                # torchvision downloads CelebA with gdown
            fail(f"--dataset celeba needs the package {e.name}: pip install {e.name}")
        except (OSError, RuntimeError) as e:
            fail(f"celeba is not in {root / 'celeba'} and could not be downloaded ({e}); "
                 f"point --data-dir at a copy, or use the offline default --dataset shapes")
        return splits, classes
    if name in ("folder", "list"):
        if not root.is_dir():
            fail(f"--data-dir {root} is not a directory: for --dataset {name} it must hold the images")
        files, labels, classes = _folder_files(root) if name == "folder" else _list_files(root)
        splits = []
        for split, (f, y) in zip(("train", "val", "test"), zip(files, labels)):
            images = _decode_all(f, image_size, f"{root.name}/{split}")
            splits.append(ImageArray(images, y, fields, files=f, size=image_size))
        return splits, classes
    fail(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def _carve_missing(train, val, test):
    """Given (files, labels) per split, some None, carve the missing ones off the training split."""
    files, labels = train
    missing = [s is None for s in (val, test)]
    if not any(missing):
        return [train, val, test]
    held = _held_out_size(len(labels))
    if held == 0:
        fail(f"{len(labels)} training examples are too few to carve validation and test splits off (10 at least); "
             f"give the validation and test splits (val/ and test/ folders, validation.txt and test.txt, or "
             f"val.csv and test.csv)")
    rest, out = _carve(len(labels), held * sum(missing))
    pick = lambda ix: ([files[i] for i in ix.tolist()], labels[ix])
    parts = iter(out.split(held))
    val = pick(next(parts)) if val is None else val
    test = pick(next(parts)) if test is None else test
    return [pick(rest), val, test]


def _folder_files(root, extensions=IMAGE_EXTENSIONS, what="images"):
    """ImageFolder layout; with train/ (and val/ or validation/, test/) subfolders when present."""
    split_dirs = {s: next((root / d for d in names if (root / d).is_dir()), None)
                  for s, names in (("train", ["train"]), ("val", ["val", "validation", "valid"]), ("test", ["test"]))}
    if split_dirs["train"] is None:
        split_dirs = {"train": root, "val": None, "test": None}
    files, labels, classes = _folder_split(split_dirs["train"], extensions, what)
    others = []
    for s in ("val", "test"):
        if split_dirs[s] is None:
            others.append(None)
            continue
        f, y, c = _folder_split(split_dirs[s], extensions, what)
        if c != classes:
            fail(f"{split_dirs[s]} has classes {c}, but {split_dirs['train']} has {classes}")
        others.append((f, y))
    splits = _carve_missing((files, labels), *others)
    return [s[0] for s in splits], [s[1] for s in splits], classes


def _list_files(root):
    """mini-ImageNet layout: train.txt, validation.txt (or val.txt), test.txt of `path label` lines."""
    lists = {}
    for split, names in (("train", ["train.txt"]), ("val", ["validation.txt", "val.txt"]), ("test", ["test.txt"])):
        path = next((root / n for n in names if (root / n).exists()), None)
        lists[split] = _read_list(path, root) if path else None
    if lists["train"] is None:
        fail(f"{root} has no train.txt: the list layout needs train.txt (and validation.txt, test.txt) "
             f"with one 'path label' per line")
    encoded, classes = _encode_labels(lists, "list")
    splits = _carve_missing(*encoded)
    return [s[0] for s in splits], [s[1] for s in splits], classes


def _encode_labels(splits, what):
    """{split: (items, label strings) or None} -> [(items, label indices) or None] and the class names, which
    come from the training split; a label it never uses is an error."""
    classes = _label_order(splits["train"][1])
    index = {c: i for i, c in enumerate(classes)}
    encoded = []
    for split, entry in splits.items():
        if entry is None:
            encoded.append(None)
            continue
        unknown = sorted(set(entry[1]) - set(index))
        if unknown:
            fail(f"the {split} {what} has labels {unknown[:5]} that the training {what} never uses")
        encoded.append((entry[0], torch.tensor([index[c] for c in entry[1]])))
    return encoded, classes


def make_loader(dataset, batch_size, shuffle, num_workers=0, seed=0, drop_last=False, shard=False):
    """A DataLoader that fetches whole batches from an ImageArray (see ImageArray).

    Both the shuffling and the DataLoader's own worker seeds come from a private generator, so iterating a
    loader never moves the global random stream that model initialisation and noise draws use. Every process
    shuffles alike, so with shard=True under torchrun each takes its shard of the same global batches."""
    if shard and batch_size % world_size():
        fail(f"--batch-size {batch_size} does not split evenly over {world_size()} processes")
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, generator=g) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size, drop_last=drop_last)
    return DataLoader(dataset, sampler=Shards(batches) if shard else batches, batch_size=None,
                      num_workers=num_workers, persistent_workers=num_workers > 0, generator=g)


def load_data(args, fields=("image", "label"), sizes=None, every_process=True):
    """Train (shuffled, seeded by --seed), validation and test loaders for the shared flags in `args`.

    Under torchrun a training script calls this in every process: rank 0 reads (or downloads) first, and the
    training loader yields this process's shard of each batch. every_process=False is for a call from rank 0
    alone (its evaluation's reference classifier): the whole batches, and no waiting for the others."""
    sizes = sizes or getattr(args, "split_sizes", None)
    with main_first() if every_process else contextlib.nullcontext():
        (train, val, test), classes = load_datasets(args.dataset, args.data_dir, args.image_size, fields, sizes)
    if len(train) < args.batch_size:
        fail(f"the training set has {len(train)} images, fewer than --batch-size {args.batch_size}")
    loader = lambda d, shuffle: make_loader(d, args.batch_size, shuffle, args.num_workers, args.seed,
                                            drop_last=shuffle, shard=shuffle and every_process)
    channels = train[[0]][0].shape[1]
    return Data(loader(train, True), loader(val, False), loader(test, False), len(classes), classes, channels)


# ----------------------------------------------------------------------------- text and audio datasets
#
# Sequences for rnn.py: texts (str) or waveforms (1-D float tensors in [-1, 1] at one sample rate) with labels,
# and plain-text corpora for language modelling. Tokens and audio features are the script's own business.

TEXT_EXTENSIONS = (".txt",)
AUDIO_EXTENSIONS = (".wav",)
# Ten packages every CPython install carries (no tkinter or idlelib, which Linux distributions split off).
STDLIB_PACKAGES = ("asyncio", "collections", "email", "http", "importlib", "logging", "multiprocessing",
                   "unittest", "urllib", "xml")
SPEECH_COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
TEXT_DATASETS = ("stdlib", "names", "imdb", "textfolder", "csv")
AUDIO_DATASETS = ("speechcommands", "audiofolder")
CORPORA = ("pydoc", "shakespeare", "textfile")
URLS = {"names": "https://download.pytorch.org/tutorial/data.zip",
        "imdb": "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
        "speechcommands": "https://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
        "shakespeare": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"}


class Sequences(NamedTuple):
    splits: list        # [(items, labels)] for train, validation and test; items are str or 1-D float tensors
    classes: list
    kind: str           # "text" or "audio"


def _hash_split(key):
    """0 (train, 80%), 1 (validation, 10%) or 2 (test, 10%) from an item's stable name, so an item keeps its split
    when others are added or removed (another Python version's standard library, say)."""
    bucket = int(hashlib.md5(key.encode()).hexdigest(), 16) % 10
    return 0 if bucket < 8 else bucket - 7


def _definitions(tree):
    """(node, qualified name) of the functions at a module's top level and the methods of its top-level classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.name
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield item, f"{node.name}.{item.name}"


def _function_source(node, lines):
    """A definition's source from its `def` line, the docstring removed (it often names its module), unindented."""
    body = lines[node.lineno - 1:node.end_lineno]
    first = node.body[0]
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
            and first.lineno > node.lineno):
        del body[first.lineno - node.lineno:first.end_lineno - node.lineno + 1]
    indent = node.col_offset                # a method's: remove it (but not text a string literal starts at column 0)
    return "\n".join(line[indent:] if not line[:indent].strip() else line for line in body)


def stdlib_functions():
    """The embedded text classification set: (source, package index, name) of each function and method in the
    modules of STDLIB_PACKAGES (tests skipped). Sources that occur more than once are kept once, and dropped
    altogether when two packages share them: an exact copy must not sit in two splits or under two labels."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for label, package in enumerate(STDLIB_PACKAGES):
        if not (root / package).is_dir():
            fail(f"this Python has no standard library package {package} in {root}: the stdlib set needs it")
        for path in sorted((root / package).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            if "/test/" in name or "/tests/" in name or path.name.startswith("test_"):
                continue
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            lines = source.splitlines()
            found += [(_function_source(node, lines), label, f"{name}:{qualname}") for node, qualname in _definitions(tree)]
    packages = {}
    for source, label, _ in found:
        packages.setdefault(source, set()).add(label)
    kept, seen = [], set()
    for source, label, name in found:
        if len(packages[source]) == 1 and source not in seen:
            seen.add(source)
            kept.append((source, label, name))
    return kept


def _stdlib_set():
    splits = [([], []) for _ in range(3)]
    for source, label, name in stdlib_functions():
        items, labels = splits[_hash_split(name)]
        items.append(source)
        labels.append(label)
    return [(items, torch.tensor(labels)) for items, labels in splits], list(STDLIB_PACKAGES)


def _download(name, folder, archive=True):
    """Fetch URLS[name] into `folder` (extracting an archive there); a clear error when offline."""
    from torchvision.datasets.utils import download_and_extract_archive, download_url
    try:
        (download_and_extract_archive if archive else download_url)(URLS[name], str(folder))
    except (OSError, RuntimeError) as e:        # URLError is an OSError
        fail(f"{name} is not in {folder} and could not be downloaded ({type(e).__name__}: {e}); put a copy there "
             f"(--data-dir), or use an embedded set: --dataset stdlib (classification), pydoc (generation)")
    except (tarfile.ReadError, zipfile.BadZipFile, EOFError) as e:     # an interrupted earlier download
        fail(f"the {name} archive in {folder} is damaged ({e}): delete {folder} and run again to download it anew")


def _names(root):
    """The PyTorch tutorial's surnames by language: data/names/<Language>.txt, one name per line. The files repeat
    names (Arabic.txt holds about 100 distinct ones in 2,000 lines) and some names belong to two languages: each
    name is kept once, and not at all when its language is ambiguous, so no test name is a training name."""
    folder = root / "names" / "data" / "names"
    if not folder.is_dir():
        _download("names", root / "names")
    languages, classes = {}, []
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                languages.setdefault(line.strip(), set()).add(len(classes))
        classes.append(path.stem)
    splits = [([], []) for _ in range(3)]
    for name, found in languages.items():
        if len(found) == 1:
            items, labels = splits[_hash_split(name)]
            items.append(name)
            labels.append(found.pop())
    return [(items, torch.tensor(labels)) for items, labels in splits], classes


def _read_texts(files):
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def _imdb(root):
    """IMDB movie reviews (Maas et al. 2011): 25,000 train and 25,000 test, negative or positive; the validation
    split is carved off the training reviews."""
    folder = root / "imdb" / "aclImdb"
    if not folder.is_dir():
        _download("imdb", root / "imdb")
    splits, classes = [], ["neg", "pos"]
    for split in ("train", "test"):
        files, labels = [], []
        for label, name in enumerate(classes):
            found = sorted((folder / split / name).glob("*.txt"))
            files += found
            labels += [label] * len(found)
        splits.append(([t.replace("<br />", " ") for t in _read_texts(files)], torch.tensor(labels)))
    return _carve_missing(splits[0], None, splits[1]), classes


def _read_csv(path):
    """(texts, label strings) of a UTF-8 CSV file (with or without Excel's byte-order mark) whose header names a
    `text` and a `label` column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        fail(f"cannot read {path} as a UTF-8 CSV file ({e})")
    if not rows or not {"text", "label"} <= set(rows[0]):
        fail(f"{path} needs a header row with the columns text and label (and at least one row)")
    for n, row in enumerate(rows, 2):
        if row["text"] is None or row["label"] is None:
            fail(f"{path}:{n}: a row without its text or label")
    return [r["text"] for r in rows], [r["label"] for r in rows]


def _csv_set(root):
    """--data-dir a CSV file (validation and test carved off it) or a folder of train.csv, val.csv, test.csv."""
    if root.is_file():
        paths = {"train": root, "val": None, "test": None}
    else:
        paths = {s: next((root / n for n in names if (root / n).exists()), None) for s, names in
                 (("train", ["train.csv"]), ("val", ["val.csv", "validation.csv"]), ("test", ["test.csv"]))}
        if paths["train"] is None:
            fail(f"{root} has no train.csv: give a CSV file, or a folder with train.csv (val.csv, test.csv)")
    encoded, classes = _encode_labels({s: _read_csv(p) if p else None for s, p in paths.items()}, "CSV")
    return _carve_missing(*encoded), classes


def read_wav(path):
    """A PCM WAV file (8, 16, 24 or 32 bit) as a mono float32 tensor in [-1, 1] (channels averaged) and its sample
    rate, with the standard library's wave module."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        fail(f"cannot read {path} as a PCM WAV file ({e}); convert it, e.g. ffmpeg -i in.x -acodec pcm_s16le out.wav")
    if width == 1:              # 8-bit WAV samples are unsigned, centred on 128
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 3:            # 24-bit little-endian: a zero low byte in front makes each a 32-bit integer
        bytes3 = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        samples = np.pad(bytes3, ((0, 0), (1, 0))).view("<i4")[:, 0].astype(np.float32) / 2 ** 31
    else:
        samples = np.frombuffer(raw, {2: "<i2", 4: "<i4"}[width]).astype(np.float32) / 2 ** (8 * width - 1)
    return torch.from_numpy(samples.reshape(-1, channels).mean(1)), rate


def resample(samples, rate, target):
    """Linear interpolation from `rate` to `target` Hz: enough between nearby rates; it does not filter out what
    lies above the new Nyquist frequency, so downsample far (44.1 kHz to 8 kHz) with a proper tool beforehand."""
    if rate == target:
        return samples
    size = max(1, round(len(samples) * target / rate))
    return F.interpolate(samples[None, None], size=size, mode="linear", align_corners=False)[0, 0]


def _read_waves(files, sample_rate):
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        waves = pool.map(read_wav, files)
        return [resample(w, rate, sample_rate) for w, rate in tqdm(waves, total=len(files), desc="reading audio",
                                                                     leave=False, disable=len(files) < 5000)]


def _speech_commands(root, sample_rate):
    """Speech Commands v0.02 (Warden 2018), the ten command words, in its own train/validation/test lists."""
    folder = root / "speechcommands"
    if not (folder / "testing_list.txt").exists():
        _download("speechcommands", folder)
    held = {s: set((folder / f"{s}_list.txt").read_text().split()) for s in ("validation", "testing")}
    splits = [([], []) for _ in range(3)]
    for label, word in enumerate(SPEECH_COMMANDS):
        for path in sorted((folder / word).glob("*.wav")):
            name = f"{word}/{path.name}"
            files, labels = splits[1 if name in held["validation"] else 2 if name in held["testing"] else 0]
            files.append(path)
            labels.append(label)
    return [(_read_waves(f, sample_rate), torch.tensor(y)) for f, y in splits], list(SPEECH_COMMANDS)


def load_sequences(name="stdlib", data_dir="data", sample_rate=16000):
    """Sequence classification data: texts or waveforms (resampled to `sample_rate`) per split, and class names."""
    root = Path(data_dir)
    if name not in TEXT_DATASETS + AUDIO_DATASETS:
        fail(f"unknown dataset {name!r} for classification; choose one of: {', '.join(TEXT_DATASETS + AUDIO_DATASETS)}")
    if name in ("textfolder", "audiofolder") and not root.is_dir():
        fail(f"--data-dir {root} is not a directory: for --dataset {name} it must hold <root>/<class>/ folders")
    if name == "csv" and not root.exists():
        fail(f"--data-dir {root} does not exist: for --dataset csv it must be a CSV file or a folder of them")
    if name == "stdlib":
        splits, classes = _stdlib_set()
    elif name == "names":
        splits, classes = _names(root)
    elif name == "imdb":
        splits, classes = _imdb(root)
    elif name == "csv":
        splits, classes = _csv_set(root)
    elif name == "speechcommands":
        splits, classes = _speech_commands(root, sample_rate)
    else:
        audio = name == "audiofolder"
        files, labels, classes = _folder_files(root, *((AUDIO_EXTENSIONS, "WAV files") if audio
                                                       else (TEXT_EXTENSIONS, "text files")))
        read = (lambda f: _read_waves(f, sample_rate)) if audio else _read_texts
        splits = [(read(f), y) for f, y in zip(files, labels)]
    return Sequences(splits, classes, "audio" if name in AUDIO_DATASETS else "text")


def load_corpus(name="pydoc", data_dir="data"):
    """(train, validation, test) text for language modelling. pydoc: the interactive help topics the standard
    library ships (pydoc_data), split by topic; shakespeare (Karpathy's tiny Shakespeare) and textfile (--data-dir
    a .txt file): the first 90%, the next 5%, the last 5% of the characters."""
    if name == "pydoc":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            fail("this Python has no pydoc_data (the help topics): use --dataset textfile --data-dir <a .txt file>")
        parts = [[], [], []]
        for topic in sorted(topics):
            parts[_hash_split(topic)].append(topics[topic])
        return tuple("\n".join(p) for p in parts)
    if name == "shakespeare":
        path = Path(data_dir) / "shakespeare" / "input.txt"
        if not path.exists():
            _download("shakespeare", path.parent, archive=False)
    elif name == "textfile":
        path = Path(data_dir)
        if not path.is_file():
            fail(f"--data-dir {path} is not a file: for --dataset textfile it must be a UTF-8 text file")
    else:
        fail(f"unknown corpus {name!r} for generation; choose one of: {', '.join(CORPORA)}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if len(text) < 1000:
        fail(f"{path} holds {len(text)} characters: too few to split into train, validation and test (1000 at least)")
    a, b = int(0.9 * len(text)), int(0.95 * len(text))
    return text[:a], text[a:b], text[b:]


# ----------------------------------------------------------------------------- run directory and checkpoints

class Run:
    """One run's directory <out>/<script>/<name>/: args.json, metrics.jsonl, loss.png, grids, final.json, ckpt.pt.

    With --resume the directory is --name's (or the latest run's), and `load_checkpoint` returns its state.
    reopen=True (a script's --sample-only, or the `reopen_flag` it has instead) opens such a finished run
    read-only: its args.json, metrics.jsonl and final.json stay as training left them, and new results go to new
    files.

    Under torchrun every process opens the same directory (rank 0's name), but only rank 0 writes to it: the
    others' `log` and `write_args` do nothing, and the scripts leave evaluation and sampling to rank 0; any other
    writing method called on another process stops it with an error (`check_writer`)."""

    def __init__(self, script, args, reopen=False, reopen_flag="--sample-only"):
        root = Path(args.out) / script
        name, existing = args.name, args.resume or reopen
        if reopen and world_size() > 1:
            fail(f"{reopen_flag} runs in one process: start it with python, not torchrun")
        if existing and name is None:
            runs = sorted(root.glob("*/ckpt.pt"), key=lambda p: p.stat().st_mtime)
            if not runs:
                fail(f"{reopen_flag if reopen else '--resume'}: no run with a checkpoint under {root}")
            name = runs[-1].parent.name
        if name is None:
            name = time.strftime("%Y%m%d-%H%M%S")
            while (root / name).exists():
                name += "+"
        if world_size() > 1:     # the processes started within the same second, or not: take rank 0's name
            names = [name]
            torch.distributed.broadcast_object_list(names, src=0)
            name = names[0]
        self.dir, self.args, self.reopen, self.main = root / name, args, reopen, is_main()
        self.ckpt_path = self.dir / "ckpt.pt"
        if existing and not self.ckpt_path.exists():
            fail(f"{reopen_flag if reopen else '--resume'}: {self.ckpt_path} does not exist")
        if not existing and self.ckpt_path.exists():
            fail(f"{self.dir} already holds a run: add --resume to continue it, or choose another --name")
        args.name = name
        if not self.main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if not existing:         # a run killed before its first checkpoint: nothing to resume, start afresh
            (self.dir / "metrics.jsonl").unlink(missing_ok=True)
        if not existing:         # a resumed run's args.json is rewritten once its checkpoint proved compatible
            self.write_args()

    def write_args(self):
        if self.main:
            (self.dir / "args.json").write_text(json.dumps(vars(self.args), indent=2, default=str))

    def log(self, step, split, **metrics):
        """Append one record, e.g. log(120, "train", loss=0.031) or log(500, "val", loss=..., fd=...).

        `step` counts optimiser steps done (1 after the first), the same count save_checkpoint stores. Under
        torchrun, "train" records are averaged over the processes' shards, the whole batch's values: every
        process calls log for them (and only rank 0 for the others)."""
        if split == "train" and world_size() > 1:
            values = torch.tensor([float(v) for v in metrics.values()], dtype=torch.float64)
            metrics = dict(zip(metrics, mean_over_processes(values).tolist()))
        if not self.main:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self):
        path = self.dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def check_writer(self, filename):
        """Rank 0 alone writes a run's files: a script that asks another process to write one has a bug (the
        processes would overwrite each other's files), so it stops here rather than passing unnoticed."""
        if not self.main:
            raise RuntimeError(f"process {rank()} was asked to write {filename}: only rank 0 writes a run's files")

    def save_checkpoint(self, step, **state):
        """Write {"step", "args", **state} atomically: a killed run leaves the previous checkpoint intact."""
        self.check_writer(self.ckpt_path.name)
        save_atomic({"step": step, "args": vars(self.args), **state}, self.ckpt_path)

    def load_checkpoint(self, model_flags, device, implied=None):
        """The checkpoint's state if --resume (or reopened), else None. On --resume, metric records after its step
        are dropped, since the resumed run will log those steps again. `implied`: see load_checkpoint (the function)."""
        if not (self.args.resume or self.reopen):
            return None
        state = load_checkpoint(self.ckpt_path, self.args, model_flags, device, implied)
        if self.reopen or not self.main:
            return state
        kept = [r for r in self.metrics() if r["step"] <= state["step"]]
        with _atomic_path(self.dir / "metrics.jsonl") as tmp:
            Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.write_args()
        print(f"resuming {self.dir} at step {state['step']}")
        return state

    def save_grid(self, images, filename, nrow=8):
        """Save images in [-1, 1] as a PNG grid in the run directory; returns its path."""
        self.check_writer(filename)
        path = self.dir / filename
        torchvision.utils.save_image(images.detach().float().cpu(), path, nrow=nrow, normalize=True,
                                     value_range=(-1, 1), pad_value=1.0)
        return path

    def save_labelled_grid(self, rows, filename, row_labels, column_labels, title=""):
        """A grid with one row per tensor (n, C, H, W) in [-1, 1], rows and columns labelled; returns its path."""
        self.check_writer(filename)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        n = len(rows[0])
        grid = torchvision.utils.make_grid(torch.cat(rows).float().cpu(), nrow=n, normalize=True, value_range=(-1, 1),
                                           pad_value=1.0)
        labels_width = 0.055 * max(len(label) for label in row_labels) + 0.2      # inches at fontsize 7
        width, height = labels_width + 0.6 * n + 0.2, 0.6 * len(rows) + 0.9
        fig = plt.figure(figsize=(width, height))
        ax = fig.add_axes((labels_width / width, 0.45 / height, 0.6 * n / width, 0.6 * len(rows) / height))
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_yticks([grid.shape[1] / len(rows) * (i + 0.5) for i in range(len(rows))], row_labels, fontsize=7)
        ax.set_xticks([grid.shape[2] / n * (i + 0.5) for i in range(n)], column_labels, fontsize=7)
        ax.tick_params(length=0)
        ax.set_title(title, fontsize=8)
        path = self.dir / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def plot_losses(self, key="loss", filename="loss.png"):
        """Train (raw and smoothed), validation and test `key` against optimiser steps; nothing if none logged."""
        self.check_writer(filename)
        records = [r for r in self.metrics() if key in r]
        if not records:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        train = [(r["step"], r[key]) for r in records if r["split"] == "train"]
        if train:
            steps, values = zip(*train)
            ax.plot(steps, values, color="C0", alpha=0.25, lw=0.8)
            ax.plot(steps, smooth(values), color="C0", label="train (EMA 0.98)")
        for split, style in (("val", "o-"), ("test", "*")):
            points = [(r["step"], r[key]) for r in records if r["split"] == split]
            if points:
                ax.plot(*zip(*points), style, label=split, markersize=8 if split == "test" else 4)
        ax.set(xlabel="optimiser step", ylabel=key, title=f"{self.dir.parent.name}/{self.dir.name}")
        if all(r[key] > 0 for r in records):
            ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.dir / filename, dpi=100)
        plt.close(fig)

    def plot_panels(self, panels, filename, log_scale=()):
        """Side-by-side panels {title: metric keys} against optimiser steps: per-step train series raw and smoothed
        (EMA 0.98), sparser ones (logged at fewer than a tenth of the steps) as lines, validation values as dots."""
        self.check_writer(filename)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        records = self.metrics()
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
        every_step = sum(r["split"] == "train" for r in records)
        for ax, (title, keys) in zip(axes[0], panels.items()):
            for i, key in enumerate(keys):
                train = [(r["step"], r[key]) for r in records if r["split"] == "train" and key in r]
                val = [(r["step"], r[key]) for r in records if r["split"] == "val" and key in r]
                if train:
                    steps, values = zip(*train)
                    if len(train) > every_step / 10:
                        ax.plot(steps, values, color=f"C{i}", alpha=0.2, lw=0.6)
                        values = smooth(values)
                    ax.plot(steps, values, color=f"C{i}", label=key)
                if val:
                    ax.plot(*zip(*val), "o", color=f"C{i}", markersize=4, label=f"{key} (validation)")
            if title in log_scale:
                ax.set_yscale("log")
            ax.set(title=title, xlabel="optimiser step")
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.dir / filename, dpi=100)
        plt.close(fig)

    def finish(self, parameters, filename="final.json", **metrics):
        """Write final.json (parameter count and final metrics; a reopened run names its own file) and the loss
        plot; print them."""
        self.check_writer(filename)
        final = {"parameters": parameters,
                 **{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}}
        (self.dir / filename).write_text(json.dumps(final, indent=2))
        self.plot_losses()
        print(json.dumps(final, indent=2))
        print(f"{filename} written to {self.dir}")
        return final


def smooth(values, decay=0.98):
    """Exponential moving average of a noisy per-step series, for a readable curve."""
    out, avg = [], values[0]
    for v in values:
        avg = decay * avg + (1 - decay) * v
        out.append(avg)
    return out


@contextlib.contextmanager
def _atomic_path(path):
    """Yield a fresh temporary file name beside `path`; rename it to `path` once written. A reader (or a second
    process writing the same file) never sees half a file, and a killed writer leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path):
    """torch.save through a temporary file and a rename (see _atomic_path)."""
    with _atomic_path(path) as tmp:
        torch.save(obj, tmp)


def unrecorded_flags(saved_args, model_flags):
    """The model flags a checkpoint's saved args lack, as '--flag-name': it predates them (an older script)."""
    return ["--" + f.replace("_", "-") for f in model_flags if f not in saved_args]


def load_checkpoint(path, args, model_flags, device="cpu", implied=None):
    """Load a checkpoint and check that the flags which shape the model agree with `args`. `implied` maps flags
    whose absence is no loss to the value an older checkpoint behaves as (a feature it could not have had, e.g.
    {"self_cond": False}); a checkpoint without them gets those values in its args instead of an error."""
    path = Path(path)
    if not path.exists():
        fail(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        fail(f"cannot read checkpoint {path}: {e}")
    saved = state["args"] = {**(implied or {}), **state.get("args", {})}
    flag = lambda f: "--" + f.replace("_", "-")
    unrecorded = unrecorded_flags(saved, model_flags)
    if unrecorded:                              # made by an older version of the script, before the flag existed
        fail(f"checkpoint {path} does not record {', '.join(unrecorded)}: it was made by an older version of the "
             "script; train it again")
    differ = [f for f in model_flags if saved[f] != getattr(args, f)]
    if differ:
        fail(f"checkpoint {path} was made with " + ", ".join(f"{flag(f)} {saved[f]}" for f in differ)
             + "; this run has " + ", ".join(f"{flag(f)} {getattr(args, f)}" for f in differ)
             + ": pass the same flags")
    return state


# ----------------------------------------------------------------------------- Frechet distance

def gaussian_stats(features):
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    x = features.double()
    return x.mean(0), torch.cov(x.T)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; FID, Heusel et al. 2017):

        d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    tr((sigma1 sigma2)^(1/2)) is computed as tr((A sigma2 A)^(1/2)) with A = sigma1^(1/2): the two products
    are similar matrices, and A sigma2 A is symmetric positive semi-definite, so its square root comes from
    a symmetric eigendecomposition (no scipy.linalg.sqrtm and no complex round-off)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    evals, evecs = torch.linalg.eigh(sigma1)
    sqrt1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt1 @ sigma2 @ sqrt1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + sigma1.trace() + sigma2.trace() - 2 * cross)


class ReferenceClassifier(nn.Module):
    """A small VGG-style CNN whose penultimate features (FEATURES-d) give the offline Frechet distance and
    whose predictions judge conditional samples. Any image size: global average pooling at the end."""
    FEATURES = 128

    def __init__(self, num_classes, channels=3):
        super().__init__()
        layers, c_in = [], channels
        for c_out in (32, 64, self.FEATURES):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())   # (B, FEATURES)
        self.head = nn.Linear(self.FEATURES, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def accuracy(model, loader, device):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y, *_ in loader:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return correct / total


def train_classifier(data, steps, device, lr=2e-3, seed=0, flip=True):
    """AdamW with a one-cycle learning rate (warm-up, then cosine decay); augmentation: circular shifts of up to
    2 pixels and, unless flip=False (digits), horizontal flips. Seeded by `seed` alone."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ReferenceClassifier(data.num_classes, data.channels).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    batches = forever(data.train)
    model.train()
    for step in tqdm(range(steps), desc="reference classifier", leave=False):
        x, y, *_ = next(batches)
        if flip:
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(3), x)
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def linear_probe(train_features, train_labels, test_features, test_labels, weight_decay=1e-4, max_iter=500):
    """Test accuracy of a multinomial logistic regression fitted to frozen features: how linearly decodable the
    labels are from them. Features are standardised with the training set's statistics; the fit is full-batch
    L-BFGS from zero weights, so the result is deterministic."""
    mean, std = train_features.float().mean(0), train_features.float().std(0).clamp(min=1e-6)
    x, x_test = (train_features.float() - mean) / std, (test_features.float() - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, train_labels) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():          # callers may sit inside torch.no_grad()
        opt.step(closure)
    with torch.no_grad():
        return ((x_test @ w + b).argmax(1) == test_labels).float().mean().item()


def _dataset_key(args):
    key = f"{args.dataset}-{args.image_size}px"
    if args.dataset in ("folder", "list"):
        key += "-" + hashlib.sha1(str(Path(args.data_dir).resolve()).encode()).hexdigest()[:8]
    return key


CLASSIFIER_STEPS = {"shapes": 500}   # optimiser steps of 128 images; shapes is easy (see README for measurements)
DEFAULT_CLASSIFIER_STEPS = 3000


def reference_classifier(args, device="cpu", steps=None):
    """The dataset's reference classifier: trained on its training split on first use (its own loader: batches
    of 128, seed 0, so the result depends on the dataset alone), then loaded from CACHE_DIR/classifiers/.
    The caller's random state is left as it was. Returns (model in eval mode, test accuracy)."""
    with torch.random.fork_rng(devices=[]):
        return _reference_classifier(args, device, steps)


def _reference_classifier(args, device, steps):
    steps = steps or CLASSIFIER_STEPS.get(args.dataset, DEFAULT_CLASSIFIER_STEPS)
    path = CACHE_DIR / "classifiers" / f"{_dataset_key(args)}-{steps}steps.pt"
    if path.exists():
        state = torch.load(path, map_location=device, weights_only=False)
        model = ReferenceClassifier(state["num_classes"], state["channels"]).to(device)
        model.load_state_dict(state["model"])
        return model.eval(), state["test_accuracy"]
    data = load_data(argparse.Namespace(**{**vars(args), "batch_size": 128, "seed": 0, "num_workers": 0,
                                            "split_sizes": None}), every_process=False)
    print(f"training the reference classifier for {args.dataset} at {args.image_size}px ({steps} steps), "
          f"cached in {path}")
    model = train_classifier(data, steps, device, flip=args.dataset not in ("mnist-color", "svhn"))
    test_accuracy = accuracy(model, data.test, device)
    print(f"reference classifier test accuracy {test_accuracy:.4f}")
    save_atomic({"model": model.state_dict(), "num_classes": data.num_classes, "channels": data.channels,
                 "test_accuracy": test_accuracy}, path)
    return model, test_accuracy


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (2048-d) with torchvision's ImageNet weights, for the standard FID.

    torchvision's weights are not the TensorFlow ones of the original FID code, so values are comparable across
    this project's runs, not digit for digit with published FIDs."""

    def __init__(self):
        super().__init__()
        from torchvision.models import Inception_V3_Weights, inception_v3
        try:
            # these ported Google weights expect inputs in [-1, 1], which our images already are
            net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1, transform_input=False)
        except (OSError, RuntimeError) as e:
            fail(f"the Inception-v3 weights could not be downloaded ({type(e).__name__}: {e}); offline, use "
                 f"--metric classifier (the Frechet distance in the reference classifier's features)")
        net.fc = nn.Identity()
        self.net = net.eval()

    def forward(self, x):                 # x in [-1, 1], any size, 1 or 3 channels
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return self.net(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))


DIVERSITY_IMAGES = 1000   # images whose pairwise feature distances measure a batch's diversity


class SampleQuality:
    """Frechet distance of generated images to a real split, in `metric` features ("classifier" or "inception"),
    and conditional accuracy for class-conditional samples. Real statistics are computed once."""

    def __init__(self, args, data, device, metric="classifier", split="test", max_real=10_000, classifier_steps=None):
        self.device, self.metric, self.split = device, metric, split
        self.classifier, self.classifier_accuracy = reference_classifier(args, device, classifier_steps)
        if metric not in ("classifier", "inception"):
            fail(f"unknown --metric {metric!r}; choose classifier or inception")
        self.features = self.classifier.body if metric == "classifier" else InceptionFeatures().to(device)
        real = []
        for x, *_ in getattr(data, split):
            real.append(self.embed(x))
            if sum(len(r) for r in real) >= max_real:
                break
        real = torch.cat(real)[:max_real]
        self.real_stats = gaussian_stats(real)
        self.n_real = len(real)
        # a fixed random subset, since a folder's images may come sorted by class
        subset = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:DIVERSITY_IMAGES]
        self.real_spread = torch.pdist(real[subset].float()).mean().item()

    @torch.no_grad()
    def embed(self, images, batch_size=250):
        return torch.cat([self.features(b.to(self.device)).double().cpu() for b in images.split(batch_size)])

    def frechet(self, images):
        """Frechet distance of images (N, C, H, W) in [-1, 1] to the real split; needs N well above 1."""
        return frechet_distance(*gaussian_stats(self.embed(images)), *self.real_stats)

    def diversity(self, images):
        """Mean pairwise feature distance of the first DIVERSITY_IMAGES images, as a share of the real split's:
        1 is as varied as the data, near 0 a collapsed generator."""
        return torch.pdist(self.embed(images[:DIVERSITY_IMAGES]).float()).mean().item() / self.real_spread

    @torch.no_grad()
    def predict(self, images):
        """The reference classifier's labels for images (N, C, H, W) in [-1, 1]."""
        return torch.cat([self.classifier(b.to(self.device)).argmax(1).cpu() for b in images.split(250)])

    def conditional_accuracy(self, images, labels):
        """Share of images drawn for class y that the reference classifier labels y."""
        return (self.predict(images) == labels.cpu()).float().mean().item()

    def describe(self, n_generated):
        return (f"Frechet distance in {self.metric} features, {n_generated} samples against "
                f"{self.n_real} {self.split} images")


# ----------------------------------------------------------------------------- condition vectors of class-conditional models
#
# A label y among K classes is the one-hot vector e_y; any other vector in R^K is a condition the model never saw.

def one_hot(y, num_classes):
    """Labels (B,) -> condition vectors (B, K)."""
    return F.one_hot(y, num_classes).float()


def interpolate(a, b, alphas, num_classes):
    """Condition vectors (1 - alpha) e_a + alpha e_b for each alpha: (len(alphas), K)."""
    ea, eb = one_hot(torch.tensor([a, b]), num_classes)
    return torch.stack([(1 - alpha) * ea + alpha * eb for alpha in alphas])


def unseen_conditions(num_classes, seed=0):
    """Named condition vectors never seen in training: their rows are what the figures and final.json show."""
    e = one_hot(torch.arange(num_classes), num_classes)
    g = torch.Generator().manual_seed(seed)
    mixes = {"mix of classes 0 and 1": e[:2].mean(0)}
    if num_classes >= 3:
        mixes["mix of classes 0, 1, 2"] = e[:3].mean(0)
    return {
        **mixes,
        "2 x class 0": 2 * e[0],
        "0.5 x class 0": 0.5 * e[0],
        "zero vector": torch.zeros(num_classes),
        "random N(0, 1/K)": torch.randn(num_classes, generator=g) / math.sqrt(num_classes),
    }


# ----------------------------------------------------------------------------- restoration quality: PSNR and SSIM
#
# Both compare an output x with the ground truth y on the images' true range: images come in [-1, 1] and are
# mapped to [0, 1] first, so that the peak signal is 1 and the numbers mean what they mean in the literature.
# With a `region` mask (N, 1, H, W) of 1s, only those pixels count (for inpainting: the pixels it filled in).

def _unit_range(x):
    return (x.float() + 1) / 2


def region_mean(values, region=None):
    """Mean over channels and pixels per image (N,), or over the pixels where region == 1 only."""
    if region is None:
        return values.mean((1, 2, 3))
    region = region.expand_as(values).float()
    return (values * region).sum((1, 2, 3)) / region.sum((1, 2, 3)).clamp(min=1)


def psnr(x, y, region=None):
    """Peak signal-to-noise ratio per image, in dB: 10 log10(1 / MSE) with images in [0, 1] (peak 1); identical
    images (MSE 0) get 100 dB."""
    mse = region_mean((_unit_range(x) - _unit_range(y)) ** 2, region)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


SSIM_SIGMA, SSIM_WINDOW = 1.5, 11           # Wang et al. 2004: an 11x11 Gaussian window with sigma 1.5
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2     # (K1 L)^2 and (K2 L)^2 with K1 = 0.01, K2 = 0.03 and range L = 1


def ssim(x, y, region=None):
    """Structural similarity per image (Wang, Bovik, Sheikh & Simoncelli 2004), averaged over channels:

        SSIM(p) = (2 mu_x mu_y + C1) (2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (sigma_x^2 + sigma_y^2 + C2))

    where mu, sigma^2 and sigma_xy are local means, variances and the covariance around pixel p, weighted by
    a Gaussian window w. It is 1 only where x and y agree in local brightness, contrast and structure. Unlike
    the paper's 'valid' windows, the images are padded by replication so every pixel gets a value (16px
    images would keep only 6x6 of them). The score is the map's mean. With a region r (1 = counts), both the
    statistics and the mean use only the region's pixels: the window weights become w r / sum(w r), so an
    inpainted region is judged on its own pixels, not on the exact observed ones its windows overlap."""
    x, y = _unit_range(x), _unit_range(y)
    c, r = x.shape[1], SSIM_WINDOW // 2
    g = torch.exp(-(torch.arange(SSIM_WINDOW, dtype=torch.float32, device=x.device) - r) ** 2 / (2 * SSIM_SIGMA ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(c, 1, -1, -1)       # one 2-D window per channel
    blur = lambda z: F.conv2d(F.pad(z, (r, r, r, r), mode="replicate"), window, groups=c)
    weight = torch.ones_like(x) if region is None else region.float().expand_as(x)
    norm = blur(weight).clamp(min=1e-8)
    local = lambda z: blur(z * weight) / norm                   # weighted local mean over the region's pixels
    mu_x, mu_y = local(x), local(y)
    var_x, var_y, cov = local(x * x) - mu_x ** 2, local(y * y) - mu_y ** 2, local(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
                / ((mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (var_x + var_y + SSIM_C2)))
    return region_mean(ssim_map, region)


# ----------------------------------------------------------------------------- hyperparameter table

def check_sweep_run(directory, run_args, free):
    """A sweep reuses (or resumes) the run in `directory` only if all its flags but the `free` ones (those that
    may differ between runs: names, devices, workers) equal this run's, the swept value included."""
    path = Path(directory) / "args.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(vars(run_args), default=str))       # as args.json stores them (tuples as lists)
    for key, value in current.items():
        if key not in free and saved.get(key) != value:
            fail(f"{directory} was made with --{key.replace('_', '-')} {saved.get(key)}; this sweep has "
                 f"{value}: give a sweep with other flags its own --name")


def runs_table(root):
    """Markdown table of the runs under `root`: the flags that differ between them, then their final metrics."""
    rows = []
    for final in sorted(Path(root).glob("*/final.json")):
        args_path = final.parent / "args.json"
        args = json.loads(args_path.read_text()) if args_path.exists() else {}
        rows.append((final.parent.name, args, json.loads(final.read_text())))
    if not rows:
        fail(f"no finished runs (*/final.json) under {root}")
    ignore = {"name", "out", "resume", "device", "num_workers", "data_dir"}
    flags = sorted(k for k in {k for _, a, _ in rows for k in a} - ignore
                   if len({json.dumps(a.get(k)) for _, a, _ in rows}) > 1)
    metrics = list(dict.fromkeys(k for _, _, f in rows for k, v in f.items() if isinstance(v, (int, float))))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| run | " + " | ".join([f"--{f.replace('_', '-')}" for f in flags] + metrics) + " |",
             "|" + "---|" * (1 + len(flags) + len(metrics))]
    for name, args, final in rows:
        lines.append(f"| {name} | " + " | ".join([fmt(args.get(f)) for f in flags] + [fmt(final.get(m)) for m in metrics])
                     + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Shared tools of the course scripts.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="Markdown table of runs: differing flags against final metrics")
    t.add_argument("root", help="a script's runs folder, e.g. runs/ddpm")
    c = sub.add_parser("classifier", help="train (or load) the reference classifier and print its test accuracy")
    c.add_argument("--dataset", default="shapes", help=f"one of {', '.join(DATASETS)}")
    c.add_argument("--data-dir", default="data", help="where real datasets are; the root for folder/list")
    c.add_argument("--image-size", type=int, default=32, help="images are resized to this many pixels square")
    c.add_argument("--steps", type=int, default=None,
                   help=f"training steps of 128 images (default: {CLASSIFIER_STEPS} or {DEFAULT_CLASSIFIER_STEPS})")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    args = p.parse_args(argv)
    if args.command == "table":
        print(runs_table(args.root))
    else:
        args.num_workers, args.seed = 0, 0
        model, acc = reference_classifier(args, get_device(args.device), steps=args.steps)
        print(f"{args.dataset} {args.image_size}px reference classifier: {count_parameters(model):,} parameters, "
              f"test accuracy {acc:.4f} (cached in {CACHE_DIR / 'classifiers'})")


if __name__ == "__main__":
    main()
