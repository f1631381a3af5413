"""Several processes under torchrun (Gloo on the CPU): each takes its shard of the same global batches, a
2-process run follows a 1-process run's loss trajectory at the same global batch, a resumed 2-process run
continues exactly (each process with its own dropout masks), rank 0 alone writes, every training script runs,
and weights that drift apart stop the run. Also fp16's gradient scaler and autocast."""
import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import dynconv
import rnn

ROOT = Path(__file__).resolve().parents[1]


def torchrun(tmp_path, script, *flags, processes=2):
    """Run a script (a project script's name, or a path) under torchrun; returns the completed process.

    Known open problem: as the processes leave, after their work, one of them sometimes aborts in Gloo's C++ code
    ("terminate called without an active exception", SIGABRT): in 2 of about 30 launches under the whole suite's
    load, none of 16 alone, 1 of 4 with another job loading both cores, and once the same launch twice in a row.
    A launch in which a process died of SIGABRT or SIGSEGV (no Python-level error does: those exit with 1) is
    tried up to three times, each from a clean output folder; any other failure fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLCOURSE_CACHE": str(common.CACHE_DIR)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / script), *flags]
    before = set(tmp_path.rglob("*"))
    for attempt in range(3):
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        crashed = re.search(r"exitcode\s*:\s*-(6|11)\b", result.stderr) or "terminate called" in result.stderr
        if result.returncode == 0 or not crashed:
            return result
        for path in sorted(set(tmp_path.rglob("*")) - before, reverse=True):   # what the aborted launch made
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return result


def records(run_dir, split="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def as_rank(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


# ----------------------------------------------------------------------------- shards, without processes

def test_the_shards_of_the_processes_make_up_the_global_batches(monkeypatch):
    dataset = common.ImageArray(torch.zeros(40, 1, 2, 2, dtype=torch.uint8), torch.arange(40))
    single = [y for _, y in common.make_loader(dataset, 8, shuffle=True, seed=3, drop_last=True)]
    shards = []
    for rank in range(4):
        as_rank(monkeypatch, rank, 4)
        shards.append([y for _, y in common.make_loader(dataset, 8, shuffle=True, seed=3, drop_last=True,
                                                        shard=True)])
    assert len(single) == 5 and all(len(s) == 5 for s in shards)
    for step, batch in enumerate(single):
        assert all(len(s[step]) == 2 for s in shards)
        assert torch.equal(torch.stack([s[step] for s in shards], 1).flatten(), batch)   # rank r: every 4th from r


def test_rnn_processes_take_their_shards_of_the_same_epoch_batches(monkeypatch):
    """The 2-process rnn run matches the 1-process one even if every process trained on the whole batch (the
    averaged gradient would be the same), so the sharding of rnn.py's own batches is checked here."""
    split = rnn.SequenceSplit([torch.zeros(n % 7 + 1, dtype=torch.long) for n in range(40)], torch.arange(40))
    args = argparse.Namespace(batch_size=8, seed=3)
    as_rank(monkeypatch, 0, 1)
    single = list(itertools.islice(rnn.epoch_batches(split, args, start=2), 12))    # into the third epoch
    shards = []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        shards.append(list(itertools.islice(rnn.epoch_batches(split, args, start=2), 12)))
    for step, batch in enumerate(single):
        assert [len(s[step]) for s in shards] == [4, 4]
        assert torch.equal(torch.stack([s[step] for s in shards], 1).flatten(), batch)


def test_only_rank_0_may_write_a_runs_files(tmp_path):
    run = common.Run("test", argparse.Namespace(out=tmp_path, name="r", resume=False))
    run.main = False                                                    # what is_main() gives on rank 1
    writers = {"ckpt.pt": lambda: run.save_checkpoint(1, model={}),
               "g.png": lambda: run.save_grid(torch.zeros(1, 3, 4, 4), "g.png"),
               "l.png": lambda: run.save_labelled_grid([torch.zeros(1, 3, 4, 4)], "l.png", ["a"], ["b"]),
               "loss.png": lambda: run.plot_losses(),
               "p.png": lambda: run.plot_panels({"loss": ["loss"]}, "p.png"),
               "final.json": lambda: run.finish({})}
    for filename, write in writers.items():
        with pytest.raises(RuntimeError, match=f"asked to write {filename}: only rank 0"):
            write()
    assert sorted(p.name for p in run.dir.iterdir()) == ["args.json"]


