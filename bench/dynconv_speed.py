"""dynconv.py speed: inference milliseconds per image and training images per second, per model and channels given.

    python bench/dynconv_speed.py                      # default networks, 32x32, --amp auto as the default run
    python bench/dynconv_speed.py --amp off --rounds 7

Every variant runs the script's own model (untrained: speed does not depend on the weights) on the same random
batch; variants are timed interleaved, round after round, and reported as medians and as ratios to the
zero-filled model with all channels: absolute speed drifts 25-40% within an hour on a shared CPU, ratios much
less. Run it alone on an idle machine. A training step here is forward, cross-entropy, backward and AdamW on
one combination (per-combination's step in dynconv.py trains all seven networks: seven of these).
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import dynconv  # noqa: E402
from ddpm_speed import seconds_per_call  # noqa: E402  (bench/ is on the path when a bench script runs)

VARIANTS = {"zero": [], "mean": [], "per-combination": [], "dynamic": [],
            "dynamic --no-channel-path": ["--no-channel-path"], "dynamic --prior none": ["--prior", "none"]}
ORDERS = {"RGB": (0, 1, 2), "R": (0,)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed calls per variant per round")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (inference: twice this)")
    args, rest = p.parse_known_args(argv)
    setups = {}
    for name, extra in VARIANTS.items():
        model_args = dynconv.get_args([*rest, *extra])
        model_args.model = name.split()[0]
        device = common.get_device(model_args.device)
        torch.manual_seed(0)
        model = dynconv.build(model_args, 3, 10).to(device)
        opt = torch.optim.AdamW(model.parameters())
        for combo, order in ORDERS.items():
            x = torch.randn(2 * args.batch_size, len(order), model_args.image_size, model_args.image_size, device=device)
            y = torch.randint(10, (args.batch_size,), device=device)
            setups[f"{name}, {combo}"] = (model, opt, x, y, order, model_args.amp, device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads, "
          f"image {model_args.image_size}px, --amp {model_args.amp}")

    def infer(model, opt, x, y, order, amp, device):
        model.eval()
        with torch.no_grad(), common.autocast(amp, device):
            model(x, order)

    def train(model, opt, x, y, order, amp, device):
        model.train()
        with common.autocast(amp, device):
            loss = F.cross_entropy(model(x[:len(y)], order).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {(name, kind): [] for name in setups for kind in ("infer", "train")}
    for _ in range(args.rounds):
        for name, setup in setups.items():
            times[name, "infer"].append(seconds_per_call(lambda: infer(*setup), args.steps, device))
            times[name, "train"].append(seconds_per_call(lambda: train(*setup), args.steps, device))
    base = {kind: statistics.median(times["zero, RGB", kind]) for kind in ("infer", "train")}
    for name in setups:
        infer_s, train_s = (statistics.median(times[name, kind]) for kind in ("infer", "train"))
        print(f"  {name:28s} inference {1000 * infer_s / (2 * args.batch_size):.3f} ms/image "
              f"({base['infer'] / infer_s:.2f}x)   training {args.batch_size / train_s:7.1f} img/s "
              f"({base['train'] / train_s:.2f}x)")


if __name__ == "__main__":
    main()
