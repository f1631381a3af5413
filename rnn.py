"""Recurrent networks: classifying text and audio sequences, and generating text one character at a time.

Papers: Elman 1990, "Finding structure in time" (the simple recurrent network); Hochreiter & Schmidhuber 1997,
"Long short-term memory"; Cho et al. 2014, arXiv:1406.1078 (the GRU); Schuster & Paliwal 1997, "Bidirectional
recurrent neural networks"; Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
networks", arXiv:1211.5063 (vanishing and exploding gradients, gradient clipping); Zaremba, Sutskever & Vinyals
2014, arXiv:1409.2329 (dropout between stacked layers); Karpathy 2015, "The unreasonable effectiveness of
recurrent neural networks" (character-level generation).

    python rnn.py                                          # which of 10 stdlib packages a function comes from
    python rnn.py --cell gru --layers 2 --bidirectional --pool max
    python rnn.py --ablate cell=rnn,gru,lstm layers=1,2 bidirectional=false,true --amp bf16 --name variants
    python rnn.py --task generate                          # a character-level model of Python's help topics
    python rnn.py --task generate --sample-only --prime "A list " --temperatures 0,0.5,1   # sample run again
    python rnn.py --dataset names                          # surname -> language (downloads the PyTorch set)
    python rnn.py --dataset speechcommands                 # ten spoken words, log-mel frames (downloads 2.3 GB)
    python rnn.py --dataset imdb --tokens word --max-length 300     # movie-review sentiment, words
    python rnn.py --dataset textfolder --data-dir my/texts # <root>/<class>/*.txt; csv and audiofolder alike

Recurrences. A layer reads inputs x_1..x_T (vectors) and keeps a state h_t in R^H, from h_0 = 0 (a fresh state
for every sequence a classifier reads). With sigma the logistic function and * the elementwise product:

    --cell rnn    h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)                      (Elman)

    --cell lstm   i_t = sigma(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)          input gate
                  f_t = sigma(W_if x_t + b_if + W_hf h_{t-1} + b_hf)          forget gate
                  g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)           candidate
                  o_t = sigma(W_io x_t + b_io + W_ho h_{t-1} + b_ho)          output gate
                  c_t = f_t * c_{t-1} + i_t * g_t,      h_t = o_t * tanh(c_t)  (the cell c_t is the memory)

    --cell gru    r_t = sigma(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)          reset gate
                  z_t = sigma(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)          update gate
                  n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))   candidate
                  h_t = (1 - z_t) * n_t + z_t * h_{t-1}

(PyTorch's GRU applies r_t after the product W_hn h_{t-1}; Cho et al. apply it before, W_hn (r_t * h_{t-1}).
tests/test_rnn.py checks that these equations, written out, give what the PyTorch modules compute.)

Why gates. The gradient of a loss at step T reaching step t passes through the Jacobians dh_s/dh_{s-1}. For the
simple RNN that is diag(1 - h_s^2) W_hh, and a product of T - t of them shrinks or grows geometrically with the
largest singular value of W_hh: gradients vanish (long-range dependencies are not learned) or explode (one
update ruins the weights). The LSTM's cell has the path dc_s/dc_{s-1} = diag(f_s), no matrix and no squashing,
which stays near 1 while the forget gate is open; the GRU's interpolation z_t * h_{t-1} is the same kind of path.
Exploding gradients are cut by clipping: when the norm of the whole gradient g exceeds c (--clip), g is rescaled
to c g / ||g|| (Pascanu et al.), which keeps its direction. The logged grad_norm shows how often that happens.

Networks. Deeper: --layers L stacks recurrences, layer l reading the output sequence h^(l-1)_1..T of the layer
below, with dropout between layers (Zaremba et al.). Bidirectional: every layer also runs a second recurrence
backwards, from x_T to x_1, and outputs [h->_t ; h<-_t], so each position sees the whole sequence. Inputs: a
token's embedding (a learned vector per character or word, --embed values) or, for audio, a linear projection of
a frame of log-mel energies. A classifier turns the output sequence into one vector (--pool), then logits:

    --pool last   [h->_T ; h<-_1]: each direction's state after reading the whole sequence ("one output at the end")
    --pool mean   the mean of h_t over the sequence;   --pool max   the elementwise maximum over the sequence

Padding. Sequences in a batch are padded at the end to the longest. The forward recurrence at t < length never
sees the padding (it comes later), so it is exact up to the last real step, and `last` reads the output there
(index length - 1), never at a padded position. The backward recurrence would start inside the padding; so each
sequence is reversed within its own length (the padding stays at the end), run forwards, and reversed back.
mean and max use the real steps only. --packed computes the same with torch's packed sequences instead
(pack_padded_sequence), which skips the padding rather than discarding what it produced; the tests check that
both paths agree, and that padding never changes a prediction. On this CPU, on the length-sorted batches made
here, the packed path runs at 0.84x the padded one's speed (bench/rnn_speed.py); on GPUs, with cuDNN, packing
is the usual choice.

Classification loss, per batch of N sequences with classes y_n and logits s_n = W pool(h_n) + b in R^K:

    L = 1/N sum_n -log softmax(s_n)_{y_n} = 1/N sum_n (log sum_k exp s_nk - s_{n,y_n})

computed from the logits (nn.functional.cross_entropy applies log-softmax itself: a softmax before it would
squash the logits twice). Reported: accuracy, macro F1 (the mean over classes of 2 P R / (P + R), P and R a
class's precision and recall, so a small class counts as much as a large one), per-class P, R and F1, and the
confusion matrix, on the test set with the weights of the best validation accuracy (and, beside them, those
of the last step).

Character-level generation (--task generate). A language model predicts each next character from all before it,
p(c_{t+1} | c_1..c_t) = softmax(W h_t + b), and minimises the cross-entropy per character in nats; bits per
character = nats / ln 2 (the size of an ideal code for the text under the model; 0 for a perfect predictor,
log2 |V| for a uniform guess). Training uses truncated backpropagation through time: the training text is cut
into --batch-size parallel streams; step k reads window k (--bptt characters) of every stream, and the state
after window k starts window k+1, so the model conditions on everything read before (each pass over the text
starts from a fresh state); the state is detached between windows, so gradients stop at the window border. Sampling feeds a priming string (--prime), then draws
each character from softmax(logits / T): T -> 0 is the greedy argmax, T = 1 the model's own distribution,
higher T flatter. Each sample's words are checked against the training text's vocabulary (the share of words
of two or more letters that occur there): how recognisable the words are, as a number.

Audio. WAV files are read with the standard library (common.read_wav) and turned into log-mel frames here:
a short-time Fourier transform with a 25 ms Hann window every 10 ms, the power |X(f)|^2 per frequency bin,
--n-mels triangular filters whose centres are equally spaced on the mel scale m(f) = 2595 log10(1 + f / 700)
(roughly how pitch is perceived: linear below 1 kHz, logarithmic above), then log(energy + 1e-6). Each filter
rises linearly from the previous filter's centre to its own and falls to the next one's, with peak 1, so
between the first and the last centre the filters sum to 1 at every frequency. The frames are standardised
per mel band with the training set's mean and standard deviation, stored in the model.

Data (common.load_sequences, common.load_corpus): stdlib (embedded) is every top-level function and method of
ten standard-library packages, docstring removed; an item's split comes from a hash of its module and name. The
corpus pydoc (embedded) is the interactive help topics, split by topic. Downloads: names, imdb, speechcommands,
shakespeare; your own data: textfolder, csv, audiofolder, textfile. The README lists sizes and layouts.
"""
import argparse
import itertools
import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