def test_a_batch_that_does_not_split_evenly_is_refused(monkeypatch):
    as_rank(monkeypatch, 0, 3)
    dataset = common.ImageArray(torch.zeros(40, 1, 2, 2, dtype=torch.uint8), torch.arange(40))
    with pytest.raises(SystemExit, match="--batch-size 8 does not split evenly over 3 processes"):
        common.make_loader(dataset, 8, shuffle=True, shard=True)


def test_each_process_crops_its_shard_as_one_process_crops_the_batch(monkeypatch):
    x = torch.randn(6, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    whole = dynconv.augment(x, g)
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        g_rank = torch.Generator().manual_seed(0)
        assert torch.equal(dynconv.augment(x[rank::2], g_rank), whole[rank::2])
        assert torch.equal(g_rank.get_state(), g.get_state())      # the processes' generators stay in step


def test_each_process_seeds_its_own_noise(monkeypatch):
    draws = []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        common.seed_everything(7)
        draws.append(torch.randn(4))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    common.seed_everything(7)
    assert torch.equal(torch.randn(4), draws[0]) and not torch.equal(draws[0], draws[1])


def test_fp16_autocast_has_a_gradient_scaler_and_bf16_none():
    cpu = torch.device("cpu")
    assert common.grad_scaler("fp16", cpu).is_enabled()
    assert not any(common.grad_scaler(amp, cpu).is_enabled() for amp in ("off", "bf16", "auto"))
    with common.autocast("fp16", cpu):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float16
    with common.autocast("bf16", cpu):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16


def test_the_scaler_skips_a_step_whose_gradients_overflowed():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = common.grad_scaler("fp16", torch.device("cpu"))
    scale = scaler.get_scale()
    scaler.scale(p.sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(3)) and scaler.get_scale() == scale / 2


# ----------------------------------------------------------------------------- under torchrun

def end_marker_csv(path, n=400, seed=0):
    """Random a/b strings whose class is their last character (as in test_rnn)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["x", "y"])
        rows.append("".join(rng.choice(["a", "b"], rng.integers(3, 25))) + label + f",{label}\n")
    path.write_text("text,label\n" + "".join(rows))


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    end_marker_csv(root / "train.csv")
    end_marker_csv(root / "test.csv", 100, seed=1)
    return root


def rnn_flags(csv_dir, out, *extra):
    return ["--dataset", "csv", "--data-dir", str(csv_dir), "--hidden", "16", "--embed", "8", "--batch-size", "16",
            "--device", "cpu", "--lr", "1e-2", "--eval-every", "10", "--out", str(out), *extra]


def test_two_processes_follow_one_process_at_the_same_global_batch(tmp_path, csv_dir):
    """Dropout off, so the loss is a function of the weights and the batch alone: the 2-process trajectory (each
    process on 8 of the 16 sequences, gradients averaged) is the 1-process one up to floating-point order."""
    flags = rnn_flags(csv_dir, tmp_path, "--dropout", "0", "--steps", "30")
    one = subprocess.run([sys.executable, str(ROOT / "rnn.py"), *flags, "--name", "one"], cwd=tmp_path,
                         env={**os.environ, "DLCOURSE_CACHE": str(common.CACHE_DIR)}, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(tmp_path, "rnn.py", *flags, "--name", "two")
    assert two.returncode == 0, two.stderr[-2000:]
    losses = {n: [r["loss"] for r in records(tmp_path / "rnn" / n)] for n in ("one", "two")}
    assert len(losses["two"]) == 30                      # one record per step: rank 0 alone wrote
    assert losses["one"][-1] < 0.8 * losses["one"][0]    # it learns, so the trajectories have somewhere to go
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-4)
    weights = [torch.load(tmp_path / "rnn" / n / "ckpt.pt", weights_only=False)["model"] for n in ("one", "two")]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-5) for k in weights[0])
    assert two.stdout.count("validation loss") == 3      # rank 0 alone prints


def test_a_resumed_two_process_run_continues_exactly(tmp_path, csv_dir):
    """Dropout on: each process draws its own masks, and the checkpoint keeps every process's random state."""
    flags = rnn_flags(csv_dir, tmp_path, "--dropout", "0.3")
    for name, steps, extra in (("whole", 20, ()), ("halves", 10, ()), ("halves", 20, ("--resume",))):
        result = torchrun(tmp_path, "rnn.py", *flags, "--steps", str(steps), "--name", name, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    whole, halves = (torch.load(tmp_path / f"rnn/{n}/ckpt.pt", weights_only=False) for n in ("whole", "halves"))
    assert len(whole["random"]) == 2 and not torch.equal(whole["random"][0]["cpu"], whole["random"][1]["cpu"])
    assert all(torch.equal(whole["model"][k], halves["model"][k]) for k in whole["model"])


SHAPES = ["--split-sizes", "64,32,32", "--steps", "4", "--eval-every", "2", "--device", "cpu", "--name", "t"]
DIFFUSION = ["--image-size", "8", "--channels", "16", "--channel-mult", "1,2", "--blocks", "1", "--attn-res", "4",
             "--heads", "2", "--timesteps", "20", "--sample-steps", "4", "--batch-size", "8", "--fid-samples", "0"]
GAN = ["--image-size", "16", "--latent-dim", "8", "--g-channels", "8", "--d-channels", "8", "--batch-size", "16",
       "--fid-samples", "0", "--r1", "1"]
VAE = ["--image-size", "16", "--latent-dim", "4", "--channels", "8", "--hidden", "32", "--batch-size", "16",
       "--fid-samples", "0"]
SCRIPTS = {
    "ddpm.py": DIFFUSION,
    "cddpm.py": [*DIFFUSION, "--unseen-samples", "4", "--guidance-sweep", "0,2"],
    "gan.py": GAN,
    "cgan.py": GAN,
    "vae.py": VAE,
    "cvae.py": [*VAE, "--unseen-samples", "10"],
    "autoencoder.py": ["--image-size", "16", "--levels", "2", "--channels", "8", "--batch-size", "16",
                       "--pretrain-fractions", "none"],
    "dynconv.py": ["--image-size", "16", "--batch-size", "16", "--width", "4", "--models", "dynamic"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_image_script_trains_in_two_processes_and_rank_0_alone_writes(tmp_path, script):
    """The processes' weights are compared at every evaluation (common.check_replicas), so a run that completes
    had its gradients averaged; one record per step shows that rank 0 alone wrote."""
    result = torchrun(tmp_path, script, *SHAPES, *SCRIPTS[script], "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, = (p.parent for p in (tmp_path / "runs").glob("**/final.json"))    # dynconv's: runs/dynconv/t/dynamic
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4]
    assert [r["step"] for r in records(run_dir, "val")] == [2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_character_generation_trains_in_two_processes(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    result = torchrun(tmp_path, "rnn.py", "--task", "generate", "--dataset", "textfile", "--data-dir", str(corpus),
                      "--hidden", "16", "--embed", "8", "--batch-size", "8", "--bptt", "16", "--steps", "4",
                      "--eval-every", "2", "--sample-length", "20", "--device", "cpu", "--out", str(tmp_path),
                      "--name", "t")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(records(tmp_path / "rnn" / "t")) == 4


DRIFTING = """
import argparse
import sys
sys.path.insert(0, {root!r})
import torch
import common

device = common.get_device("cpu")
model = torch.nn.Linear(4, 1)
net = common.distribute(model, argparse.Namespace(compile=False), device)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(8, 4, generator=torch.Generator().manual_seed(common.rank()))
loss = ({which})(x).square().mean()
loss.backward()
opt.step()
common.check_replicas(model, 1)
print("in step")
"""


@pytest.mark.parametrize("which", ["net", "model"])
def test_weights_that_drift_apart_stop_the_run(tmp_path, which):
    """Each process has other data: through the DDP wrapper the gradients are averaged and the weights agree;
    calling the bare model skips the averaging, and check_replicas stops the run with a one-line error."""
    script = tmp_path / "drift.py"
    script.write_text(DRIFTING.format(root=str(ROOT), which=which))
    result = torchrun(tmp_path, script)
    if which == "net":
        assert result.returncode == 0 and "in step" in result.stdout, result.stdout + result.stderr[-2000:]
    else:
        assert result.returncode != 0
        assert "error: at step 1 the processes' weights differ" in result.stderr
