"""ddpm.py speed: training images/s under each speed option, and sampling seconds per image, DDPM vs DDIM
(and DDIM-50 autoguided: ddpm.py's default sampler, which runs 100 steps).

    python bench/ddpm_speed.py                         # default model, batch 64, 32x32 (the issue's setting)
    python bench/ddpm_speed.py --image-size 16         # the default run's image size
    python bench/ddpm_speed.py --reference             # also the Unet of denoising_diffusion_pytorch (see below)
    python bench/ddpm_speed.py --compile               # also torch.compile (about 2 minutes to compile)
    python bench/ddpm_speed.py --image-size 16 --versus "--blocks 2 --attn-res 8"
                                                       # also another U-Net shape (here the paper's), in bf16
    python bench/ddpm_speed.py --device cuda --channels 128 --channel-mult 1,2,2,2 --blocks 2 --attn-res 16 \
        --batch-size 128                               # the paper's CIFAR-10 U-Net on a GPU (ddpm.py's flags pass through)

Every variant runs the same training step (ddpm.loss with uniform t: the default --t-dist lognormal's draw adds
0.09 ms a batch, see the README; backward, AdamW) on the same batch; variants are timed
interleaved, round after round, and reported as medians and as ratios to plain fp32: absolute speed drifts
25-40% within an hour on a shared CPU, ratios much less. Run it alone on an idle machine.

--reference adds the widely used Unet of lucidrains' denoising_diffusion_pytorch (dim 32, dim_mults 1,2,2:
1.41M parameters) under the same loop, fp32. It is a benchmark baseline only, never a dependency of the project;
install it in a separate environment that reuses this torch:
    python -m venv --system-site-packages /tmp/refvenv && /tmp/refvenv/bin/pip install denoising_diffusion_pytorch
    /tmp/refvenv/bin/python bench/ddpm_speed.py --reference
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import ddpm  # noqa: E402

VARIANTS = {  # name: (channels_last, amp, fused AdamW, torch.compile)
    "fp32": (False, "off", False, False),
    "fp32 + fused AdamW": (False, "off", True, False),
    "fp32 + fused AdamW + channels_last": (True, "off", True, False),
    "bf16 autocast + fused AdamW": (False, "bf16", True, False),
    "bf16 autocast + fused AdamW + channels_last": (True, "bf16", True, False),
}
COMPILED = "fp32 + fused AdamW + channels_last + compile"
REFERENCE = "denoising_diffusion_pytorch Unet, fp32"
VERSUS = "--versus U-Net, bf16 autocast + fused AdamW"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds_per_call(fn, steps, device, warmup=2):
    """Mean wall time of fn() over `steps` calls after `warmup` untimed ones (the other bench scripts use it)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def train_step_time(model, opt, schedule, x, amp, steps):
    start = None
    for i in range(steps + 2):                 # two warm-up steps (and, for compile, the compilation)
        if i == 2:
            synchronize(x.device)
            start = time.perf_counter()
        with common.autocast(amp, x.device):
            loss = ddpm.loss(model, x, schedule, self_cond=getattr(model, "self_cond", False))   # --self-cond
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    synchronize(x.device)
    return (time.perf_counter() - start) / steps


def training_flops(model, schedule, image_size):
    """Floating-point operations of one training image (forward and backward), counted by PyTorch. With --self-cond
    this counts one draw of the loss's coin: with or without the extra forward pass (0.49 or 0.37 GFLOP at 16px)."""
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        ddpm.loss(model, x, schedule, self_cond=getattr(model, "self_cond", False)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def reference_unet():
    try:
        from denoising_diffusion_pytorch import Unet
    except ImportError:
        sys.exit("error: --reference needs denoising_diffusion_pytorch; install it in a separate environment "
                 "(see this script's docstring)")
    return Unet(dim=32, dim_mults=(1, 2, 2), flash_attn=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--samples", type=int, default=16, help="images per sampling measurement; 0: skip sampling")
    p.add_argument("--reference", action="store_true", help="also time denoising_diffusion_pytorch's Unet")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd U-Net")
    p.add_argument("--versus", default=None,
                   help='also time the U-Net that these ddpm.py flags build, e.g. "--blocks 2 --attn-res 8"')
    args, rest = p.parse_known_args(argv)
    model_args = ddpm.get_args(["--image-size", str(args.image_size), *rest])
    versus_args = args.versus and ddpm.get_args(["--image-size", str(args.image_size), *rest, *args.versus.split()])
    device = common.get_device(model_args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads, image {args.image_size}px, "
          f"batch {args.batch_size}")

    variants = dict(VARIANTS)
    if args.compile:
        variants[COMPILED] = (True, "off", True, True)
    if args.reference:
        variants[REFERENCE] = (False, "off", True, False)
    if args.versus:
        variants[VERSUS] = (False, "bf16", True, False)
    setups = {}
    for name, (channels_last, amp, fused, compiled) in variants.items():
        model = (reference_unet() if name == REFERENCE else
                 ddpm.build(versus_args if name == VERSUS else model_args, 3)[0])
        schedule = ddpm.Schedule(model_args.timesteps, model_args.schedule)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model, schedule = model.to(device, memory_format=fmt), schedule.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
        flops = training_flops(model, schedule, args.image_size)
        setups[name] = (torch.compile(model) if compiled else model, opt, schedule, x, amp)
        print(f"  {name}: {common.count_parameters(model):,} parameters, "
              f"{flops / 1e9:.2f} GFLOP per training image (forward + backward)")
    times = {name: [] for name in setups}
    for r in range(args.rounds):
        for name, (model, opt, schedule, x, amp) in setups.items():
            times[name].append(train_step_time(model, opt, schedule, x, amp, args.steps))
    base = statistics.median(times["fp32"])
    for name, t in times.items():
        med = statistics.median(t)
        ref = f"   {statistics.median(times[REFERENCE]) / med:.2f}x the reference" if args.reference else ""
        print(f"  train {name:46s} {args.batch_size / med:7.1f} img/s   {base / med:.2f}x fp32{ref}")

    if args.samples:
        model, _, schedule, _, _ = setups["fp32 + fused AdamW + channels_last"]
        model.eval()
        guided = ddpm.Autoguided(model, copy.deepcopy(model), 2.0)   # ddpm.py's default: two networks per step
        for sampler, steps, network, what in (("ddim", 50, model, ""), ("ddim", 50, guided, ", autoguided"),
                                              ("ddpm", schedule.timesteps, model, "")):
            start = time.perf_counter()
            ddpm.sample(network, schedule, args.samples, args.image_size, sampler=sampler, sample_steps=steps)
            synchronize(device)
            per_image = (time.perf_counter() - start) / args.samples
            print(f"  sample {sampler} {steps:4d} steps{what}: {per_image:.3f} s/image (batch {args.samples}, fp32)")


if __name__ == "__main__":
    main()