TASKS = ("classify", "generate")
CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
POOLS = ("last", "mean", "max")
TOKENS = ("char", "word")
PAD, UNK = 0, 1                 # vocabulary indices of the padding token and of tokens training never showed
BUCKET_BATCHES = 50             # batches are cut from pools of this many, sorted by length: little padding
EVAL_STREAMS = 8                # parallel streams for bits per character on validation and test text
MODEL_FLAGS = ("task", "dataset", "tokens", "vocab_size", "max_length", "sample_rate", "n_mels", "cell", "layers",
               "hidden", "embed", "bidirectional", "pool", "dropout")
DEFAULT_DATASET = {"classify": "stdlib", "generate": "pydoc"}
DEFAULT_EPOCHS = {"classify": 20, "generate": 20}


# ----------------------------------------------------------------------------- tokens and audio features

WORD = re.compile(r"\w+|[^\w\s]")


def tokenize(text, tokens):
    """Characters, or lower-cased words and punctuation marks."""
    return list(text) if tokens == "char" else WORD.findall(text.lower())


class Vocabulary:
    """Token <-> index. Index 0 pads, 1 stands for every token the training data never showed (<unk>)."""

    def __init__(self, tokens):
        self.itos = ["<pad>", "<unk>", *tokens]
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, texts, tokens, size):
        """All training characters; or the `size` most frequent training words seen at least twice."""
        counts = Counter(t for text in texts for t in tokenize(text, tokens))
        if tokens == "char":
            return cls(sorted(counts))
        return cls([w for w, n in counts.most_common(size) if n >= 2])

    def __len__(self):
        return len(self.itos)

    def encode(self, text, tokens):
        return torch.tensor([self.stoi.get(t, UNK) for t in tokenize(text, tokens)], dtype=torch.long)

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)


def mel_filter_bank(n_mels, n_fft, sample_rate, f_min=0.0, f_max=None):
    """(n_mels, n_fft // 2 + 1) triangular filters over the STFT's frequency bins, centres equally spaced in mels."""
    f_max = sample_rate / 2 if f_max is None else f_max
    mel = lambda f: 2595 * torch.log10(1 + torch.as_tensor(f, dtype=torch.float64) / 700)
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)
    edges = hz(torch.linspace(mel(f_min), mel(f_max), n_mels + 2, dtype=torch.float64))   # lower edge, centres, upper
    freqs = torch.fft.rfftfreq(n_fft, 1 / sample_rate, dtype=torch.float64)              # the bins' frequencies
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    bank = torch.minimum(rising, falling).clamp(min=0).float()
    if not (bank > 0).any(1).all():
        common.fail(f"--n-mels {n_mels} is too many for {n_fft}-point frames at {sample_rate} Hz: the narrowest "
                    f"filters fall between frequency bins; lower --n-mels")
    return bank


