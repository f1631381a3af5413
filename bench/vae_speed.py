"""vae.py and cvae.py speed: training steps per second (forward, loss, backward, Adam step) per variant.

    python bench/vae_speed.py                       # default networks, batch 64, 32x32 (the default run)
    python bench/vae_speed.py --image-size 64       # Higgins et al.'s size
    python bench/vae_speed.py --device cuda --batch-size 256

Every variant runs the scripts' own model, reconstruction term, KL and objective on the same batch; variants are
timed interleaved, round after round, and reported as medians and as ratios to plain fp32 vae.py: absolute speed
drifts 25-40% within an hour on a shared CPU, ratios much less. Run it alone on an idle machine.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import cvae  # noqa: E402
import vae  # noqa: E402
from ddpm_speed import seconds_per_call  # noqa: E402  (bench/ is on the path when a bench script runs)

K = 10          # classes for cvae.py's variants
VARIANTS = {    # name: (script, extra flags, channels_last)
    "vae fp32": (vae, [], False),
    "vae fp32 + channels_last": (vae, [], True),
    "vae bf16 autocast": (vae, ["--amp", "bf16"], False),
    "vae bf16 autocast + channels_last": (vae, ["--amp", "bf16"], True),
    "cvae fp32": (cvae, [], False),
}


def step(script, model, opt, x, v, args):
    inputs = (x, v) if script is cvae else (x,)
    with common.autocast(args.amp, x.device):
        out, mu, logvar = model(*inputs)
    recon = script.reconstruction_nll(out, x, args.recon, args.sigma)
    loss = script.objective(recon, script.kl_per_dimension(mu.float(), logvar.float()), args.beta).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant per round")
    args, rest = p.parse_known_args(argv)
    device = common.get_device(vae.get_args(rest).device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads, image {args.image_size}px, "
          f"batch {args.batch_size}")
    setups = {}
    for name, (script, extra, channels_last) in VARIANTS.items():
        torch.manual_seed(0)
        model_args = script.get_args(["--image-size", str(args.image_size), *extra, *rest])
        model = script.build(model_args, K, 3) if script is cvae else script.build(model_args, 3)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(device, memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = (torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1).to(
            memory_format=fmt)
        v = common.one_hot(torch.arange(args.batch_size, device=device) % K, K)
        setups[name] = (script, model, opt, x, v, model_args)
        print(f"  {name}: {common.count_parameters(model):,} parameters")
    times = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, setup in setups.items():
            times[name].append(seconds_per_call(lambda: step(*setup), args.steps, device))
    base = statistics.median(times["vae fp32"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:36s} {1 / med:6.2f} it/s  {args.batch_size / med:7.1f} img/s   {base / med:.2f}x vae fp32")


if __name__ == "__main__":
    main()
