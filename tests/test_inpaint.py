"""inpaint.py: masks, the conditioned chain on a model whose answer is known, RePaint's path, Deep Image Prior,
PSNR and SSIM, determinism and the command line."""
import json

import pytest
import torch

import common
import ddpm
import inpaint
from test_ddpm import PointOracle    # the exact eps-model of data that is one image x*
from test_ddpm import GuessRecorder  # records the x_0 guess a self-conditioned network is handed


def tiny_model():
    torch.manual_seed(0)
    return ddpm.UNet(image_size=8, in_channels=3, channels=16, channel_mult=(1, 2), blocks=1, attn_res=(4,),
                     heads=2).eval()


def images(n=4, size=8, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("kind, fraction, hidden", [("right-half", 0.3, 0.5), ("left-half", 0.5, 0.5),
                                                    ("top-half", 0.5, 0.5), ("center", 0.25, 0.25),
                                                    ("box", 0.25, 0.25), ("random-pixels", 0.3, 77 / 256),
                                                    ("stripes", 0.5, 0.5), ("stripes", 0.25, 0.25)])
def test_masks_hide_the_stated_share(kind, fraction, hidden):
    known = inpaint.make_mask(kind, 6, 16, fraction, stripe_width=2, seed=0)
    assert known.shape == (6, 1, 16, 16) and set(known.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(1 - known.mean((1, 2, 3)), torch.full((6,), hidden))


def test_which_half_is_hidden_and_boxes_move():
    right = inpaint.make_mask("right-half", 1, 16)[0, 0]
    assert right[:, :8].all() and not right[:, 8:].any()                # the right half is filled in
    assert not inpaint.make_mask("top-half", 1, 16)[0, 0, :8].any()
    boxes = inpaint.make_mask("box", 8, 16, 0.25, seed=1)
    assert len({tuple(b.flatten().tolist()) for b in boxes}) > 1          # a random place per image
    assert torch.equal(boxes, inpaint.make_mask("box", 8, 16, 0.25, seed=1))
    with pytest.raises(SystemExit, match="unknown --masks entry 'ring'"):
        inpaint.make_mask("ring", 1, 16)
    with pytest.raises(SystemExit, match="--fraction must be between 0 and 1"):
        inpaint.make_mask("center", 1, 16, fraction=1.5)


def test_torchrun_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        inpaint.get_args([])
    assert "inpaint.py runs in one process" in capsys.readouterr().err


def test_resampling_path():
    assert inpaint.resampling_path(6, 2, 1) == [0, 1, 2, 3, 4, 5]         # r = 1: straight down (replace)
    path = inpaint.resampling_path(6, 2, 3)
    assert path == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4, 5]
    moves = [b - a for a, b in zip(path, path[1:])]
    assert set(moves) == {1, -2}                                          # down one kept step, or up j of them
    assert path[-1] == 5 and 5 not in path[:-1]                           # x_0 is reached once, at the end
    # jump points are counted back from the last step before x_0, as RePaint's schedule counts from t = 0
    assert inpaint.resampling_path(7, 2, 2) == [0, 1, 2, 3, 1, 2, 3, 4, 5, 3, 4, 5, 6]
    with pytest.raises(SystemExit, match="--jump and --resample must be at least 1"):
        inpaint.resampling_path(6, 0, 2)


class TwoPointOracle(torch.nn.Module):
    """The exact eps-model of data that is image a or image b, each with probability 1/2: E[x_0 | x_t] weighs a and
    b by their likelihoods N(x_t; sqrt(ab_t) x_i, (1 - ab_t) I)."""

    def __init__(self, a, b, schedule):
        super().__init__()
        self.targets, self.schedule = torch.nn.Parameter(torch.cat([a, b])), schedule

    def forward(self, x, t, x0_estimate=None):       # exact: no use for a previous guess of x_0
        ab = self.schedule.alpha_bar[t].view(-1, 1, 1, 1)
        dist2 = ((x[:, None] - ab.sqrt()[:, None] * self.targets[None]) ** 2).flatten(2).sum(2)     # (B, 2)
        w = torch.softmax(-dist2 / (2 * (1 - ab.view(-1, 1))), dim=1)
        x0 = (w[:, :, None, None, None] * self.targets[None]).sum(1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("resample, start", [(1, 1.0), (3, 1.0), (3, 0.4)])
def test_the_observed_half_decides_the_hidden_half(resample, start):
    """Data is image a or image b, which differ in both halves. Given a's left half, p(x_unobs | x_obs) is a's
    right half: the chain must (nearly) always draw it, where an unconditioned chain would draw b half the
    time. With start < 1 the chain starts from a wrong guess (b) noised to 0.4 T and must still reach a."""
    s = ddpm.Schedule(timesteps=1000)
    a = torch.linspace(-0.7, 0.7, 48).view(1, 3, 4, 4)
    b = -a.flip(-1)
    n = 200
    known = inpaint.make_mask("right-half", n, 4)
    out = inpaint.diffusion_inpaint(TwoPointOracle(a, b, s), s, a.expand(n, -1, -1, -1), known, sample_steps=20,
                                    jump=4, resample=resample, start=start,
                                    init=b.expand(n, -1, -1, -1) if start < 1 else None, seed=0)
    hidden = ~known[0, 0].bool()
    near_a = ((out - a)[..., hidden].abs().amax((1, 2)) < 0.05).float().mean()
    assert near_a > 0.95


@pytest.mark.parametrize("resample, start", [(1, 1.0), (3, 1.0), (3, 0.4)])
def test_every_visited_state_has_the_forward_marginal(resample, start):
    """With an exact model of one-image data x*, every state of the chain (reverse steps, the observed pixels'
    fresh noise, RePaint's jumps up) must be distributed as q(x_t | x*) = N(sqrt(ab_t) x*, (1 - ab_t) I) in
    the observed and the hidden pixels alike. Noising the observed pixels to the step just left instead of
    the step reached, a jump that adds too little noise, or a start from an un-noised guess fails this."""
    s = ddpm.Schedule(timesteps=1000)
    target = images(1, 4)
    known = inpaint.make_mask("right-half", 4000, 4)
    _, visited = inpaint.diffusion_inpaint(PointOracle(target, s), s, target.expand(4000, -1, -1, -1), known,
                                           sample_steps=10, jump=3, resample=resample, start=start,
                                           init=target.expand(4000, -1, -1, -1), seed=0, keep_path=True)
    levels = 11 if start == 1 else 5                                      # kept steps 999, 888, ..., 0; x_0
    assert len(visited) == len(inpaint.resampling_path(levels, 3, resample))
    for t, xt in visited[:-1]:
        ab = s.alpha_bar[t]
        z = (xt.mean(0) - ab.sqrt() * target[0]) / ((1 - ab) / len(xt)).sqrt()   # in standard errors
        for region in (known[0, 0].bool(), ~known[0, 0].bool()):
            assert z[:, region].abs().max() < 4.5, t
            assert abs(xt.var(0)[:, region].mean() / (1 - ab) - 1) < 0.04, t


def test_repaint_hands_a_self_conditioned_network_its_previous_x0_across_jumps():
    s, recorder = ddpm.Schedule(timesteps=100), GuessRecorder()
    with torch.no_grad():
        inpaint.diffusion_inpaint(recorder, s, images(2, 8), inpaint.make_mask("right-half", 2, 8), sample_steps=6,
                                  jump=2, resample=3)
    assert len(recorder.calls) > 6                                        # the jumps add reverse steps
    recorder.check_each_guess_is_the_last_steps_clipped_x0(s)


def test_observed_pixels_are_exact_hidden_ones_never_read_and_a_full_mask_returns_the_input():
    model, s = tiny_model(), ddpm.Schedule(timesteps=50)
    x = images()
    known = inpaint.make_mask("random-pixels", 4, 8, 0.5)
    other = torch.where(known.bool(), x, images(seed=1))                  # same observation, other hidden pixels
    for method, fn in [("repaint", lambda y, m: inpaint.diffusion_inpaint(model, s, y, m, sample_steps=10,
                                                                          jump=2, resample=2, seed=3)),
                       ("dip", lambda y, m: inpaint.dip_inpaint(y, m, iters=5, seed=3))]:
        out = fn(x, known)
        assert torch.equal(out * known, x * known), method
        assert torch.equal(out, fn(other, known)), method                  # nothing leaks from the hidden pixels
        assert torch.equal(fn(x, torch.ones_like(known)), x), method


def test_a_chain_started_below_T_needs_a_guess():
    s = ddpm.Schedule(timesteps=50)
    with pytest.raises(SystemExit, match="needs a guess"):
        inpaint.diffusion_inpaint(tiny_model(), s, images(), inpaint.make_mask("center", 4, 8), start=0.5)


def test_deterministic_under_a_seed():
    model, s = tiny_model(), ddpm.Schedule(timesteps=50)
    x, known = images(), inpaint.make_mask("center", 4, 8, 0.25)
    chain = lambda seed: inpaint.diffusion_inpaint(model, s, x, known, sample_steps=10, jump=2, resample=2,
                                                   seed=seed)
    assert torch.equal(chain(0), chain(0)) and not torch.equal(chain(0), chain(1))
    dip = lambda seed: inpaint.dip_inpaint(x, known, iters=5, seed=seed)
    assert torch.equal(dip(0), dip(0)) and not torch.equal(dip(0), dip(1))


def test_dip_networks_are_independent_per_image_and_fit_what_they_see():
    x, known = images(2, 16), inpaint.make_mask("center", 2, 16, 0.25)
    changed = x.clone()
    changed[1] = images(1, 16, seed=5)[0]
    a = inpaint.dip_inpaint(x, known, iters=20, seed=0)
    b = inpaint.dip_inpaint(changed, known, iters=20, seed=0)
    assert torch.allclose(a[0], b[0], atol=1e-5) and not torch.allclose(a[1], b[1])
    smooth = torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16)
    _, curve = inpaint.dip_inpaint(smooth, known[:1], iters=200, seed=0, truth=smooth)
    fitted = [c[1] for c in curve]
    assert fitted[-1] < 0.1 * fitted[0]                                   # the observed pixels are fitted


def test_psnr_and_ssim():
    x = images(3, 16)
    assert torch.allclose(common.psnr(x, x + 0.2), torch.full((3,), 20.0), atol=1e-4)   # 0.1 on [0, 1]: 20 dB
    assert torch.allclose(common.ssim(x, x), torch.ones(3), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    noisy = [common.ssim(x, (x + sd * torch.randn(x.shape, generator=g)).clamp(-1, 1)).mean().item()
             for sd in (0.05, 0.2, 0.5)]
    assert 1 > noisy[0] > noisy[1] > noisy[2]
    # constant dark images: SSIM = (2 a b + C1) / (a^2 + b^2 + C1) on [0, 1], which pins C1 and the formula
    for ua, ub in ((0.01, 0.02), (0.6, 0.85)):
        a, b = torch.full((1, 3, 16, 16), 2 * ua - 1), torch.full((1, 3, 16, 16), 2 * ub - 1)
        closed = (2 * ua * ub + common.SSIM_C1) / (ua ** 2 + ub ** 2 + common.SSIM_C1)
        assert abs(common.ssim(a, b).item() - closed) < 1e-3, (ua, ub)
    region = inpaint.make_mask("right-half", 3, 16)
    y = torch.where(region.bool(), x, -x)                                # wrong only where region == 0
    assert torch.allclose(common.psnr(y, x, region), torch.full((3,), 100.0))   # capped: MSE 0
    assert torch.allclose(common.ssim(y, x, region), torch.ones(3), atol=1e-5)  # judged on the region alone
    assert (common.ssim(y, x, 1 - region) < common.ssim(y, x)).all()
    noise_fill = torch.where(region.bool(), x, images(3, 16, seed=7))    # hidden half: unrelated noise
    assert common.ssim(noise_fill, x, 1 - region).abs().max() < 0.1       # no credit from the observed half


TINY_DDPM = ["--image-size", "8", "--channels", "16", "--channel-mult", "1,2", "--blocks", "1", "--attn-res", "4",
             "--heads", "2", "--split-sizes", "64,16,16", "--timesteps", "20", "--sample-steps", "5",
             "--batch-size", "8", "--fid-samples", "0", "--steps", "2"]


def test_cli_writes_the_table_figures_and_final(tmp_path, capsys):
    ddpm.main(TINY_DDPM + ["--out", str(tmp_path), "--name", "m"])
    ckpt = str(tmp_path / "ddpm" / "m" / "ckpt.pt")
    inpaint.main(["--ckpt", ckpt, "--num-images", "4", "--masks", "right-half,stripes", "--sample-steps", "6",
                  "--jump", "2", "--resample", "2", "--dip-iters", "20", "--hybrid-dip-iters", "10",
                  "--out", str(tmp_path), "--name", "i"])
    run = tmp_path / "inpaint" / "i"
    final = json.loads((run / "final.json").read_text())
    assert set(final["results"]) == {"right-half", "stripes"}
    assert set(final["results"]["stripes"]) == set(inpaint.METHODS)
    scores = final["results"]["stripes"]["dip"]
    assert {"psnr", "psnr_hidden", "ssim", "ssim_hidden", "seconds_per_image"} <= set(scores)
    for f in ("samples.png", "repaint_chain.png", "inpaint_right-half.png", "inpaint_stripes.png", "dip_curve.png",
              "quality_vs_time.png", "results.md", "args.json"):
        assert (run / f).exists(), f
    assert not (run / "loss.png").exists()                                # nothing is trained here but DIP
    with pytest.raises(SystemExit, match="does not exist"):
        inpaint.main(["--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a checkpoint of ddpm.py"):
        inpaint.main(["--ckpt", str(tmp_path / "inpaint" / "i" / "results.md"), "--out", str(tmp_path)])
    old = torch.load(ckpt, weights_only=False)                           # as saved before --self-cond existed
    del old["args"]["self_cond"]
    torch.save(old, tmp_path / "old.pt")
    inpaint.main(["--ckpt", str(tmp_path / "old.pt"), "--num-images", "2", "--masks", "stripes", "--methods", "replace",
                  "--sample-steps", "4", "--out", str(tmp_path), "--name", "old"])
    assert (tmp_path / "inpaint" / "old" / "final.json").exists()
    del old["args"]["inject"]                                            # as saved before --inject existed
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match="does not record --inject: it was made by an older version of ddpm.py"):
        inpaint.main(["--ckpt", str(tmp_path / "old.pt"), "--out", str(tmp_path)])
    for flags, message in ((["--masks", "ring"], "unknown --masks entry 'ring'"),
                           (["--dip-iters", "0"], "--dip-iters must be at least 1"),
                           (["--fraction", "1"], "--fraction must be between 0 and 1")):
        with pytest.raises(SystemExit):
            inpaint.main(flags)
        assert message in capsys.readouterr().err


def test_without_a_checkpoint_the_default_ddpm_is_trained_first(tmp_path, monkeypatch):
    train_ddpm, calls = ddpm.main, []
    monkeypatch.setattr(ddpm, "main", lambda argv: calls.append(argv) or train_ddpm(TINY_DDPM + argv))  # tiny model
    inpaint.main(["--num-images", "2", "--masks", "right-half", "--methods", "replace", "--sample-steps", "4",
                  "--out", str(tmp_path), "--name", "i"])
    assert len(calls) == 1 and (tmp_path / "ddpm" / "default" / "ckpt.pt").exists()
    final = json.loads((tmp_path / "inpaint" / "i" / "final.json").read_text())
    assert final["ddpm_checkpoint"] == str(tmp_path / "ddpm" / "default" / "ckpt.pt")
