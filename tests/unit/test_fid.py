"""tokenflow.fid: the Fréchet distance, streaming statistics, .npz statistics, and the Inception loader."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from tokenflow.fid import (
    INCEPTION_FEATURES,
    FeatureStats,
    Gaussian,
    InceptionFeatures,
    fid_from_stats,
    frechet_distance,
    load_feature_extractor,
)


class SmallFeatures(nn.Module):
    """A small random feature extractor: uint8 N x 3 x H x W -> N x 6."""

    num_features = 6  # torchmetrics reads this instead of probing with a 299 x 299 image

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2)

    def forward(self, x):
        x = torch.relu(self.conv1(x.float() / 127.5 - 1))
        return self.conv2(x).mean((2, 3))


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-8)


def test_frechet_distance_matches_scipy_sqrtm_formula():
    """pytorch-fid's formula (scipy.linalg.sqrtm) on full covariances, and the torch inputs path."""
    rng = np.random.default_rng(1)
    d = 20
    mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), _spd(rng, d), _spd(rng, d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    t = [torch.from_numpy(a) for a in (mu1, s1, mu2, s2)]
    assert frechet_distance(*t) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="different shapes"):
        frechet_distance(mu1, s1, mu2[:5], s2[:5, :5])


def test_identical_sets_give_zero():
    x = torch.randn(200, 16, dtype=torch.float64) * 2 + 1
    a, b = FeatureStats(), FeatureStats()
    a.update(x)
    b.update(x[:77])
    b.update(x[77:])
    scale = float(torch.trace(a.cov()))
    assert abs(fid_from_stats(a, b)) < 1e-9 * scale
    assert fid_from_stats(a, a.gaussian()) == pytest.approx(0.0, abs=1e-9 * scale)


def test_streaming_over_uneven_batches_equals_one_shot():
    # a large mean: the naive sum-of-squares form would lose digits
    x = torch.randn(103, 16, dtype=torch.float64) * 3 + 5
    stats = FeatureStats()
    start = 0
    for size in (1, 2, 50, 0, 7, 43):
        stats.update(x[start : start + size])
        start += size
    assert stats.n == 103 and stats.dim == 16
    assert torch.allclose(stats.mean(), x.mean(0), rtol=0, atol=1e-10)
    assert torch.allclose(stats.cov(), torch.cov(x.T), rtol=0, atol=1e-10)  # unbiased (n - 1), as np.cov
    g = stats.gaussian()
    assert g.n == 103 and g.mu.dtype == np.float64
    np.testing.assert_allclose(g.sigma, np.cov(x.numpy(), rowvar=False), rtol=0, atol=1e-10)


def test_statistics_errors():
    s = FeatureStats()
    with pytest.raises(ValueError, match="no features"):
        s.mean()
    s.update(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        s.cov()
    with pytest.raises(ValueError, match="dimension changed"):
        s.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="non-finite"):
        s.update(torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="uint8"):
        s.update_from_images(SmallFeatures(), torch.zeros(2, 3, 16, 16))


def test_fid_matches_torchmetrics_with_the_same_feature_extractor():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = SmallFeatures().eval()
    g = torch.Generator().manual_seed(3)
    real = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    fake = (real.float() * 0.7 + 40).clamp(0, 255).to(torch.uint8)  # a shifted distribution
    fake[::3] = torch.randint(0, 256, fake[::3].shape, dtype=torch.uint8, generator=g)

    ref = FrechetInceptionDistance(feature=net)
    for chunk in (real[:13], real[13:]):
        ref.update(chunk, real=True)
    ref.update(fake, real=False)
    expected = float(ref.compute())

    a, b = FeatureStats(), FeatureStats()
    for chunk in (real[:5], real[5:31], real[31:]):
        a.update_from_images(net, chunk)
    b.update_from_images(net, fake)
    got = fid_from_stats(b, a)
    assert expected > 1e-3
    assert got == pytest.approx(expected, rel=1e-4)


def test_npz_round_trip_and_foreign_files(tmp_path):
    rng = np.random.default_rng(2)
    g = Gaussian(mu=rng.standard_normal(5), sigma=_spd(rng, 5), n=123, meta={"image_size": 256})
    path = tmp_path / "sub" / "stats.npz"  # the parent is created
    g.save(str(path))
    with np.load(path) as f:
        assert set(f.files) == {"mu", "sigma", "n", "image_size"}
    back = Gaussian.load(str(path))
    assert back.n == 123 and back.meta == {"image_size": 256}
    np.testing.assert_array_equal(back.mu, g.mu)
    np.testing.assert_array_equal(back.sigma, g.sigma)

    # pytorch-fid / clean-fid statistics: mu and sigma only (float32 here), n unknown
    np.savez(tmp_path / "pytorch_fid.npz", mu=g.mu.astype(np.float32), sigma=g.sigma.astype(np.float32))
    other = Gaussian.load(str(tmp_path / "pytorch_fid.npz"))
    assert other.n is None and other.mu.dtype == np.float64
    Gaussian(mu=g.mu, sigma=g.sigma).save(str(tmp_path / "no_n.npz"))
    assert Gaussian.load(str(tmp_path / "no_n.npz")).n is None

    np.savez(tmp_path / "wrong.npz", mean=g.mu)
    with pytest.raises(ValueError, match="need arrays 'mu' and 'sigma'"):
        Gaussian.load(str(tmp_path / "wrong.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz is not a .npz"):
        Gaussian.load(str(tmp_path / "junk.npz"))


@pytest.fixture(scope="module")
def inception_state(tmp_path_factory):
    """torch-fidelity's FID Inception architecture with seeded random weights (no download): its exact keys."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    mp = pytest.MonkeyPatch()
    mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(5)
    net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    state = net.state_dict()
    for k, v in state.items():  # running statistics differ from their defaults, so a load is visible
        if k.endswith("running_mean"):
            state[k] = torch.randn_like(v) * 0.01
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return str(path), state


def test_inception_loads_torch_fidelity_architecture_from_a_local_file(inception_state):
    path, state = inception_state
    net = load_feature_extractor(path)
    assert isinstance(net, InceptionFeatures) and not net.training
    loaded = net.net.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    images = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    with torch.no_grad():
        out = net(images)
    assert out.shape == (2, INCEPTION_FEATURES) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_inception_loader_errors_name_the_path(tmp_path, inception_state):
    missing = tmp_path / "nowhere" / "pt_inception.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_feature_extractor(str(missing))
    _, state = inception_state
    partial = {k: v for k, v in state.items() if not k.startswith("Mixed_7c")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(
        ValueError, match=r"(?s)partial.pth is not a state dict of the FID Inception-v3.*Missing key.*Mixed_7c"
    ):
        load_feature_extractor(str(tmp_path / "partial.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth is neither a PyTorch state dict"):
        load_feature_extractor(str(tmp_path / "junk.pth"))


def test_export_archive_loads_as_a_feature_extractor(tmp_path):
    net = SmallFeatures().eval()
    example = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, tmp_path / "small.pt2")
    loaded = load_feature_extractor(str(tmp_path / "small.pt2"))
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