def log_mel(samples, sample_rate, bank):
    """A waveform (n,) -> (frames, n_mels) log-mel energies: 25 ms Hann windows every 10 ms."""
    window, hop = round(0.025 * sample_rate), round(0.010 * sample_rate)
    samples = F.pad(samples, (0, max(0, window - len(samples))))
    spectrum = torch.stft(samples, n_fft=window, hop_length=hop, window=torch.hann_window(window),
                          center=True, pad_mode="constant", return_complex=True)       # (n_fft // 2 + 1, frames)
    return torch.log(bank @ spectrum.abs() ** 2 + 1e-6).T


# ----------------------------------------------------------------------------- networks

def reverse_padded(x, lengths):
    """Reverse the first lengths[b] steps of each sequence b of x (B, T, ...), leaving its padding at the end."""
    t = torch.arange(x.shape[1], device=x.device)
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)             # (B, T); its own inverse
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand_as(x))


class Recurrent(nn.Module):
    """--layers recurrences of one --cell, one direction or two each, on padded batches (see "Padding" above).

    Each direction of each layer is its own one-layer torch module, so the stacking and the reversal are visible
    here; torch's num_layers and bidirectional arguments do the same inside one module."""

    def __init__(self, cell, input_size, hidden, layers, bidirectional, dropout, packed=False):
        super().__init__()
        directions = 2 if bidirectional else 1
        self.layers = nn.ModuleList(
            nn.ModuleList(CELLS[cell](input_size if i == 0 else hidden * directions, hidden, batch_first=True)
                          for _ in range(directions))
            for i in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.hidden, self.bidirectional, self.packed = hidden, bidirectional, packed

    def one_direction(self, rnn, x, lengths, state):
        """Outputs (B, T, H), exact wherever t < length, and the state after the last step."""
        if not self.packed:
            return rnn(x, state)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = rnn(packed, state)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0], state

    def forward(self, x, lengths, states=None):
        """x (B, T, D) -> outputs (B, T, directions * H) and each layer's forward state after the last step, which
        a language model carries into its next window (its text has no padding)."""
        final = []
        for i, layer in enumerate(self.layers):
            if i:
                x = self.dropout(x)
            out, state = self.one_direction(layer[0], x, lengths, states[i] if states else None)
            final.append(state)
            if self.bidirectional:
                back, _ = self.one_direction(layer[1], reverse_padded(x, lengths), lengths, None)
                out = torch.cat([out, reverse_padded(back, lengths)], dim=-1)
            x = out
        return x, final


def pool(outputs, lengths, how, hidden):
    """(B, T, directions * H) outputs -> (B, directions * H), from the real steps only."""
    valid = torch.arange(outputs.shape[1], device=outputs.device) < lengths[:, None]     # (B, T)
    if how == "mean":
        return (outputs * valid[..., None]).sum(1) / lengths[:, None]
    if how == "max":
        return outputs.masked_fill(~valid[..., None], float("-inf")).amax(1)
    last = outputs[torch.arange(len(lengths), device=outputs.device), lengths - 1]   # after the last real step
    if outputs.shape[-1] > hidden:            # bidirectional: the backward direction has read everything at t = 1
        last = torch.cat([last[:, :hidden], outputs[:, 0, hidden:]], dim=-1)
    return last


class FrameProjection(nn.Module):
    """Audio frames (B, T, n_mels), standardised per band with the training set's statistics, projected to --embed."""

    def __init__(self, n_mels, embed):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_mels))
        self.register_buffer("std", torch.ones(n_mels))
        self.project = nn.Linear(n_mels, embed)

    def forward(self, frames):
        return self.project((frames - self.mean) / self.std)


class Classifier(nn.Module):
    """tokens (B, T) or frames (B, T, n_mels) -> logits (B, K): input encoder, recurrences, pooling, linear layer."""

    def __init__(self, args, num_classes, vocab_size=None):
        super().__init__()
        self.encoder = (nn.Embedding(vocab_size, args.embed, padding_idx=PAD) if vocab_size
                        else FrameProjection(args.n_mels, args.embed))
        self.rnn = Recurrent(args.cell, args.embed, args.hidden, args.layers, args.bidirectional, args.dropout,
                             args.packed)
        self.dropout = nn.Dropout(args.dropout)
        self.head = nn.Linear(args.hidden * (2 if args.bidirectional else 1), num_classes)
        self.how, self.hidden = args.pool, args.hidden

    def features(self, x, lengths):
        outputs, _ = self.rnn(self.dropout(self.encoder(x)), lengths)
        return pool(outputs, lengths, self.how, self.hidden)

    def forward(self, x, lengths):
        return self.head(self.dropout(self.features(x, lengths)))


class LanguageModel(nn.Module):
    """characters (B, T) -> next-character logits (B, T, V), and the states to carry into the next window."""

    def __init__(self, args, vocab_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, args.embed)
        self.rnn = Recurrent(args.cell, args.embed, args.hidden, args.layers, False, args.dropout, args.packed)
        self.dropout = nn.Dropout(args.dropout)
        self.head = nn.Linear(args.hidden, vocab_size)

    def forward(self, x, states=None):
        lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
        outputs, states = self.rnn(self.dropout(self.embed(x)), lengths, states)
        return self.head(self.dropout(outputs)), states


def detach(states):
    """Keep the carried states' values, cut their graph: gradients stop at the window border (truncated BPTT)."""
    return [tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach() for state in states]


def parameter_counts(model):
    counts = {name: common.count_parameters(part) for name, part in model.named_children()}
    return {name: n for name, n in counts.items() if n}


# ----------------------------------------------------------------------------- classification data

