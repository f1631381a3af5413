"""Data-path benchmark: shapes generation (cold and cached), folder decoding, and loader throughput.

    python bench/data.py                                   # shapes only
    python bench/data.py --folder path/to/cifar10          # also decode an ImageFolder tree

Loader throughput compares the project's batch-indexed loader (one tensor indexing per batch) with the usual
per-item DataLoader (B __getitem__ calls and a collate), interleaved over several rounds, reported as a ratio.
Run it alone: absolute speed drifts on a shared machine, ratios less so.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


class PerItem(Dataset):
    """The conventional dataset: one image per __getitem__, batched by DataLoader's collate."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1, self.labels[i]


def images_per_second(loader, batches):
    start, seen = time.perf_counter(), 0
    for n, (x, _) in enumerate(loader):
        seen += len(x)
        if n + 1 == batches:
            break
    return seen / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--folder", default=None, help="an ImageFolder tree to time decoding on")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as cache:
        common.CACHE_DIR = Path(cache)
        start = time.perf_counter()
        (train, _, _), _ = common.load_datasets("shapes", image_size=args.image_size)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        common.load_datasets("shapes", image_size=args.image_size)
        warm = time.perf_counter() - start
    print(f"shapes {args.image_size}px, 50,000/5,000/10,000: generate {cold:.1f} s, load cached {warm:.2f} s")

    batched = common.make_loader(train, args.batch_size, shuffle=True)
    per_item = DataLoader(PerItem(train.images, train.labels), batch_size=args.batch_size, shuffle=True)
    ratios = []
    for _ in range(args.rounds):
        a, b = images_per_second(batched, 100), images_per_second(per_item, 100)
        ratios.append(a / b)
        print(f"  batch-indexed {a:,.0f} img/s, per-item {b:,.0f} img/s")
    print(f"batch-indexed / per-item loader: {statistics.median(ratios):.1f}x (median of {args.rounds})")

    if args.folder:
        start = time.perf_counter()
        (tr, va, te), classes = common.load_datasets("folder", args.folder, args.image_size)
        n = len(tr) + len(va) + len(te)
        print(f"folder {args.folder}: decoded {n:,} images in {time.perf_counter() - start:.1f} s "
              f"({len(tr)}/{len(va)}/{len(te)}, {len(classes)} classes)")


if __name__ == "__main__":
    main()
