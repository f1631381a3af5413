"""Data-parallel speed: a training script's steps per second in one process and in N processes under torchrun.

    python bench/ddp_speed.py                                   # ddpm.py's default run, 1 process vs 2 (Gloo, CPU)
    python bench/ddp_speed.py --processes 4 --threads 1 -- --device auto   # on a 4-GPU machine (NCCL)

Each configuration trains the same command for --steps and for 2 x --steps optimiser steps; the difference of the
two wall times is the time of --steps steps, without start-up, data loading and the final evaluation. The
configurations run interleaved, round after round, and are reported as medians and as a ratio to one process:
absolute speed drifts within an hour on a shared CPU. On a CPU the processes share its cores, so the question
is whether splitting the batch over processes costs more (gradient exchange, smaller matrix products) than it
saves; on GPUs each process has its own.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall_time(command, threads, steps, out):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([*command, "--steps", str(steps), "--out", out, "--name", f"s{steps}-{time.time_ns()}"],
                   env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--script", default="ddpm.py")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the single process")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    args, rest = p.parse_known_args(argv)
    rest = [r for r in rest if r != "--"]
    # the final evaluation is subtracted away; small evaluation splits keep it short all the same
    flags = ["--split-sizes", "50000,640,640", "--eval-every", "100000", "--fid-samples", "0", *rest]
    script = str(ROOT / args.script)
    configs = {
        f"1 process x {args.threads} threads": ([sys.executable, script, *flags], args.threads),
        f"{args.processes} processes x {max(1, args.threads // args.processes)} threads (torchrun)":
            ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
              script, *flags], max(1, args.threads // args.processes)),
    }
    batch = next((int(rest[i + 1]) for i, r in enumerate(rest[:-1]) if r == "--batch-size"), None)
    times = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as out:
        for r in range(args.rounds):
            for name, (command, threads) in configs.items():
                seconds = wall_time(command, threads, 2 * args.steps, out) - wall_time(command, threads, args.steps, out)
                times[name].append(seconds)
                print(f"round {r + 1}, {name}: {args.steps / seconds:.2f} steps/s")
    base = statistics.median(next(iter(times.values())))
    print(f"\n{args.script}, {args.steps} steps per measurement, medians of {args.rounds} rounds"
          + (f", global batch {batch}" if batch else ", the script's default global batch"))
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name}: {args.steps / median:.2f} steps/s ({base / median:.2f}x)")


if __name__ == "__main__":
    main()
