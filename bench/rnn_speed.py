"""rnn.py speed: classification training steps per second (forward, cross-entropy, backward, clipping, Adam) per
variant, on real batches of the embedded stdlib set.

    python bench/rnn_speed.py                           # the default run's network and batches
    python bench/rnn_speed.py --device cuda --batch-size 256

Every variant trains on the same BATCHES length-bucketed batches, as the script serves them; variants are timed
interleaved, round after round, and reported as medians and as ratios to the default (padded batches, fp32):
absolute speed drifts 25-40% within an hour on a shared CPU, ratios much less. Run it alone.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rnn  # noqa: E402
from ddpm_speed import seconds_per_call  # noqa: E402  (bench/ is on the path when a bench script runs)

BATCHES = 8
VARIANTS = {
    "default (lstm, padded, fp32)": [],
    "--packed": ["--packed"],
    "--amp bf16": ["--amp", "bf16"],
    "--cell gru": ["--cell", "gru"],
    "--cell rnn": ["--cell", "rnn"],
    "--bidirectional": ["--bidirectional"],
    "--bidirectional --packed": ["--bidirectional", "--packed"],
    "--layers 2": ["--layers", "2"],
}
BASE = "default (lstm, padded, fp32)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=BATCHES, help="timed steps per variant per round")
    args, rest = p.parse_known_args(argv)
    base_args = rnn.get_args(rest)
    device = common.get_device(base_args.device)
    splits, classes, vocab = rnn.prepare_classification(base_args)
    index = splits[0].batches(base_args.batch_size, torch.Generator().manual_seed(0))[:BATCHES]
    batches = [splits[0].batch(i, device) for i in index]
    mean_length = sum(lengths.float().mean().item() for _, lengths, _ in batches) / len(batches)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads, batch {base_args.batch_size}, "
          f"mean length {mean_length:.0f} characters")
    setups = {}
    for name, extra in VARIANTS.items():
        torch.manual_seed(0)
        model_args = rnn.get_args([*rest, *extra])
        model = rnn.build_classifier(model_args, splits, classes, vocab).to(device)
        setups[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3), model_args, iter(()))
        print(f"  {name}: {common.count_parameters(model):,} parameters")

    def step(name):
        model, opt, model_args, it = setups[name]
        batch = next(it, None)
        if batch is None:                               # cycle through the same batches
            setups[name] = (model, opt, model_args, iter(batches))
            batch = next(setups[name][3])
        x, lengths, y = batch
        with common.autocast(model_args.amp, device):
            loss = F.cross_entropy(model(x, lengths).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), model_args.clip)
        opt.step()

    times = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name in setups:
            times[name].append(seconds_per_call(lambda: step(name), args.steps, device))
    base = statistics.median(times[BASE])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:30s} {1 / med:6.2f} it/s  {base_args.batch_size / med:7.1f} seq/s   {base / med:.2f}x default")


if __name__ == "__main__":
    main()
