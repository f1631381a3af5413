"""gan.py and cgan.py speed: G+D iterations per second (one D step and one G step on a batch) per variant.

    python bench/gan_speed.py                          # default networks, batch 64, 32x32 (the default run)
    python bench/gan_speed.py --image-size 16          # cgan.py's default run's size
    python bench/gan_speed.py --image-size 64          # DCGAN's own size
    python bench/gan_speed.py --device cuda --batch-size 128 --g-channels 128 --d-channels 128   # a GPU

Every variant runs gan.py's (or cgan.py's) own d_step and g_step on the same real batch; variants are timed
interleaved, round after round, and reported as medians and as ratios to plain fp32 gan.py: absolute speed drifts
25-40% within an hour on a shared CPU, ratios much less. Run it alone on an idle machine.
Extra flags (the GPU line's channels) reach every variant after its own, so they override the variants' flags.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cgan  # noqa: E402
import common  # noqa: E402
import gan  # noqa: E402
from ddpm_speed import seconds_per_call  # noqa: E402  (bench/ is on the path when a bench script runs)

K = 10          # classes for cgan.py's variants
VARIANTS = {    # name: (script, extra flags, channels_last); float32 is asked for, since the scripts default to --amp auto
    "gan fp32": (gan, ["--amp", "off"], False),
    "gan fp32 + channels_last": (gan, ["--amp", "off"], True),
    "gan bf16 autocast": (gan, ["--amp", "bf16"], False),
    "gan bf16 autocast + channels_last": (gan, ["--amp", "bf16"], True),
    "gan bf16 autocast, DCGAN's output layer (--g-out deconv)": (gan, ["--amp", "bf16", "--g-out", "deconv"], False),
    "gan fp32, spectral norm in D": (gan, ["--amp", "off", "--spectral-norm"], False),
    "gan fp32, R1 penalty (double backward)": (gan, ["--amp", "off", "--r1", "1"], False),
    # gan.py's 64-channel D, so that these rows measure what conditioning costs (cgan.py's default D has 128)
    "cgan fp32, cbn G + projection D": (cgan, ["--amp", "off", "--d-cond", "projection", "--d-channels", "64"], False),
    "cgan fp32, cbn G + acgan D": (cgan, ["--amp", "off", "--d-cond", "acgan", "--d-channels", "64"], False),
    "cgan fp32, cbn G + acgan D, 128-channel D": (cgan, ["--amp", "off", "--d-cond", "acgan"], False),
    "cgan bf16 autocast, cbn G + acgan D, 128-channel D": (cgan, ["--d-cond", "acgan", "--amp", "bf16"], False),
    "cgan bf16 autocast, cbn G + acgan D, 128-channel D, DCGAN's output layer (--g-out deconv)":
        (cgan, ["--d-cond", "acgan", "--amp", "bf16", "--g-out", "deconv"], False),
    "cgan bf16 autocast + channels_last, 128-channel D": (cgan, ["--d-cond", "acgan", "--amp", "bf16"], True),
}


def iteration(script, G, D, opt_g, opt_d, x, c, args):
    if script is cgan:
        script.d_step(G, D, opt_d, x, c, args, 0.0)
        script.g_step(G, D, opt_g, c, args, 0.0)
    else:
        script.d_step(G, D, opt_d, x, args, 0.0)
        script.g_step(G, D, opt_g, len(x), args, 0.0, x.device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed iterations per variant per round")
    args, rest = p.parse_known_args(argv)
    device = common.get_device(gan.get_args(rest).device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads, image {args.image_size}px, "
          f"batch {args.batch_size}")
    setups = {}
    for name, (script, extra, channels_last) in VARIANTS.items():
        torch.manual_seed(0)
        model_args = script.get_args(["--image-size", str(args.image_size), *extra, *rest])
        G, D = script.build(model_args, K, 3) if script is cgan else script.build(model_args, 3)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        G, D = G.to(device, memory_format=fmt), D.to(device, memory_format=fmt)
        opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
        c = common.one_hot(torch.arange(args.batch_size, device=device) % K, K)
        setups[name] = (script, G, D, opt_g, opt_d, x, c, model_args)
        print(f"  {name}: G {common.count_parameters(G):,}, D {common.count_parameters(D):,} parameters")
    times = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, setup in setups.items():
            times[name].append(seconds_per_call(lambda: iteration(*setup), args.steps, device))
    base = statistics.median(times["gan fp32"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:42s} {1 / med:6.2f} it/s  {args.batch_size / med:7.1f} img/s   {base / med:.2f}x gan fp32")


if __name__ == "__main__":
    main()
