"""MIST's objective and second-view augmentation (models/sparse/losses.py) against algorithms.md §4.2-4.3 closed forms.

The reference loss below is written from the algorithms.md §4.3 text with explicit Python loops over rows and
columns in float64 (no shared code with the implementation):

    z_a = p_a / (||p_a|| + 1e-8),  S_ab = z_a . z_b,  S'_ab = S_ab - max_c S_ac (max detached),
    E_ab = exp(S'_ab / tau) (b != a),  E_aa = 0,  D_a = sum_b E_ab,
    l_ab = -log(E_ab / (D_a + 1e-8) + 1e-8),  P(a) = {b : y_b = y_a} (a itself included),
    w_ab = 1[b in P(a)] / (|P(a)| + 1e-8),
    L = 1/(2B) sum_i (l_{i,i+B} + l_{i+B,i}) + 1/B sum_a sum_b w_ab l_ab.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.sparse import losses
from models.sparse.losses import SecondViewAugment, supervised_nt_xent, two_views
from utils.runtime import make_generator

TAU = 0.07
EPS = 1e-8
SELF_TERM = -math.log(EPS)  # l_aa = -log(0 / (D_a + eps) + eps) = -log(1e-8) ~ 18.4207




# ---------------------------------------------------------------------------------------------
# independent reference of algorithms.md §4.3
# ---------------------------------------------------------------------------------------------
def reference_loss(proj: torch.Tensor, labels: list[int], tau: float = TAU, exclude_self: bool = False,
                   drop_self_terms: bool = False) -> torch.Tensor:
    """Loop-based algorithms.md §4.3 loss (float64 scalar ops, differentiable w.r.t. ``proj``).

    Args:
        proj: (2B, d) float64.
        labels: B python ints.
        exclude_self: P(a) without a (the algorithms.md §9.5 fix).
        drop_self_terms: keep the weights 1/(|P(a)|+eps) with a counted in |P(a)|, but leave the
            constant self terms w_aa l_aa out of the sum.
    """
    n = proj.shape[0]
    b = n // 2
    y = list(labels) + list(labels)
    z = []
    for a in range(n):
        norm = torch.sqrt(sum(proj[a, k] ** 2 for k in range(proj.shape[1])))
        z.append(proj[a] / (norm + EPS))
    sim = [[sum(z[a][k] * z[c][k] for k in range(proj.shape[1])) for c in range(n)] for a in range(n)]
    nll = {}
    for a in range(n):
        row_max = max(float(sim[a][c].detach()) for c in range(n))  # detached: a plain float
        e = [torch.exp((sim[a][c] - row_max) / tau) if c != a else torch.zeros((), dtype=proj.dtype)
             for c in range(n)]
        denom = sum(e)
        for c in range(n):
            nll[a, c] = -torch.log(e[c] / (denom + EPS) + EPS)
    instance = sum(nll[i, i + b] + nll[i + b, i] for i in range(b)) / (2 * b)
    sup = torch.zeros((), dtype=proj.dtype)
    for a in range(n):
        positives = [c for c in range(n) if y[c] == y[a] and not (exclude_self and c == a)]
        weight = 1.0 / (len(positives) + EPS)
        for c in positives:
            if drop_self_terms and c == a:
                continue
            sup = sup + weight * nll[a, c]
    return instance + sup / b


def random_case(seed: int, b: int, d: int = 5, n_labels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(2 * b, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, n_labels, (b,), generator=gen)
    labels[1] = labels[0]  # at least one repeated label
    return proj, labels


CASES = [(0, 3), (1, 4), (2, 5), (3, 6), (4, 4)]


def test_reference_is_sane():
    """The reference's self term alone is -log(1e-8): a check of the test's own formula."""
    proj, labels = random_case(0, 3)
    full = reference_loss(proj, labels.tolist())
    no_self = reference_loss(proj, labels.tolist(), drop_self_terms=True)
    counts = [2 * int((labels == labels[i % 3]).sum()) for i in range(6)]
    assert float(full - no_self) == pytest.approx(sum(SELF_TERM / (c + EPS) for c in counts) / 3, rel=1e-12)


@pytest.mark.parametrize("seed,b", CASES)
def test_loss_matches_reference_default(seed, b):
    proj, labels = random_case(seed, b)
    got = supervised_nt_xent(proj, labels)
    want = reference_loss(proj, labels.tolist())
    assert got.dtype == torch.float64 and got.dim() == 0
    assert float(got) == pytest.approx(float(want), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("seed,b", CASES)
def test_loss_matches_reference_exclude_self(seed, b):
    proj, labels = random_case(seed, b)
    got = supervised_nt_xent(proj, labels, exclude_self_positive=True)
    want = reference_loss(proj, labels.tolist(), exclude_self=True)
    assert float(got) == pytest.approx(float(want), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_loss_temperature_argument(tau):
    proj, labels = random_case(7, 4)
    assert float(supervised_nt_xent(proj, labels, temperature=tau)) == pytest.approx(
        float(reference_loss(proj, labels.tolist(), tau=tau)), rel=1e-10, abs=1e-10)


def test_loss_float32_close_to_float64_reference():
    proj, labels = random_case(11, 6)
    got = supervised_nt_xent(proj.float(), labels)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(reference_loss(proj, labels.tolist())), rel=1e-5)


@pytest.mark.parametrize("seed,b", CASES)
def test_self_positive_constant_offset(seed, b):
    """Default loss = loss without the self terms + (1/B) sum_a (-log 1e-8) / (|P(a)| + 1e-8) (algorithms.md §4.3)."""
    proj, labels = random_case(seed, b)
    y = labels.repeat(2)
    sizes = [int((y == y[a]).sum()) for a in range(2 * b)]  # |P(a)|, a itself included
    offset = sum(SELF_TERM / (s + EPS) for s in sizes) / b
    got = float(supervised_nt_xent(proj, labels))
    without_self = float(reference_loss(proj, labels.tolist(), drop_self_terms=True))
    assert got - without_self == pytest.approx(offset, rel=1e-9)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_self_offset_balanced_batch(k):
    """With k originals per class, |P(a)| = 2k and the offset is 18.42 / k (algorithms.md §4.3's example)."""
    n_classes = 3
    b = k * n_classes
    gen = torch.Generator().manual_seed(100 + k)
    proj = torch.randn(2 * b, 4, generator=gen, dtype=torch.float64)
    labels = torch.arange(n_classes).repeat(k)
    got = float(supervised_nt_xent(proj, labels))
    without_self = float(reference_loss(proj, labels.tolist(), drop_self_terms=True))
    assert got - without_self == pytest.approx(2 * b * SELF_TERM / (2 * k + EPS) / b, rel=1e-9)
    assert got - without_self == pytest.approx(SELF_TERM / k, rel=1e-8)


@pytest.mark.parametrize("seed,b", CASES)
def test_self_term_has_zero_gradient(seed, b):
    """grad of the default loss = grad of the reference without the self terms (same 1/|P(a)| weights)."""
    proj, labels = random_case(seed, b)
    p1 = proj.clone().requires_grad_(True)
    supervised_nt_xent(p1, labels).backward()
    p2 = proj.clone().requires_grad_(True)
    reference_loss(p2, labels.tolist(), drop_self_terms=True).backward()
    p3 = proj.clone().requires_grad_(True)
    reference_loss(p3, labels.tolist()).backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(p3.grad, p2.grad, rtol=1e-9, atol=1e-11)
    assert p1.grad.abs().max() > 0


def test_exclude_self_relations_from_the_implementation_alone():
    """Closed-form relations between the two variants, derived by hand from the algorithms.md §4.3 formula.

    With all labels distinct, P(a) = {a, view(a)}: L_excl = I (1 + 2/(1+eps)) and
    L_def = I (1 + 2/(2+eps)) + 2 c/(2+eps), with I the instance term and c = -log(1e-8).
    With k originals per class, S_a = sum_{b in P(a), b != a} l_ab gives
    L_def = I + (L_excl - I) (2k - 1 + eps)/(2k + eps) + 2 c/(2k + eps).
    """
    b, k = 6, 2
    gen = torch.Generator().manual_seed(5)
    proj = torch.randn(2 * b, 4, generator=gen, dtype=torch.float64)
    distinct = torch.arange(b)
    l_excl_distinct = float(supervised_nt_xent(proj, distinct, exclude_self_positive=True))
    instance = l_excl_distinct / (1 + 2 / (1 + EPS))
    l_def_distinct = float(supervised_nt_xent(proj, distinct))
    assert l_def_distinct == pytest.approx(instance * (1 + 2 / (2 + EPS)) + 2 * SELF_TERM / (2 + EPS), rel=1e-10)

    balanced = torch.arange(b // k).repeat(k)
    l_excl = float(supervised_nt_xent(proj, balanced, exclude_self_positive=True))
    l_def = float(supervised_nt_xent(proj, balanced))
    want = instance + (l_excl - instance) * (2 * k - 1 + EPS) / (2 * k + EPS) + 2 * SELF_TERM / (2 * k + EPS)
    assert l_def == pytest.approx(want, rel=1e-10)


def test_loss_depends_on_label_equality_only():
    proj, labels = random_case(9, 5)
    relabelled = labels * 7 + 100  # a bijection of the label values
    assert float(supervised_nt_xent(proj, labels)) == float(supervised_nt_xent(proj, relabelled))


def test_loss_rejects_odd_rows_and_wrong_label_count():
    with pytest.raises(ValueError):
        supervised_nt_xent(torch.randn(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        supervised_nt_xent(torch.randn(7, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        supervised_nt_xent(torch.randn(6, 4), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# second-view augmentation (algorithms.md §4.2)
# ---------------------------------------------------------------------------------------------
def luma_reference(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (3, H, W) float64, every channel 0.299 R + 0.587 G + 0.114 B."""
    img = img.double()
    gray = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    return gray.expand(3, *gray.shape)


def images(n: int, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_flip_is_exact_mirror(monkeypatch):
    """Gray off, crop off: every output is x or x.flip(-1), bit for bit, about half of them flipped."""
    n = 400
    x = images(n, 6, 7)
    monkeypatch.setattr(losses, "GRAY_P", 0.0)
    aug = SecondViewAugment(make_generator(3))
    monkeypatch.setattr(aug, "crop", lambda t, rows=None: t)
    out = aug(x)
    flipped = 0
    for i in range(n):
        same, mirror = torch.equal(out[i], x[i]), torch.equal(out[i], x[i].flip(-1))
        assert same != mirror  # exactly one (no image is its own mirror)
        flipped += mirror
    sigma = math.sqrt(n * 0.5 * 0.5)
    assert abs(flipped - n * 0.5) < 5 * sigma


def test_grayscale_is_luma_on_all_channels(monkeypatch):
    """Gray always on, crop off: each output equals L = 0.299R + 0.587G + 0.114B (of x or its mirror)."""
    n = 64
    x = images(n, 5, 6, seed=1)
    monkeypatch.setattr(losses, "GRAY_P", 1.0)
    aug = SecondViewAugment(make_generator(4))
    monkeypatch.setattr(aug, "crop", lambda t, rows=None: t)
    out = aug(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(n):
        assert torch.equal(out[i, 0], out[i, 1]) and torch.equal(out[i, 1], out[i, 2])
        candidates = [luma_reference(x[i]), luma_reference(x[i].flip(-1))]
        assert min(float((out[i].double() - c).abs().max()) for c in candidates) < 1e-6


def test_grayscale_probability(monkeypatch):
    """Default p = 0.25: the share of gray outputs (three equal channels) is 0.25 within 5 sigma."""
    n = 800
    x = images(n, 4, 4, seed=2)
    aug = SecondViewAugment(make_generator(5))
    monkeypatch.setattr(aug, "crop", lambda t, rows=None: t)
    out = aug(x)
    gray = sum(bool(torch.equal(out[i, 0], out[i, 1]) and torch.equal(out[i, 1], out[i, 2])) for i in range(n))
    assert abs(gray - n * losses.GRAY_P) < 5 * math.sqrt(n * 0.25 * 0.75)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_crop_keeps_shape_and_dtype(dtype, hw):
    x = images(5, *hw, seed=3).to(dtype)
    aug = SecondViewAugment(make_generator(6))
    out = aug.crop(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    full = aug(x)
    assert full.shape == x.shape and full.dtype == dtype


def test_crop_of_constant_image_is_constant():
    """Bilinear resampling with reflection padding of a constant image gives the constant everywhere."""
    x = torch.full((6, 3, 10, 10), 0.375)
    out = SecondViewAugment(make_generator(7)).crop(x)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_identity_affine_grid_is_identity():
    """theta = [[w/S, 0, dx], [0, h/S, dy]] with w = h = S, dx = dy = 0 resamples to the input."""
    x = images(3, 9, 9, seed=4)
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(3, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


def test_full_size_crop_with_zero_offset_is_identity(monkeypatch):
    """Drive crop's draws: area draw 1 -> area S^2, aspect draw 0.5 -> exp(0) = 1, so w = h = S and the
    offsets floor(u * 1) + 0 = 0; the crop is then the identity within 1e-5."""
    x = images(4, 12, 12, seed=5)
    aug = SecondViewAugment(make_generator(8))
    draws = iter([1.0, 0.5, 0.3, 0.7])  # area, aspect, x offset, y offset

    def fake_rand(*shape, device):
        return torch.full(shape, next(draws), device=device)

    monkeypatch.setattr(aug, "_rand", fake_rand)
    out = aug.crop(x)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


def _scripted_rand(monkeypatch, aug, script):
    """Make ``aug._rand`` return the scripted tensors in order (area, aspect, x offset, y offset draws)."""
    queue = list(script)

    def fake_rand(*shape, device):
        values = queue.pop(0)
        assert tuple(values.shape) == tuple(shape)
        return values.to(device)

    monkeypatch.setattr(aug, "_rand", fake_rand)


def _resample(x: torch.Tensor, theta: list) -> torch.Tensor:
    t = torch.tensor(theta, dtype=x.dtype)
    grid = torch.nn.functional.affine_grid(t, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def test_crop_sizes_offsets_and_first_valid_trials(monkeypatch):
    """algorithms.md §4.2 step 3 by hand, S = 20, N = 2 (20 trials):
    trial 0: area 1.0 S^2, aspect 4/3 -> w = round(sqrt(400 * 4/3)) = 23 > S: invalid, skipped;
    trial 1: area 0.3 S^2 = 120, aspect 1 -> w = h = round(sqrt(120)) = 11 (sample 0);
    trial 2: area 120, aspect 3/4 -> w = round(sqrt(90)) = 9, h = round(sqrt(160)) = 13 (sample 1).
    Offsets: floor(u (2 (S - w) + 1)) + (w - S): sample 0 u = (0, 0.5) -> (-9, 0); sample 1
    u = (0.99, 0.25) -> (floor(22.77) - 11, floor(3.75) - 7) = (11, -4). theta = [[w/S, 0, dx/S], [0, h/S, dy/S]].
    """
    x = images(2, 20, 20, seed=8)
    area = torch.zeros(20)
    area[0] = 1.0
    aspect = torch.zeros(20)
    aspect[0], aspect[1] = 1.0, 0.5
    aug = SecondViewAugment(make_generator(9))
    _scripted_rand(monkeypatch, aug, [area, aspect, torch.tensor([0.0, 0.99]), torch.tensor([0.5, 0.25])])
    out = aug.crop(x)
    want = _resample(x, [[[11 / 20, 0, -9 / 20], [0, 11 / 20, 0]], [[9 / 20, 0, 11 / 20], [0, 13 / 20, -4 / 20]]])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_crop_pads_with_full_size_when_no_trial_is_valid(monkeypatch):
    """Every trial has area S^2 and aspect 4/3 (w > S): full-size crops, offsets 0 -> identity."""
    x = images(3, 10, 10, seed=9)
    aug = SecondViewAugment(make_generator(10))
    _scripted_rand(monkeypatch, aug, [torch.ones(30), torch.ones(30), torch.full((3,), 0.9), torch.full((3,), 0.1)])
    torch.testing.assert_close(aug.crop(x), x, rtol=0, atol=1e-5)


def test_augment_deterministic_for_same_seed():
    x = images(16, 8, 8, seed=6)
    a = SecondViewAugment(make_generator(11))(x)
    b = SecondViewAugment(make_generator(11))(x)
    c = SecondViewAugment(make_generator(12))(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_two_views_originals_first():
    x = images(5, 8, 8, seed=7)
    pair = two_views(x, SecondViewAugment(make_generator(21)))
    assert pair.shape == (10, 3, 8, 8)
    assert torch.equal(pair[:5], x)
    assert torch.equal(pair[5:], SecondViewAugment(make_generator(21))(x))