class SequenceSplit:
    """One split: sequences (1-D token ids or (frames, n_mels)) and labels, served as padded batches."""

    def __init__(self, sequences, labels):
        self.sequences, self.labels = sequences, labels
        self.lengths = torch.tensor([len(s) for s in sequences])

    def __len__(self):
        return len(self.labels)

    def batches(self, batch_size, generator=None):
        """Index batches: shuffled (with a generator) or in order, then sorted by length within pools of
        BUCKET_BATCHES batches, so a batch holds similar lengths and pads little; the batches' order shuffled."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        out = []
        for chunk in order.split(BUCKET_BATCHES * batch_size):
            out += list(chunk[torch.argsort(self.lengths[chunk], stable=True)].split(batch_size))
        if generator is not None:
            out = [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]
        return out

    def batch(self, index, device):
        """Padded inputs (B, T[, n_mels]), lengths (B,) and labels (B,) on `device`."""
        x = nn.utils.rnn.pad_sequence([self.sequences[i] for i in index.tolist()], batch_first=True,
                                      padding_value=PAD)
        return x.to(device), self.lengths[index].to(device), self.labels[index].to(device)


def prepare_classification(args):
    """Splits as SequenceSplits, class names, and the vocabulary (None for audio)."""
    with common.main_first():                 # under torchrun, rank 0 downloads before the others read
        data = common.load_sequences(args.dataset, args.data_dir, args.sample_rate)
    limit = args.max_length or None
    if data.kind == "text":
        vocab = Vocabulary.build(data.splits[0][0], args.tokens, args.vocab_size)
        encode = lambda text: vocab.encode(text, args.tokens)[:limit]
    else:
        vocab, bank = None, mel_filter_bank(args.n_mels, round(0.025 * args.sample_rate), args.sample_rate)
        encode = lambda samples: log_mel(samples, args.sample_rate, bank)[:limit]
    splits = []
    for items, labels in data.splits:
        sequences = [encode(item) for item in items]
        sequences = [s if len(s) else torch.tensor([UNK]) for s in sequences]     # an empty text: one <unk>
        splits.append(SequenceSplit(sequences, labels))
    if len(splits[0]) < args.batch_size:
        common.fail(f"the training set has {len(splits[0])} sequences, fewer than --batch-size {args.batch_size}")
    return splits, data.classes, vocab


def training_batches(split, batch_size, generator=None):
    """An epoch's index batches. Under torchrun every process takes its shard of each batch (common.shard), so a
    batch with fewer sequences than processes, the remainder of the epoch if any, is left out."""
    return [b for b in split.batches(batch_size, generator) if len(b) >= common.world_size()]


def epoch_batches(split, args, start):
    """This process's training batches from optimiser step `start` on: epoch e shuffled by a generator seeded with
    (seed, e), the same in every process, so a resumed run continues with exactly the batches it would have seen."""
    per_epoch = len(training_batches(split, args.batch_size))
    for epoch in itertools.count(start // per_epoch):
        g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        batches = training_batches(split, args.batch_size, g)
        yield from map(common.shard, batches[start - epoch * per_epoch if epoch == start // per_epoch else 0:])


def scores(predictions, labels, num_classes):
    """Accuracy, macro F1, per-class precision/recall/F1 and the confusion matrix (rows: true, columns: predicted)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    hits = confusion.diag().double()
    precision = hits / confusion.sum(0).clamp(min=1)
    recall = hits / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(hits))
    return {"accuracy": hits.sum().item() / len(labels), "macro_f1": f1.mean().item(),
            "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "confusion": confusion.tolist()}


@torch.no_grad()
def evaluate(model, split, args, device):
    """Mean cross-entropy and predictions over a split, in the split's order."""
    model.eval()
    total, predictions = 0.0, torch.empty(len(split), dtype=torch.long)
    for index in split.batches(args.eval_batch_size):
        x, lengths, y = split.batch(index, device)
        with common.autocast(args.amp, device):
            logits = model(x, lengths).float()
        total += F.cross_entropy(logits, y, reduction="sum").item()
        predictions[index] = logits.argmax(1).cpu()
    return total / len(split), predictions


def build_classifier(args, splits, classes, vocab):
    model = Classifier(args, len(classes), len(vocab) if vocab else None)
    if vocab is None:                              # the audio bands' statistics, from the training frames
        frames = torch.cat(splits[0].sequences)
        model.encoder.mean.copy_(frames.mean(0))
        model.encoder.std.copy_(frames.std(0).clamp(min=1e-3))
    return model


def classify(args, run, device):
    splits, classes, vocab = prepare_classification(args)
    print(f"{args.dataset}: " + ", ".join(f"{name} {len(s):,}" for name, s in zip(("train", "val", "test"), splits))
          + f" sequences, {len(classes)} classes" + (f", vocabulary {len(vocab):,} {args.tokens}s" if vocab else ""))
    model = build_classifier(args, splits, classes, vocab).to(device)
    parameters = parameter_counts(model)
    print(f"parameters: {parameters} ({sum(parameters.values()):,})")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = common.grad_scaler(args.amp, device)
    per_epoch = len(training_batches(splits[0], args.batch_size))
    steps = args.steps if args.steps is not None else args.epochs * per_epoch
    start, best = 0, {"accuracy": -1.0, "step": 0, "model": None}
    state = run.load_checkpoint(MODEL_FLAGS, device)
    if state:
        check_vocabulary(state, vocab)
        if state["classes"] != classes:
            common.fail(f"the checkpoint was trained on the classes {state['classes']}, this data has {classes}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, best, elapsed = state["step"], state["best"], state["seconds"]
        set_random_state(state["random"])
    else:
        elapsed = 0.0
    began = time.perf_counter() - elapsed
    net = common.distribute(model, args, device)      # what the training step calls (see common.distribute)
    batches = epoch_batches(splits[0], args, start)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"rnn {args.cell}")
    for step in bar:
        model.train()
        x, lengths, y = splits[0].batch(next(batches), device)
        with common.autocast(args.amp, device):
            logits = net(x, lengths).float()
        loss = F.cross_entropy(logits, y)           # on the logits: log-softmax is inside
        common.check_finite(loss, step, "lower --lr or --clip")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)                        # clip the true gradients, not the fp16-scaled ones
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(opt)
        scaler.update()
        accuracy = (logits.argmax(1) == y).float().mean().item()
        run.log(step + 1, "train", loss=loss.item(), accuracy=accuracy, grad_norm=grad_norm.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.2f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            common.check_replicas(model, step + 1)
            random = random_state()
            if common.is_main():
                val_loss, predictions = evaluate(model, splits[1], args, device)
                val_accuracy = (predictions == splits[1].labels).float().mean().item()
                run.log(step + 1, "val", loss=val_loss, accuracy=val_accuracy)
                if val_accuracy > best["accuracy"]:
                    best = {"accuracy": val_accuracy, "step": step + 1,
                            "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                tqdm.write(f"step {step + 1}: validation loss {val_loss:.4f}, accuracy {val_accuracy:.4f}"
                           f" (best {best['accuracy']:.4f} at step {best['step']})")
                run.save_checkpoint(step + 1, model=model.state_dict(), optimizer=opt.state_dict(), best=best,
                                    scaler=scaler.state_dict(), vocabulary=vocab.itos if vocab else None,
                                    classes=classes, seconds=time.perf_counter() - began, random=random)
    if not common.is_main():                        # under torchrun, rank 0 alone reports
        return None
    train_minutes = (time.perf_counter() - began) / 60
    return report_classification(run, model, best, splits, classes, parameters, args, device, steps, train_minutes)


def random_state():
    """The generators dropout draws from, so that --resume continues with the masks the run would have drawn: a
    list with every process's (under torchrun each draws its own masks)."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return common.gather(state)


def set_random_state(states):
    # A run resumed on another number of processes draws from the states it has: other masks than an uninterrupted
    # run's, as all its noise would be.
    state = states[common.rank() % len(states)]
    torch.set_rng_state(state["cpu"].cpu())             # the checkpoint was loaded onto --device; these live on the CPU
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def check_vocabulary(state, vocab):
    saved = state.get("vocabulary")
    if saved is not None and vocab is not None and saved != vocab.itos:
        common.fail("the checkpoint's vocabulary differs from this data's: it was trained on other data "
                    "(--dataset, --data-dir, --tokens, --vocab-size must match)")


def confusion_figure(run, confusion, classes, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    counts = torch.tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)       # each row: where a true class's items went
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * k, 1.0 + 0.45 * k))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(run.dir / "confusion.png", dpi=110)
    plt.close(fig)


def report_classification(run, model, best, splits, classes, parameters, args, device, steps, train_minutes):
    """Test scores with the best validation weights (and the last step's), confusion matrix, tables, curves."""
    _, last_predictions = evaluate(model, splits[2], args, device)
    last = scores(last_predictions, splits[2].labels, len(classes))
    model.load_state_dict(best["model"])
    test_loss, predictions = evaluate(model, splits[2], args, device)
    test = scores(predictions, splits[2].labels, len(classes))
    run.log(best["step"], "test", loss=test_loss, accuracy=test["accuracy"])
    confusion_figure(run, test["confusion"], classes,
                     f"{args.dataset} test: accuracy {test['accuracy']:.3f}, macro F1 {test['macro_f1']:.3f}")
    run.plot_panels({"cross-entropy": ("loss",), "accuracy": ("accuracy",), "gradient norm (before clipping)":
                     ("grad_norm",)}, "curves.png", log_scale=("gradient norm (before clipping)",))
    majority = torch.bincount(splits[0].labels, minlength=len(classes)).argmax()
    lines = ["| class | precision | recall | F1 | test items |", "|---|---|---|---|---|"]
    support = torch.tensor(test["confusion"]).sum(1).tolist()
    for c, name in enumerate(classes):
        lines.append(f"| {name} | {test['precision'][c]:.3f} | {test['recall'][c]:.3f} | {test['f1'][c]:.3f} "
                     f"| {support[c]} |")
    (run.dir / "tables.md").write_text("\n".join(lines) + "\n")
    (run.dir / "test_scores.json").write_text(json.dumps({"classes": classes, **test}, indent=2))
    print("\n".join(lines))
    return run.finish(parameters, step=steps, best_step=best["step"], val_accuracy=best["accuracy"],
                      test_loss=test_loss, test_accuracy=test["accuracy"], test_macro_f1=test["macro_f1"],
                      test_accuracy_last_step=last["accuracy"], test_macro_f1_last_step=last["macro_f1"],
                      majority_class_test_accuracy=(splits[2].labels == majority).float().mean().item(),
                      train_minutes=train_minutes)


# ----------------------------------------------------------------------------- character-level generation

def streams(ids, batch_size):
    """A text's ids cut into batch_size equal streams: inputs (B, n) and the next characters, targets (B, n)."""
    n = (len(ids) - 1) // batch_size
    if n < 1:
        common.fail(f"{len(ids)} characters are too few for {batch_size} streams: lower --batch-size")
    return ids[:n * batch_size].view(batch_size, n), ids[1:n * batch_size + 1].view(batch_size, n)


@torch.no_grad()
def bits_per_character(model, ids, args, device):
    """Cross-entropy in bits per character of a text, read as EVAL_STREAMS streams with their state carried."""
    model.eval()
    inputs, targets = streams(ids, min(EVAL_STREAMS, max(1, (len(ids) - 1) // 2)))
    total, states = 0.0, None
    for t in range(0, inputs.shape[1], args.bptt):
        with common.autocast(args.amp, device):
            logits, states = model(inputs[:, t:t + args.bptt].to(device), states)
        total += F.cross_entropy(logits.float().flatten(0, 1), targets[:, t:t + args.bptt].flatten().to(device),
                                 reduction="sum").item()
    return total / targets.numel() / math.log(2)


@torch.no_grad()
def sample(model, vocab, prime, length, temperature, generator, device):
    """Feed `prime`, then draw `length` characters from softmax(logits / temperature); temperature 0: argmax."""
    model.eval()
    ids = vocab.encode(prime, "char")
    if not len(ids) or (ids == UNK).any():
        unknown = sorted({c for c in prime if c not in vocab.stoi})
        common.fail(f"--prime must be non-empty text of characters the training text has; unknown: {unknown}")
    logits, states = model(ids[None].to(device))
    out = []
    for _ in range(length):
        last = logits[0, -1].float().cpu()
        last[[PAD, UNK]] = float("-inf")           # never targets in training; keep them out of samples
        if temperature == 0:
            token = last.argmax().view(1)
        else:
            token = torch.multinomial(torch.softmax(last / temperature, dim=0), 1, generator=generator)
        out.append(token.item())
        logits, states = model(token.view(1, 1).to(device), states)
    return vocab.decode(out)


def known_word_share(text, known):
    """The share of a text's words (two letters or more) that the training text contains."""
    words = [w.lower() for w in re.findall(r"[A-Za-z]{2,}", text)]
    return sum(w in known for w in words) / len(words) if words else 0.0


def write_samples(run, model, vocab, known, args, device, filename):
    lines, shares = [f"Priming string: {args.prime!r}; {args.sample_length} characters per sample.", ""], {}
    for temperature in args.temperatures:
        g = torch.Generator().manual_seed(args.seed)
        text = sample(model, vocab, args.prime, args.sample_length, temperature, g, device)
        shares[f"known_words_T{temperature:g}"] = known_word_share(text, known)
        lines += [f"## temperature {temperature:g} (known words {shares[f'known_words_T{temperature:g}']:.0%})",
                  "", "```", args.prime + text, "```", ""]
    (run.dir / filename).write_text("\n".join(lines))
    print("\n".join(lines))
    return shares


def generate(args, run, device):
    with common.main_first():                 # under torchrun, rank 0 downloads before the others read
        texts = common.load_corpus(args.dataset, args.data_dir)
    vocab = Vocabulary.build([texts[0]], "char", None)
    train_ids, val_ids, test_ids = (vocab.encode(t, "char") for t in texts)
    known = {w.lower() for w in re.findall(r"[A-Za-z]{2,}", texts[0])}
    unseen = {split: int((ids == UNK).sum()) for split, ids in (("val", val_ids), ("test", test_ids))}
    print(f"{args.dataset}: " + ", ".join(f"{name} {len(t):,}" for name, t in zip(("train", "val", "test"), texts))
          + f" characters, vocabulary {len(vocab)} (with <pad>, <unk>); characters training never shows, "
            f"which count as <unk>: {unseen}")
    model = LanguageModel(args, len(vocab)).to(device)
    parameters = parameter_counts(model)
    print(f"parameters: {parameters} ({sum(parameters.values()):,})")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = common.grad_scaler(args.amp, device)
    if args.batch_size % common.world_size():
        common.fail(f"--batch-size {args.batch_size} does not split evenly over {common.world_size()} processes")
    inputs, targets = (common.shard(t) for t in streams(train_ids, args.batch_size))   # this process's streams
    windows = math.ceil(inputs.shape[1] / args.bptt)           # optimiser steps per pass over the text
    steps = args.steps if args.steps is not None else args.epochs * windows
    start, elapsed = 0, 0.0
    state = run.load_checkpoint(MODEL_FLAGS, device)
    if state:
        check_vocabulary(state, vocab)
        model.load_state_dict(state["model"])
        if args.sample_only:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            shares = write_samples(run, model, vocab, known, args, device, f"samples-{stamp}.md")
            return run.finish(parameters, f"samples-{stamp}.json", **shares)
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, elapsed = state["step"], state["seconds"]
        set_random_state(state["random"])
    began = time.perf_counter() - elapsed
    net = common.distribute(model, args, device)      # what the training step calls (see common.distribute)
    states = None                    # a resumed run starts its window from a fresh state: a small, one-off change
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"rnn {args.cell} generate")
    for step in bar:
        model.train()
        window = step % windows
        if window == 0:
            states = None            # every pass starts the streams again from their beginnings
        t = window * args.bptt
        with common.autocast(args.amp, device):
            logits, states = net(inputs[:, t:t + args.bptt].to(device), states)
        states = detach(states)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets[:, t:t + args.bptt].flatten().to(device))
        common.check_finite(loss, step, "lower --lr or --clip")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(opt)
        scaler.update()
        run.log(step + 1, "train", loss=loss.item(), bpc=loss.item() / math.log(2), grad_norm=grad_norm.item())
        bar.set_postfix(bpc=f"{loss.item() / math.log(2):.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            common.check_replicas(model, step + 1)
            random = random_state()
            if common.is_main():
                val_bpc = bits_per_character(model, val_ids, args, device)
                run.log(step + 1, "val", loss=val_bpc * math.log(2), bpc=val_bpc)
                tqdm.write(f"step {step + 1}: validation {val_bpc:.3f} bits per character")
                run.save_checkpoint(step + 1, model=model.state_dict(), optimizer=opt.state_dict(),
                                    scaler=scaler.state_dict(), vocabulary=vocab.itos,
                                    seconds=time.perf_counter() - began, random=random)
    if not common.is_main():                        # under torchrun, rank 0 alone reports
        return None
    train_minutes = (time.perf_counter() - began) / 60
    val_bpc, test_bpc = (bits_per_character(model, ids, args, device) for ids in (val_ids, test_ids))
    run.log(steps, "test", loss=test_bpc * math.log(2), bpc=test_bpc)
    run.plot_panels({"bits per character": ("bpc",), "gradient norm (before clipping)": ("grad_norm",)},
                    "curves.png", log_scale=("gradient norm (before clipping)",))
    shares = write_samples(run, model, vocab, known, args, device, "samples.md")
    return run.finish(parameters, step=steps, val_bpc=val_bpc, test_bpc=test_bpc,
                      uniform_bpc=math.log2(len(vocab) - 2), train_minutes=train_minutes,
                      unseen_val_characters=unseen["val"], unseen_test_characters=unseen["test"], **shares)


# ----------------------------------------------------------------------------- the variant table

ABLATABLE = ("cell", "layers", "bidirectional", "pool", "hidden", "embed", "dropout", "packed")
ABLATION_FREE = {"name", "resume", "ablate", "device", "out"}        # flags that may differ between its runs


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def ablate(args):
    """One run per combination of the --ablate values under <out>/rnn/<name>/, then a Markdown table of the
    variants with parameter counts and validation and test scores (ablation.md, ablation.json)."""
    grid = {}
    for flag, values in args.ablate:
        if flag not in ABLATABLE:
            common.fail(f"--ablate over {flag!r} is not supported; choose from {', '.join(ABLATABLE)}")
        kind = parse_bool if isinstance(getattr(args, flag), bool) else type(getattr(args, flag))
        try:
            grid[flag] = [kind(v) for v in values]
        except ValueError:
            common.fail(f"--ablate {flag}: cannot read {','.join(values)} as values of --{flag}")
    if args.sample_only:
        common.fail("--ablate trains; to sample one of its runs use --sample-only --name <ablation>/<variant>")
    if common.world_size() > 1:
        common.fail("--ablate runs in one process: start it with python, or each variant with torchrun")
    name = args.name or "ablation"
    root = Path(args.out) / "rnn" / name
    runs = []
    for combination in itertools.product(*grid.values()):       # all flags are checked before anything trains
        values = dict(zip(grid, combination))
        variant = "_".join(f"{flag}-{str(v).lower()}" for flag, v in values.items())
        run_args = argparse.Namespace(**{**vars(args), **values, "name": f"{name}/{variant}", "ablate": None,
                                         "resume": (root / variant / "ckpt.pt").exists()})
        check_flags(run_args)
        common.check_sweep_run(root / variant, run_args, ABLATION_FREE)
        runs.append((values, root / variant, run_args))
    results = []
    for values, directory, run_args in runs:
        if not (directory / "final.json").exists():
            run_task(run_args)
        results.append((values, json.loads((directory / "final.json").read_text())))
    score = ("val_accuracy", "test_accuracy", "test_macro_f1") if args.task == "classify" else ("val_bpc", "test_bpc")
    lines = ["| " + " | ".join([*grid, "parameters", *score, "train minutes"]) + " |",
             "|" + "---|" * (len(grid) + len(score) + 2)]
    for values, final in results:
        lines.append("| " + " | ".join([*(str(v) for v in values.values()), f"{sum(final['parameters'].values()):,}",
                                        *(f"{final[s]:.4f}" for s in score), f"{final['train_minutes']:.1f}"]) + " |")
    table = "\n".join(lines)
    (root / "ablation.md").write_text(table + "\n")
    (root / "ablation.json").write_text(json.dumps([{**v, **f} for v, f in results], indent=2))
    print(table)
    print(f"ablation.md and ablation.json written to {root}")
    return results


# ----------------------------------------------------------------------------- command line

def check_flags(args):
    """Every flag problem as one clear line, before any data is read or anything trains."""
    choices = {"task": TASKS, "cell": tuple(CELLS), "pool": POOLS, "tokens": TOKENS}
    for flag, allowed in choices.items():
        if getattr(args, flag) not in allowed:
            common.fail(f"unknown --{flag} {getattr(args, flag)!r}; choose one of: {', '.join(allowed)}")
    at_least = {"layers": 1, "hidden": 1, "embed": 1, "batch_size": 1, "eval_batch_size": 1, "eval_every": 1,
                "steps": 1, "epochs": 1, "bptt": 1, "n_mels": 1, "sample_length": 1, "max_length": 0,
                "sample_rate": 1000}
    for flag, least in at_least.items():
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            common.fail(f"--{flag.replace('_', '-')} must be at least {least}, got {getattr(args, flag)}")
    if not 0 <= args.dropout < 1:
        common.fail(f"--dropout must be in [0, 1), got {args.dropout}")
    if not args.clip > 0:
        common.fail(f"--clip must be positive (the largest gradient norm let through), got {args.clip}")
    if args.task == "generate":
        if args.bidirectional:
            common.fail("--task generate predicts each character from those before it: a bidirectional model "
                        "would read the answer; drop --bidirectional")
        if args.tokens != "char":
            common.fail("--task generate is character-level: drop --tokens word")
        if any(t < 0 for t in args.temperatures):
            common.fail(f"--temperatures must be 0 (greedy) or positive, got {args.temperatures}")
    elif args.sample_only:
        common.fail("--sample-only samples text from a --task generate run")


def run_task(args):
    check_flags(args)
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    run = common.Run("rnn", args, reopen=args.sample_only)
    return (classify if args.task == "classify" else generate)(args, run, device)


def parse_ablation(text):
    flag, _, values = text.partition("=")
    if not values:
        raise argparse.ArgumentTypeError("expected FLAG=V1,V2,..., e.g. cell=rnn,gru,lstm")
    return flag.replace("-", "_"), values.split(",")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Recurrent networks: sequence classification and character-level "
                                            "generation (see the module docstring)")
    g = p.add_argument_group("task and data")
    g.add_argument("--task", default="classify", help=f"one of {', '.join(TASKS)}")
    g.add_argument("--dataset", default=None,
                   help=f"classify: {', '.join(common.TEXT_DATASETS + common.AUDIO_DATASETS)} (default stdlib, "
                        f"embedded); generate: {', '.join(common.CORPORA)} (default pydoc, embedded)")
    g.add_argument("--data-dir", default="data", help="where downloads go; the folder, CSV or text file of your own")
    g.add_argument("--tokens", default="char", help="text as characters (char) or words (word)")
    g.add_argument("--vocab-size", type=int, default=20_000, help="words kept with --tokens word (most frequent)")
    g.add_argument("--max-length", type=int, default=400,
                   help="classify: keep the first this many tokens or audio frames (10 ms each); 0: all")
    g.add_argument("--sample-rate", type=int, default=16_000, help="audio is resampled to this rate (Hz)")
    g.add_argument("--n-mels", type=int, default=40, help="mel bands per audio frame")
    g = p.add_argument_group("model")
    g.add_argument("--cell", default="lstm", help=f"recurrence: {', '.join(CELLS)}")
    g.add_argument("--layers", type=int, default=1, help="stacked recurrent layers")
    g.add_argument("--hidden", type=int, default=256, help="state size H per direction")
    g.add_argument("--embed", type=int, default=64, help="token embedding (or audio frame projection) size")
    g.add_argument("--bidirectional", action="store_true", help="a backward recurrence beside the forward one")
    g.add_argument("--pool", default="last", help=f"classify: {', '.join(POOLS)} over the output sequence")
    g.add_argument("--dropout", type=float, default=0.2, help="on embeddings, between layers and before the output")
    g.add_argument("--packed", action="store_true",
                   help="skip padding with packed sequences (same results; bench/rnn_speed.py times both)")
    common.add_training_flags(p, batch_size=64, lr=2e-3, steps=None, epochs=None, eval_every=250)
    g = p.add_argument_group("recurrent training")
    g.add_argument("--clip", type=float, default=1.0, help="rescale the gradient to at most this norm")
    g.add_argument("--bptt", type=int, default=128, help="generate: characters per window of truncated BPTT")
    g.add_argument("--eval-batch-size", type=int, default=256, help="sequences per evaluation batch")
    g = p.add_argument_group("generation and analysis")
    g.add_argument("--prime", default="The ", help="generate: the text that starts every sample")
    g.add_argument("--temperatures", type=lambda s: [float(t) for t in s.split(",")], default=[0.0, 0.5, 0.8, 1.0],
                   help="generate: one sample per temperature (0: greedy)")
    g.add_argument("--sample-length", type=int, default=400, help="generate: characters per sample")
    g.add_argument("--sample-only", action="store_true",
                   help="generate: sample from run --name's checkpoint (default: the latest) again; repeat its "
                        "model flags")
    g.add_argument("--ablate", type=parse_ablation, nargs="+", default=None,
                   help=f"FLAG=V1,V2 ...: a run per combination (FLAG in {', '.join(ABLATABLE)}) and their table")
    args = p.parse_args(argv)
    args.dataset = args.dataset or DEFAULT_DATASET.get(args.task)
    if args.epochs is None and args.steps is None:
        args.epochs = DEFAULT_EPOCHS.get(args.task, 1)
    return args


def main(argv=None):
    args = get_args(argv)
    print(vars(args))
    if args.ablate:
        ablate(args)
    else:
        run_task(args)


if __name__ == "__main__":
    main()
