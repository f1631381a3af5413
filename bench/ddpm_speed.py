"""ddpm.py speed: training images/s under each speed option, and sampling seconds per image, DDPM vs DDIM.

    python bench/ddpm_speed.py                         # default model, batch 64, 32x32 (the issue's setting)
    python bench/ddpm_speed.py --image-size 16         # the default run's image size

Training variants are timed interleaved, round after round, and reported as medians and as ratios to plain
fp32: absolute speed drifts 25-40% within an hour on a shared CPU, ratios much less. Run it alone.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddpm  # noqa: E402

VARIANTS = {  # name: (channels_last, amp)
    "fp32": (False, "off"),
    "fp32 + channels_last": (True, "off"),
    "bf16 autocast + channels_last": (True, "bf16"),
}


def train_step_time(model, opt, schedule, x, args, steps):
    device = torch.device("cpu")
    start = None
    for i in range(steps + 2):                 # two warm-up steps
        if i == 2:
            start = time.perf_counter()
        with ddpm.autocast(args, device):
            loss = ddpm.loss(model, x, schedule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--samples", type=int, default=16, help="images per sampling measurement")
    args, rest = p.parse_known_args(argv)
    model_args = ddpm.get_args(["--image-size", str(args.image_size), *rest])
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {args.image_size}px, "
          f"batch {args.batch_size}")

    setups = {}
    for name, (channels_last, amp) in VARIANTS.items():
        model, schedule = ddpm.build(model_args, 3)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(memory_format=fmt)
        setups[name] = (model, opt, schedule, x, argparse.Namespace(amp=amp))
    params = sum(p.numel() for p in setups["fp32"][0].parameters())
    print(f"U-Net: {params:,} parameters")
    times = {name: [] for name in setups}
    for r in range(args.rounds):
        for name, (model, opt, schedule, x, run_args) in setups.items():
            times[name].append(train_step_time(model, opt, schedule, x, run_args, args.steps))
    base = statistics.median(times["fp32"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  train {name:32s} {args.batch_size / med:7.1f} img/s   {base / med:.2f}x fp32")

    model, _, schedule, _, _ = setups["fp32 + channels_last"]
    model.eval()
    for sampler, steps in (("ddim", 50), ("ddpm", schedule.timesteps)):
        start = time.perf_counter()
        ddpm.sample(model, schedule, args.samples, args.image_size, sampler=sampler, sample_steps=steps)
        per_image = (time.perf_counter() - start) / args.samples
        print(f"  sample {sampler} {steps:4d} steps: {per_image:.3f} s/image (batch {args.samples}, fp32)")


if __name__ == "__main__":
    main()
