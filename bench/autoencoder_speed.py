"""autoencoder.py speed: training steps per second (distortions, forward, loss, backward, Adam step) per variant.

    python bench/autoencoder_speed.py                      # default network, batch 64, 32x32 (the default run)
    python bench/autoencoder_speed.py --device cuda --batch-size 256

Every variant runs the script's own distortions, network and loss on the same batch; variants are timed
interleaved, round after round, and reported as medians and as ratios to the default (fp32, channels_last,
which train() uses): absolute speed drifts 25-40% within an hour on a shared CPU, ratios much less. Run it alone.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import autoencoder as ae  # noqa: E402
import common  # noqa: E402
from ddpm_speed import seconds_per_call  # noqa: E402  (bench/ is on the path when a bench script runs)

VARIANTS = {    # name: (extra flags, channels_last)
    "default (128-d bottleneck), channels_last": ([], True),
    "default, contiguous": ([], False),
    "default, bf16 autocast + channels_last": (["--amp", "bf16"], True),
    "--up upsample": (["--up", "upsample"], True),
    "--latent-dim 0 --skip none": (["--latent-dim", "0"], True),
    "--latent-dim 0 --skip add": (["--latent-dim", "0", "--skip", "add"], True),
    "--latent-dim 0 --skip concat": (["--latent-dim", "0", "--skip", "concat"], True),
}
BASE = "default (128-d bottleneck), channels_last"


def step(model, opt, x, items, args, channels_last):
    g = torch.Generator().manual_seed(0)
    choice = torch.randint(len(items), (len(x),), generator=g)
    net_input, target, _, _ = ae.make_pair(x, None, args.task, items, choice, g)
    if channels_last:
        net_input = net_input.contiguous(memory_format=torch.channels_last)
    with common.autocast(args.amp, x.device):
        out = model(net_input)
    loss = ae.loss_fn(out, target, args.task)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    args, rest = p.parse_known_args(argv)
    device = common.get_device(ae.get_args(rest).device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads, image {args.image_size}px, "
          f"batch {args.batch_size}")
    setups = {}
    for name, (extra, channels_last) in VARIANTS.items():
        torch.manual_seed(0)
        model_args = ae.get_args(["--image-size", str(args.image_size), *extra, *rest])
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = ae.build(model_args, 3).to(device, memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
        setups[name] = (model, opt, x, ae.parse_distortions(model_args.distort), model_args, channels_last)
        print(f"  {name}: {common.count_parameters(model):,} parameters")
    times = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, setup in setups.items():
            times[name].append(seconds_per_call(lambda: step(*setup), args.steps, device))
    base = statistics.median(times[BASE])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:44s} {1 / med:6.2f} it/s  {args.batch_size / med:7.1f} img/s   {base / med:.2f}x default")


if __name__ == "__main__":
    main()
