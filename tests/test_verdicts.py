"""The verdict statistics on data whose answer is known (docs/protocol.md's rule)."""

import numpy as np
import pytest

from unparrot.evaluate.verdicts import Claim, bootstrap, decide, judge, mean_difference, paired_difference


def _seeds(shift: float, n: int = 500, seeds: int = 3, base: float = 0.5, seed_sd: float = 0.0, rng_seed: int = 7):
    """Per-image correctness of a control and of a treatment whose accuracy is `shift` higher, per seed."""
    rng = np.random.default_rng(rng_seed)
    t, c = [], []
    for _ in range(seeds):
        b = base + rng.normal(0, seed_sd)
        c.append((rng.random(n) < b).astype(float))
        t.append((rng.random(n) < b + shift).astype(float))
    return t, c


def test_known_shift_holds_none_is_inconclusive_reversed_fails():
    up = judge(paired_difference(*_seeds(0.15), n_boot=400), Claim("+"))
    assert up.verdict == "holds" and up.interval.low > 0 and 0.10 < up.interval.estimate < 0.20
    _, c = _seeds(0.0)
    rng = np.random.default_rng(3)
    t = [rng.permutation(x) for x in c]  # the same outcomes on other images: no difference in the mean
    none = judge(paired_difference(t, c, n_boot=400), Claim("+"))
    assert none.verdict == "inconclusive" and none.interval.low < 0 < none.interval.high
    assert none.interval.estimate == 0 and "boundary" in none.needs["text"]
    for x in t:  # a small true effect: 5 more correct images of 500 per seed
        x[np.flatnonzero(x == 0)[:5]] = 1
    small = judge(paired_difference(t, c, n_boot=400), Claim("+"))
    assert small.verdict == "inconclusive" and small.interval.estimate == pytest.approx(0.01)
    assert small.needs["items_per_seed"] > 2000 and small.needs["seeds"] > 10  # it needs much more data
    assert small.needs["would"] == "hold" and "to hold it would need" in small.line()
    down = judge(paired_difference(*_seeds(-0.15), n_boot=400), Claim("+"))
    assert down.verdict == "fails" and down.interval.high < 0
    assert judge(paired_difference(*_seeds(-0.15), n_boot=400), Claim("-")).verdict == "holds"


def test_equivalence_claim_holds_inside_the_margin_and_fails_outside():
    t, c = _seeds(0.0, n=4000)
    assert judge(paired_difference(t, c, n_boot=300), Claim("0", 0.05)).verdict == "holds"
    t, c = _seeds(0.2, n=4000)
    assert judge(paired_difference(t, c, n_boot=300), Claim("0", 0.05)).verdict == "fails"
    t, c = _seeds(0.05, n=500)  # the effect sits at the margin: cannot be decided
    assert judge(paired_difference(t, c, n_boot=300), Claim("0", 0.05)).verdict == "inconclusive"


def test_holds_needs_every_seed_in_the_claimed_direction():
    from unparrot.evaluate.verdicts import Interval

    iv = Interval(0.05, 0.01, 0.09, [0.08, 0.09, -0.01], [500] * 3, 0.95, 0.02)
    assert decide(iv, Claim("+")) == "inconclusive"
    iv.per_seed = [0.08, 0.09, 0.01]
    assert decide(iv, Claim("+")) == "holds"


def test_seed_noise_widens_the_pooled_interval_and_single_seed_uses_images_only():
    quiet = paired_difference(*_seeds(0.05, seed_sd=0.0), n_boot=400)
    t, c = _seeds(0.0, seed_sd=0.0)
    t = [x if i != 1 else np.ones_like(x) for i, x in enumerate(t)]  # one seed far off the others
    noisy = paired_difference(t, c, n_boot=400)
    assert noisy.halfwidth > 2 * quiet.halfwidth
    assert noisy.item_halfwidth < noisy.halfwidth  # holding seeds fixed removes the seed spread
    one = paired_difference(t[:1], c[:1], n_boot=400)
    assert one.halfwidth == pytest.approx(one.item_halfwidth, rel=0.25)
    assert judge(one, Claim("+", 0.0)).needs.get("seeds") is None  # unknown from one seed


def test_bootstrap_is_seeded_and_reproducible():
    t, c = _seeds(0.03)
    a = paired_difference(t, c, n_boot=300, seed=11)
    b = paired_difference(t, c, n_boot=300, seed=11)
    other = paired_difference(t, c, n_boot=300, seed=12)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (other.low, other.high)
    assert a.estimate == pytest.approx(np.mean([x.mean() - y.mean() for x, y in zip(t, c)]))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="same items"):
        paired_difference([np.ones(3)], [np.ones(4)])
    with pytest.raises(ValueError, match="direction"):
        Claim("up")
    with pytest.raises(ValueError, match="margin"):
        Claim("0")
    with pytest.raises(ValueError, match="share their item axis"):
        bootstrap([{"treatment": np.ones(3), "control": np.ones(2)}], mean_difference)
