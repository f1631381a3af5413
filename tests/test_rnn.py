"""rnn.py: the docstring's recurrences against torch's modules, padding that never leaks (padded against packed
paths and torch's own bidirectional stack), pooling from the last real step, the mel filter bank, WAV reading,
learning (text, synthesised tones, a character corpus), sampling, checkpoints, the variant table, the data
loaders and the command line's errors."""
import json
import math
import re
import wave

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import rnn

TINY = ["--hidden", "16", "--embed", "8", "--batch-size", "16", "--device", "cpu", "--eval-every", "20"]


def model_args(**overrides):
    args = rnn.get_args(["--device", "cpu"])
    for k, v in {"hidden": 8, "embed": 5, "dropout": 0.0, **overrides}.items():
        setattr(args, k, v)
    return args


def padded_batch(lengths, vocab=20, seed=0):
    """Token ids (B, max length) with random tokens everywhere, the padding too: nothing may read it."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (len(lengths), max(lengths)), generator=g), torch.tensor(lengths)


# ----------------------------------------------------------------------------- the recurrences

def by_hand(cell, module, x):
    """The module docstring's equations, written out with the module's weights: outputs (B, T, H)."""
    w_ih, w_hh, b_ih, b_hh = module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0
    h = c = torch.zeros(x.shape[0], module.hidden_size)
    outputs = []
    for x_t in x.unbind(1):
        xi, hh = x_t @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        if cell == "rnn":
            h = torch.tanh(xi + hh)
        elif cell == "lstm":
            (xi_, xf, xg, xo), (hi, hf, hg, ho) = xi.chunk(4, 1), hh.chunk(4, 1)
            i, f, g, o = torch.sigmoid(xi_ + hi), torch.sigmoid(xf + hf), torch.tanh(xg + hg), torch.sigmoid(xo + ho)
            c = f * c + i * g
            h = o * torch.tanh(c)
        else:
            (xr, xz, xn), (hr, hz, hn) = xi.chunk(3, 1), hh.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)                     # r after the product W_hn h (torch's form)
            h = (1 - z) * n + z * h
        outputs.append(h)
    return torch.stack(outputs, 1)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_the_docstring_recurrences_are_what_the_modules_compute(cell):
    torch.manual_seed(0)
    module = rnn.CELLS[cell](3, 4, batch_first=True)
    x = torch.randn(2, 6, 3)
    assert torch.allclose(module(x)[0], by_hand(cell, module, x), atol=1e-6)


# ----------------------------------------------------------------------------- padding never leaks

def torch_stack_from(ours, cell, input_size, hidden, layers):
    """torch's own num_layers, bidirectional module with our weights."""
    reference = rnn.CELLS[cell](input_size, hidden, layers, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for k, layer in enumerate(ours.layers):
            for suffix, direction in (("", layer[0]), ("_reverse", layer[1])):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(reference, f"{name}_l{k}{suffix}").copy_(getattr(direction, f"{name}_l0"))
    return reference


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_padded_and_packed_paths_agree_with_torchs_packed_bidirectional_stack(cell):
    torch.manual_seed(0)
    lengths = torch.tensor([7, 3, 5, 1])
    x = torch.randn(4, 7, 3)
    x[1, 3:] = 100.0                                  # padding as garbage: nothing may read it
    ours = rnn.Recurrent(cell, 3, 4, layers=2, bidirectional=True, dropout=0.0)
    out_padded, _ = ours(x, lengths)
    ours.packed = True
    out_packed, _ = ours(x, lengths)
    reference = torch_stack_from(ours, cell, 3, 4, 2)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    ref_out, ref_state = reference(packed)
    ref_out, _ = nn.utils.rnn.pad_packed_sequence(ref_out, batch_first=True)
    valid = torch.arange(7) < lengths[:, None]
    assert torch.allclose(out_padded[valid], ref_out[valid], atol=1e-5)
    assert torch.allclose(out_packed[valid], ref_out[valid], atol=1e-5)
    # pool last = torch's h_n of the top layer, both directions (forward: last real step; backward: t = 1)
    h_n = (ref_state[0] if cell == "lstm" else ref_state)[-2:]
    assert torch.allclose(rnn.pool(out_padded, lengths, "last", 4), torch.cat([h_n[0], h_n[1]], 1), atol=1e-5)


def test_packed_and_unpacked_agree_on_unpadded_input():
    torch.manual_seed(0)
    x, lengths = torch.randn(3, 6, 2), torch.full((3,), 6)
    module = rnn.Recurrent("lstm", 2, 5, layers=2, bidirectional=True, dropout=0.0)
    padded, _ = module(x, lengths)
    module.packed = True
    assert torch.allclose(module(x, lengths)[0], padded, atol=1e-6)
    reference = torch_stack_from(module, "lstm", 2, 5, 2)
    assert torch.allclose(reference(x)[0], padded, atol=1e-5)


@pytest.mark.parametrize("pool", rnn.POOLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_does_not_change_a_prediction(pool, bidirectional):
    torch.manual_seed(0)
    model = rnn.Classifier(model_args(pool=pool, bidirectional=bidirectional, layers=2), 3, vocab_size=20).eval()
    x, lengths = padded_batch([4, 9, 6])
    with torch.no_grad():
        together = model(x, lengths)
        alone = torch.cat([model(x[i:i + 1, :n], lengths[i:i + 1]) for i, n in enumerate(lengths.tolist())])
        x[0, 4:] = torch.randint(2, 20, (5,))          # other padding, same prediction
        repadded = model(x, lengths)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(repadded, together, atol=1e-6)


def test_last_pooling_reads_the_end_of_each_sequence_in_both_directions():
    torch.manual_seed(0)
    model = rnn.Classifier(model_args(bidirectional=True), 3, vocab_size=20).eval()
    x, lengths = padded_batch([5, 9])
    H = model.hidden
    with torch.no_grad():
        base = model.features(x, lengths)
        end, start = x.clone(), x.clone()
        end[0, 4] = 2 if x[0, 4] != 2 else 3                         # the last real token of a padded sequence
        start[0, 0] = 2 if x[0, 0] != 2 else 3
        after_end, after_start = model.features(end, lengths), model.features(start, lengths)
    forward_changed = (after_end[0, :H] - base[0, :H]).abs().max()
    assert forward_changed > 1e-4                                    # the forward state has read the last token
    assert (after_end[0, H:] - base[0, H:]).abs().max() > 1e-4       # so has the backward one (its first)
    assert (after_start[0, H:] - base[0, H:]).abs().max() > 1e-4     # ... and the backward state the first token
    assert torch.allclose(after_end[1], base[1])                     # the other sequence is untouched


def test_reverse_padded_reverses_within_the_length_and_is_its_own_inverse():
    x = torch.arange(12).view(2, 6)
    out = rnn.reverse_padded(x, torch.tensor([4, 6]))
    assert out.tolist() == [[3, 2, 1, 0, 4, 5], [11, 10, 9, 8, 7, 6]]
    assert torch.equal(rnn.reverse_padded(out, torch.tensor([4, 6])), x)


# ----------------------------------------------------------------------------- audio

def test_the_mel_filter_bank_has_its_shape_and_sums_to_one_between_the_outer_centres():
    bank = rnn.mel_filter_bank(n_mels=20, n_fft=400, sample_rate=16000)
    assert bank.shape == (20, 201)
    freqs = torch.linspace(0, 8000, 201)
    mel = lambda f: 2595 * math.log10(1 + f / 700)
    centres = [700 * (10 ** (m / 2595) - 1) for m in torch.linspace(0, mel(8000), 22).tolist()[1:-1]]
    inside = (freqs >= centres[0]) & (freqs <= centres[-1])
    assert torch.allclose(bank.sum(0)[inside], torch.ones(int(inside.sum())), atol=1e-5)
    assert (bank >= 0).all() and bank.max() <= 1 + 1e-6
    assert (bank > 0).any(1).all()                                   # no empty filter, and too many filters fail:
    with pytest.raises(SystemExit, match="--n-mels 128 is too many for 400-point frames"):
        rnn.mel_filter_bank(n_mels=128, n_fft=400, sample_rate=16000)
    peaks = freqs[bank.argmax(1)]                                    # peaks rise, and more slowly at low frequencies
    assert (peaks[1:] >= peaks[:-1]).all() and peaks[1] - peaks[0] < peaks[-1] - peaks[-2]


def test_log_mel_frames_every_10_ms_and_a_tone_lights_its_band():
    rate = 16000
    t = torch.arange(rate) / rate
    tone = 0.5 * torch.sin(2 * math.pi * 1000 * t)
    bank = rnn.mel_filter_bank(40, 400, rate)
    frames = rnn.log_mel(tone, rate, bank)
    assert frames.shape == (101, 40)                                 # 1 s: 100 hops of 10 ms, centred frames
    band = frames[50].argmax().item()
    assert bank[band, round(1000 / 40)] > 0.5                        # the band whose filter covers 1 kHz


def write_wav(path, samples, rate, width=2):
    """Mono PCM samples in [-1, 1] as a WAV file of `width` bytes per sample."""
    scale = 2 ** (8 * width - 1) - 1
    ints = np.round(np.asarray(samples) * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    else:
        raw = ints.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_reads_every_pcm_width(tmp_path, width):
    samples = np.sin(np.linspace(0, 20, 300)) * 0.8
    write_wav(tmp_path / "a.wav", samples, 8000, width)
    read, rate = common.read_wav(tmp_path / "a.wav")
    assert rate == 8000 and read.shape == (300,)
    assert np.abs(read.numpy() - samples).max() < max(2.0 / 2 ** (8 * width - 1), 1e-7)   # float32 limits 32 bit


def test_an_unreadable_wav_is_a_clear_error(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF....not a wav")
    with pytest.raises(SystemExit, match="cannot read .*bad.wav as a PCM WAV file"):
        common.read_wav(tmp_path / "bad.wav")


def tones(root, per_split=(16, 4, 4), rate=8000):
    """Three classes of synthetic sounds: a low tone, a high tone, a rising chirp; random lengths, phases, noise."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val", "test"), per_split):
        for name in ("low", "high", "chirp"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                t = np.arange(int(rate * rng.uniform(0.2, 0.4))) / rate
                phase = rng.uniform(0, 2 * np.pi)
                f = {"low": 300 + 0 * t, "high": 2000 + 0 * t, "chirp": 300 + 4000 * t}[name]
                wave_ = 0.5 * np.sin(2 * np.pi * np.cumsum(f) / rate + phase) + 0.05 * rng.standard_normal(len(t))
                write_wav(root / split / name / f"{i}.wav", np.clip(wave_, -1, 1), rate)


def test_a_tiny_tone_set_is_learned_from_wav_files(tmp_path):
    tones(tmp_path / "tones")
    final = rnn.run_task(rnn.get_args(["--dataset", "audiofolder", "--data-dir", str(tmp_path / "tones"),
                                       "--sample-rate", "8000", "--n-mels", "16", "--steps", "60", "--lr", "1e-2",
                                       "--out", str(tmp_path), "--name", "tones", *TINY]))
    assert final["test_accuracy"] == 1.0
    train = [r["loss"] for r in map(json.loads, (tmp_path / "rnn/tones/metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    # below log(1 + 2/e) = 0.55, the floor of a loss that took a softmax before the cross-entropy
    assert np.mean(train[-10:]) < 0.2 < np.mean(train[:5])


# ----------------------------------------------------------------------------- text classification

def write_csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))


def end_marker_rows(n, seed=0):
    """Random a/b strings whose class is their last character: only a model that reads the end can tell."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        body = "".join(rng.choice(["a", "b"], rng.integers(3, 25)))
        label = rng.choice(["x", "y"])
        rows.append((body + label, label))
    return rows


def test_a_classifier_learns_the_end_marker_and_the_checkpoint_resumes_exactly(tmp_path):
    """Exactly, dropout included: the checkpoint carries the random state its masks are drawn from."""
    write_csv(tmp_path / "train.csv", end_marker_rows(400))
    write_csv(tmp_path / "test.csv", end_marker_rows(100, seed=1))
    flags = ["--dataset", "csv", "--data-dir", str(tmp_path), "--lr", "1e-2", "--out", str(tmp_path), *TINY]
    final = rnn.run_task(rnn.get_args([*flags, "--steps", "80", "--name", "whole"]))
    assert final["test_accuracy"] > 0.95 and final["majority_class_test_accuracy"] < 0.7
    rnn.run_task(rnn.get_args([*flags, "--steps", "40", "--name", "halves"]))
    rnn.run_task(rnn.get_args([*flags, "--steps", "80", "--name", "halves", "--resume"]))
    whole, halves = (torch.load(tmp_path / f"rnn/{n}/ckpt.pt", weights_only=False)["model"] for n in ("whole", "halves"))
    assert all(torch.equal(whole[k], halves[k]) for k in whole)
    for name in ("confusion.png", "curves.png", "tables.md", "test_scores.json", "args.json"):
        assert (tmp_path / "rnn/whole" / name).exists()


def test_a_checkpoint_that_does_not_match_the_flags_or_the_data_is_refused(tmp_path):
    write_csv(tmp_path / "train.csv", end_marker_rows(100))
    flags = ["--dataset", "csv", "--data-dir", str(tmp_path), "--out", str(tmp_path), "--name", "r", *TINY]
    rnn.run_task(rnn.get_args([*flags, "--steps", "2"]))
    with pytest.raises(SystemExit, match=re.escape("was made with --cell lstm; this run has --cell gru")):
        rnn.run_task(rnn.get_args([*flags, "--steps", "4", "--resume", "--cell", "gru"]))
    write_csv(tmp_path / "train.csv", [(t, "z" if y == "y" else y) for t, y in end_marker_rows(100)])
    with pytest.raises(SystemExit, match=re.escape("trained on the classes ['x', 'y'], this data has ['x', 'z']")):
        rnn.run_task(rnn.get_args([*flags, "--steps", "4", "--resume"]))


def test_scores_of_a_known_confusion():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predictions = torch.tensor([0, 0, 1, 1, 2, 2])
    s = rnn.scores(predictions, labels, 3)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["precision"] == pytest.approx([1.0, 0.5, 0.5]) and s["recall"] == pytest.approx([2 / 3, 0.5, 1.0])
    assert s["f1"] == pytest.approx([0.8, 0.5, 2 / 3])
    assert s["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert s["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_the_variant_table_has_a_row_per_combination(tmp_path, capsys):
    write_csv(tmp_path / "train.csv", end_marker_rows(200))
    results = rnn.ablate(rnn.get_args(["--dataset", "csv", "--data-dir", str(tmp_path), "--out", str(tmp_path),
                                       "--steps", "3", "--ablate", "cell=rnn,gru", "bidirectional=false,true",
                                       *TINY]))
    assert [(v["cell"], v["bidirectional"]) for v, _ in results] == [("rnn", False), ("rnn", True), ("gru", False),
                                                                     ("gru", True)]
    counts = [sum(f["parameters"].values()) for _, f in results]
    assert counts[2] > counts[0] and counts[1] > counts[0]           # GRU: 3 gate blocks; bidirectional: 2 directions
    table = (tmp_path / "rnn/ablation/ablation.md").read_text()
    assert table.count("\n") == 6 and "test_accuracy" in table
    with pytest.raises(SystemExit, match="--ablate over 'lr' is not supported"):
        rnn.ablate(rnn.get_args(["--ablate", "lr=1,2"]))


# ----------------------------------------------------------------------------- generation

def test_sampling_is_deterministic_under_a_seed_and_greedy_as_temperature_goes_to_zero():
    torch.manual_seed(0)
    vocab = rnn.Vocabulary(list("abcdefgh "))
    model = rnn.LanguageModel(model_args(), len(vocab))
    draw = lambda t, seed=0: rnn.sample(model, vocab, "ab", 40, t, torch.Generator().manual_seed(seed), "cpu")
    assert draw(1.0) == draw(1.0) and draw(1.0) != draw(1.0, seed=1)
    assert draw(1e-4) == draw(0.0) == draw(0.0, seed=1)
    assert "<" not in draw(5.0)                                      # <pad> and <unk> are never drawn
    with pytest.raises(SystemExit, match=re.escape("unknown: ['z']")):
        rnn.sample(model, vocab, "az", 5, 1.0, torch.Generator(), "cpu")


def test_the_carried_state_is_detached():
    model = rnn.LanguageModel(model_args(layers=2), 10)
    _, states = model(torch.randint(2, 10, (3, 5)))
    assert states[0][0].grad_fn is not None
    assert all(s.grad_fn is None and not s.requires_grad for state in rnn.detach(states) for s in state)


def test_the_language_model_learns_a_text_and_samples_its_words(tmp_path):
    words = ["river", "stone", "cloud", "lantern", "meadow"]
    rng = np.random.default_rng(0)
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choice(words, 3000)) + "\n")
    flags = ["--task", "generate", "--dataset", "textfile", "--data-dir", str(tmp_path / "corpus.txt"),
             "--bptt", "32", "--hidden", "32", "--embed", "8", "--batch-size", "16", "--device", "cpu",
             "--lr", "1e-2", "--out", str(tmp_path), "--name", "lm", "--prime", "river ", "--sample-length", "60",
             "--temperatures", "0,0.5"]
    final = rnn.run_task(rnn.get_args([*flags, "--steps", "120", "--eval-every", "60"]))
    # five equiprobable words: log2(5) bits per word over about 6.6 characters, about 0.35 bits per character
    assert final["test_bpc"] < 1.0 < final["uniform_bpc"]
    assert final["known_words_T0.5"] > 0.9
    samples = (tmp_path / "rnn/lm/samples.md").read_text()
    greedy = samples.split("## temperature 0 ")[1].split("```")[1].strip()
    assert greedy.startswith("river ") and len(greedy) == len("river ") + 60
    generated = greedy[len("river "):].split()
    assert sum(w in words for w in generated) >= len(generated) - 2   # allow a word cut at either end
    again = rnn.run_task(rnn.get_args([*flags, "--sample-only", "--temperatures", "0.5"]))
    assert again["known_words_T0.5"] == final["known_words_T0.5"]    # the same seed, the same sample


# ----------------------------------------------------------------------------- data

def test_the_stdlib_set_is_deterministic_disjoint_and_without_docstrings():
    data = common.load_sequences("stdlib")
    assert data.classes == list(common.STDLIB_PACKAGES) and data.kind == "text"
    sizes = [len(items) for items, _ in data.splits]
    assert sizes[0] > 3000 and min(sizes[1:]) > 300
    sets = [set(items) for items, _ in data.splits]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert all(text.startswith(("def ", "async def ")) for items, _ in data.splits for text in items)
    second_lines = [text.split("\n")[1].lstrip() for items, _ in data.splits for text in items if "\n" in text]
    opening = ('"""', "'''", 'r"""', "r'''")
    assert not any(line.startswith(opening) for line in second_lines)          # no docstring left
    assert [len(items) for items, _ in common.load_sequences("stdlib").splits] == sizes


def test_function_source_drops_the_docstring_and_dedents():
    source = 'class A:\n    def f(self):\n        """Doc\n        more."""\n        return 1\n'
    import ast
    (node, name), = common._definitions(ast.parse(source))
    assert name == "A.f"
    assert common._function_source(node, source.splitlines()) == "def f(self):\n    return 1"


def test_the_pydoc_corpus_splits_by_topic():
    train, val, test = common.load_corpus("pydoc")
    assert len(train) > 300_000 and len(val) > 10_000 and len(test) > 10_000
    assert common.load_corpus("pydoc") == (train, val, test)


def test_textfolder_and_csv_loaders(tmp_path):
    for c in ("neg", "pos"):
        (tmp_path / "texts" / c).mkdir(parents=True)
        for i in range(20):
            (tmp_path / "texts" / c / f"{i}.txt").write_text(f"{c} text {i}")
    data = common.load_sequences("textfolder", tmp_path / "texts")
    assert data.classes == ["neg", "pos"] and [len(items) for items, _ in data.splits] == [32, 4, 4]
    items, labels = data.splits[0]
    assert all(text.startswith(data.classes[y]) for text, y in zip(items, labels.tolist()))
    write_csv(tmp_path / "one.csv", [(f"t{i}", "b" if i % 2 else "a") for i in range(50)])
    data = common.load_sequences("csv", tmp_path / "one.csv")
    assert data.classes == ["a", "b"] and [len(i) for i, _ in data.splits] == [40, 5, 5]


def test_names_are_kept_once_and_never_under_two_languages(tmp_path):
    folder = tmp_path / "names" / "data" / "names"
    folder.mkdir(parents=True)
    (folder / "Arabic.txt").write_text("\n".join(["Nader", "Nader", "Haddad", "Bitar"] * 50 + ["Sala"]) + "\n")
    (folder / "Italian.txt").write_text("Rossi\nBianchi\nSala\n")
    data = common.load_sequences("names", tmp_path)
    assert data.classes == ["Arabic", "Italian"]
    everything = [(name, y) for items, labels in data.splits for name, y in zip(items, labels.tolist())]
    assert sorted(everything) == [("Bianchi", 1), ("Bitar", 0), ("Haddad", 0), ("Nader", 0), ("Rossi", 1)]


def test_words_are_tokenized_and_rare_ones_are_unknown():
    vocab = rnn.Vocabulary.build(["The cat, the cat.", "a dog"], "word", 100)
    assert rnn.tokenize("The cat, sat.", "word") == ["the", "cat", ",", "sat", "."]
    assert vocab.encode("the cat sat", "word").tolist() == [vocab.stoi["the"], vocab.stoi["cat"], rnn.UNK]
    assert "dog" not in vocab.stoi                                   # seen once: unknown


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist' for classification"),
    (["--cell", "transformer"], "unknown --cell 'transformer'"),
    (["--task", "generate", "--bidirectional"], "a bidirectional model would read the answer"),
    (["--task", "generate", "--dataset", "novel"], "unknown corpus 'novel' for generation"),
    (["--dataset", "textfolder", "--data-dir", "/nonexistent"], "--data-dir /nonexistent is not a directory"),
    (["--dataset", "csv", "--data-dir", "/nonexistent.csv"], "--data-dir /nonexistent.csv does not exist"),
    (["--clip", "0"], "--clip must be positive"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--max-length", "-5"], "--max-length must be at least 0"),
    (["--task", "generate", "--dataset", "textfile", "--data-dir", "/nonexistent.txt"], "is not a file"),
    (["--sample-only"], "--sample-only samples text from a --task generate run"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
])
def test_bad_input_is_one_clear_line(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        rnn.run_task(rnn.get_args([*argv, "--out", str(tmp_path), "--device", "cpu"]))


def test_a_csv_without_its_columns_and_an_offline_download_are_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "bad.csv").write_text("sentence,class\nhello,a\n")
    with pytest.raises(SystemExit, match="needs a header row with the columns text and label"):
        common.load_sequences("csv", tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("text,label\nhello,a\nworld\n")
    with pytest.raises(SystemExit, match="short.csv:3: a row without its text or label"):
        common.load_sequences("csv", tmp_path / "short.csv")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="cannot read .*latin1.csv as a UTF-8 CSV file"):
        common.load_sequences("csv", tmp_path / "latin1.csv")
    (tmp_path / "excel.csv").write_text("\ufefftext,label\n" + "".join(f"t{i},a\n" for i in range(20)),
                                        encoding="utf-8")            # Excel's byte-order mark is fine
    assert common.load_sequences("csv", tmp_path / "excel.csv").classes == ["a"]
    monkeypatch.setitem(common.URLS, "names", "http://127.0.0.1:9/data.zip")     # nothing listens there
    with pytest.raises(SystemExit, match="names is not in .* and could not be downloaded"):
        common.load_sequences("names", tmp_path)


def test_the_imdb_and_speech_commands_layouts_load_without_a_download(tmp_path):
    for split, n in (("train", 30), ("test", 6)):
        for label in ("neg", "pos", *(["unsup"] if split == "train" else [])):      # unsup: unlabelled, skipped
            folder = tmp_path / "imdb" / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}_7.txt").write_text(f"{label} review<br />line two")
    data = common.load_sequences("imdb", tmp_path)
    assert data.classes == ["neg", "pos"] and [len(items) for items, _ in data.splits] == [54, 6, 12]
    assert "<br />" not in data.splits[0][0][0]
    root = tmp_path / "speechcommands"
    for word in ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "bird", "_background_noise_"):
        (root / word).mkdir(parents=True)
        for i in range(3):
            write_wav(root / word / f"{i}.wav", np.zeros(800), 16000)
    (root / "validation_list.txt").write_text("yes/1.wav\nbird/1.wav\n")
    (root / "testing_list.txt").write_text("yes/2.wav\ngo/2.wav\n")
    data = common.load_sequences("speechcommands", tmp_path, sample_rate=8000)
    assert data.kind == "audio" and data.classes == list(common.SPEECH_COMMANDS)
    assert [len(items) for items, _ in data.splits] == [27, 1, 2]
    assert data.splits[2][1].tolist() == [0, 9] and data.splits[0][0][0].shape == (400,)   # resampled to 8 kHz
