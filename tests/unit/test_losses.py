"""Unit tests for tokenflow.losses and tokenflow.discriminator (CPU, tiny tensors, random weights)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from tokenflow.discriminator import PatchGANDiscriminator
from tokenflow.losses import (
    LPIPS,
    LossConfig,
    TokenizerLoss,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
    semantic_loss,
    vanilla_d_loss,
    vanilla_g_loss,
)

# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS()


def _images(seed: int, b: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1  # [-1, 1]


def _small_loss(**cfg_kwargs) -> TokenizerLoss:
    """TokenizerLoss with a tiny discriminator and no LPIPS unless asked, to keep tests fast."""
    cfg_kwargs.setdefault("perceptual_weight", 0.0)
    torch.manual_seed(0)
    return TokenizerLoss(LossConfig(**cfg_kwargs), discriminator=PatchGANDiscriminator(ndf=8, n_layers=2))


class _CountCalls:
    """Forward hook counting calls of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.n = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *args) -> None:
        self.n += 1


# ---------------------------------------------------------------------------------------------------
# Pure loss functions
# ---------------------------------------------------------------------------------------------------


def test_reconstruction_loss_values() -> None:
    x = torch.zeros(1, 1, 1, 4)
    x_hat = torch.tensor([1.0, -2.0, 0.0, 3.0]).view(1, 1, 1, 4)
    assert reconstruction_loss(x, x_hat).item() == pytest.approx((1 + 4 + 0 + 9) / 4)
    assert reconstruction_loss(x, x_hat, "l1").item() == pytest.approx((1 + 2 + 0 + 3) / 4)
    with pytest.raises(ValueError, match="l3"):
        reconstruction_loss(x, x_hat, "l3")


def test_hinge_losses_hand_computed() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2   -> mean 2.5/3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2     -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0 / 3)  # -mean(-2, 0, 1)


def test_vanilla_losses_hand_computed() -> None:
    def sp(v: float) -> float:
        return math.log1p(math.exp(v))

    real = torch.tensor([1.0, -0.5])
    fake = torch.tensor([0.0, 2.0])
    expected_d = 0.5 * ((sp(-1.0) + sp(0.5)) / 2 + (sp(0.0) + sp(2.0)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected_d)
    assert vanilla_g_loss(fake).item() == pytest.approx((sp(0.0) + sp(-2.0)) / 2)
    # Sanity: at logits 0 every BCE term is log 2.
    assert vanilla_d_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_semantic_loss_values_and_no_target_grad() -> None:
    v = torch.tensor([[[1.0, 2.0, -3.0], [0.5, 0.0, 4.0]]])  # [B=1, N=2, D=3]
    assert semantic_loss(v, v.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert semantic_loss(v, -v).item() == pytest.approx(2.0, abs=1e-6)
    # Orthogonal -> 1; mixed tokens average: (0 + 1) / 2.
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    assert semantic_loss(a, b).item() == pytest.approx(0.5, abs=1e-6)

    pred = torch.randn(2, 4, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, requires_grad=True)
    semantic_loss(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None


# ---------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------


def test_lpips_basic_properties(lpips: LPIPS) -> None:
    x, y = _images(1), _images(2)
    assert lpips.pretrained is False
    assert all(not p.requires_grad for p in lpips.parameters())
    assert not lpips.training
    lpips.train()  # a parent calling .train() must not switch it to training mode
    assert not lpips.training

    d_xx = lpips(x, x)
    assert d_xx.shape == (2,)
    assert torch.equal(d_xx, torch.zeros(2))  # exactly 0
    d_xy = lpips(x, y)
    assert (d_xy > 0).all()
    assert torch.equal(d_xy, lpips(y, x))  # (a - b)**2 == (b - a)**2 bit for bit


def test_lpips_vgg_layout_matches_torchvision(lpips: LPIPS) -> None:
    # Same keys and shapes as torchvision's vgg16().features up to relu5_3, so its checkpoints load.
    tv = torchvision.models.vgg16(weights=None).features[:30]
    ours = {k: v.shape for k, v in lpips.features.state_dict().items()}
    assert ours == {k: v.shape for k, v in tv.state_dict().items()}
    assert [type(m) for m in lpips.features] == [type(m) for m in tv]
    # Taps: the ReLU right before each max-pool (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
    assert all(isinstance(lpips.features[e - 1], nn.ReLU) for e in LPIPS.TAP_ENDS)
    tap_channels = [
        [m for m in lpips.features[:e] if isinstance(m, nn.Conv2d)][-1].out_channels for e in LPIPS.TAP_ENDS
    ]
    assert tap_channels == list(LPIPS.CHANNELS)


def test_lpips_gradient_reaches_input(lpips: LPIPS) -> None:
    x = _images(3).requires_grad_(True)
    y = _images(4)
    lpips(x, y).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def _random_state(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A random VGG16 state dict (with classifier keys, as torchvision saves it) and random lin heads."""
    g = torch.Generator().manual_seed(seed)
    ref = LPIPS()
    vgg = {f"features.{k}": torch.randn(v.shape, generator=g) * 0.05 for k, v in ref.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.randn(4, 3, generator=g)  # ignored on load
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(LPIPS.CHANNELS)}
    return vgg, lin


def test_lpips_loads_safetensors_and_torch_files_identically(tmp_path) -> None:
    vgg, lin = _random_state(7)
    save_file(vgg, str(tmp_path / "vgg.safetensors"))
    save_file(lin, str(tmp_path / "lin.safetensors"))
    torch.save(vgg, tmp_path / "vgg.pth")
    torch.save(lin, tmp_path / "lin.pth")

    a = LPIPS(tmp_path / "vgg.safetensors", tmp_path / "lin.safetensors")
    b = LPIPS(str(tmp_path / "vgg.pth"), str(tmp_path / "lin.pth"))
    assert a.pretrained and b.pretrained
    assert torch.equal(a.features[0].weight, vgg["features.0.weight"])
    assert torch.equal(a.features[28].bias, vgg["features.28.bias"])
    assert torch.equal(a.lins["lin4"].model[1].weight, lin["lin4.model.1.weight"])
    assert all(not p.requires_grad for p in a.parameters())

    x, y = _images(5), _images(6)
    d_a, d_b = a(x, y), b(x, y)
    assert torch.equal(d_a, d_b)
    assert not torch.allclose(d_a, LPIPS()(x, y))  # the files were really used


def test_lpips_matches_reference_formula(tmp_path) -> None:
    """Independent re-computation with torchvision's vgg16 and the formula written out by hand."""
    vgg, lin = _random_state(11)
    save_file(vgg, str(tmp_path / "vgg.safetensors"))
    save_file(lin, str(tmp_path / "lin.safetensors"))
    ours = LPIPS(tmp_path / "vgg.safetensors", tmp_path / "lin.safetensors")

    tv = torchvision.models.vgg16(weights=None)
    tv.load_state_dict({k: v for k, v in vgg.items() if k.startswith("features.")}, strict=False)
    slices = [tv.features[a:b] for a, b in [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]]
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img: torch.Tensor) -> list[torch.Tensor]:
        h, out = (img - shift) / scale, []
        for s in slices:
            h = s(h)
            out.append(h)
        return out

    def unit(f: torch.Tensor) -> torch.Tensor:
        return f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + 1e-10)

    x, y = _images(23), _images(24)
    with torch.no_grad():
        ref = sum(
            ((unit(fx) - unit(fy)) ** 2 * lin[f"lin{i}.model.1.weight"]).sum(dim=1).mean(dim=(1, 2))
            for i, (fx, fy) in enumerate(zip(taps(x), taps(y), strict=True))
        )
        torch.testing.assert_close(ours(x, y), ref, rtol=1e-4, atol=1e-6)


def test_lpips_shape_mismatch_names_tensor(tmp_path) -> None:
    _, lin = _random_state(8)
    lin["lin2.model.1.weight"] = torch.rand(1, 128, 1, 1)  # should be 256 channels
    path = tmp_path / "lin.safetensors"
    save_file(lin, str(path))
    with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight.*\(1, 128, 1, 1\).*\(1, 256, 1, 1\)"):
        LPIPS(lin_path=path)


def test_lpips_missing_and_unexpected_keys_listed(tmp_path) -> None:
    vgg, _ = _random_state(9)
    del vgg["features.5.weight"]
    vgg["features.99.weight"] = torch.zeros(1)
    path = tmp_path / "vgg.pth"
    torch.save(vgg, path)
    with pytest.raises(
        ValueError,
        match=r"missing keys: \['features\.5\.weight'\].*"
        r"unexpected keys: \['features\.99\.weight'\]",
    ):
        LPIPS(vgg_path=path)


def test_lpips_missing_file_names_path(tmp_path) -> None:
    path = tmp_path / "nope" / "vgg.pth"
    with pytest.raises(FileNotFoundError, match="nope"):
        LPIPS(vgg_path=path)
    with pytest.raises(FileNotFoundError, match="lin.safetensors"):
        LPIPS(lin_path=tmp_path / "lin.safetensors")


_UNPICKLED = []


def _record_unpickle(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class _Payload:
    """An object whose unpickling runs code; weights_only=True must refuse to rebuild it."""

    def __reduce__(self):
        return (_record_unpickle, ("ran",))


def test_lpips_refuses_arbitrary_pickles(tmp_path) -> None:
    _, lin = _random_state(10)
    path = tmp_path / "lin.pth"
    torch.save({**lin, "extra": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        LPIPS(lin_path=path)
    assert _UNPICKLED == []

    # A whole-tensor pickle that is not a dict of tensors is also refused with a clear message.
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="flat dict"):
        LPIPS(lin_path=tmp_path / "list.pth")


# ---------------------------------------------------------------------------------------------------
# PatchGAN discriminator
# ---------------------------------------------------------------------------------------------------


def test_patchgan_default_parameter_count_and_shape() -> None:
    d = PatchGANDiscriminator()
    # By hand (4x4 kernels):
    #   conv 3->64 + bias:          3*64*16 + 64     =     3,136
    #   conv 64->128 + BN(128):     64*128*16 + 256  =   131,328
    #   conv 128->256 + BN(256):    128*256*16 + 512 =   524,800
    #   conv 256->512 + BN(512):    256*512*16 + 1024= 2,098,176
    #   conv 512->1 + bias:         512*16 + 1       =     8,193
    #   total                                        = 2,765,633  (reference: "2.77 M")
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    # 64 -> 32 -> 16 -> 8 (stride 2, k4 p1), then 8 -> 7 -> 6 (stride 1, k4 p1).
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_patchgan_layout_and_init() -> None:
    torch.manual_seed(0)
    d = PatchGANDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2),
        (64, 128, 2),
        (128, 256, 2),
        (256, 512, 1),
        (512, 1, 1),
    ]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    w = convs[3].weight
    assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(bn.bias.abs().sum() == 0 for bn in bns)
    assert all(bn.weight.mean().item() == pytest.approx(1.0, abs=0.01) for bn in bns)


def test_patchgan_configurable() -> None:
    d = PatchGANDiscriminator(in_channels=1, ndf=8, n_layers=2)
    # 32 -> 16 -> 8 (two stride-2 convs), 8 -> 7 -> 6.
    assert d(torch.randn(3, 1, 32, 32)).shape == (3, 1, 6, 6)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 8), (8, 16), (16, 32), (32, 1)]


# ---------------------------------------------------------------------------------------------------
# LossConfig
# ---------------------------------------------------------------------------------------------------


def test_loss_config_defaults_and_validation() -> None:
    cfg = LossConfig()
    assert (cfg.rec_kind, cfg.rec_weight, cfg.perceptual_weight, cfg.gan_weight) == ("l2", 1.0, 1.0, 0.5)
    assert (cfg.disc_start, cfg.gan_loss, cfg.adaptive_gan_weight) == (20_000, "hinge", False)
    assert (cfg.semantic_weight, cfg.codebook_weight, cfg.entropy_weight) == (1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="gan_weight"):
        LossConfig(gan_weight=-0.1)
    with pytest.raises(ValueError, match="rec_kind"):
        LossConfig(rec_kind="l3")
    with pytest.raises(ValueError, match="gan_loss"):
        LossConfig(gan_loss="wgan")
    with pytest.raises(ValueError, match="disc_start"):
        LossConfig(disc_start=-1)
    with pytest.raises(TypeError):
        LossConfig(0.5)  # kw_only


# ---------------------------------------------------------------------------------------------------
# TokenizerLoss
# ---------------------------------------------------------------------------------------------------


def test_generator_loss_gan_gate_and_hook() -> None:
    loss_fn = _small_loss(disc_start=100, semantic_weight=0.0)
    calls = _CountCalls(loss_fn.discriminator)
    x, x_hat = _images(11), _images(12).requires_grad_(True)

    total, log = loss_fn.generator_loss(x, x_hat, step=99)
    assert calls.n == 0
    assert log["gan_weight"] == 0.0 and "g_adv" not in log
    assert total.item() == pytest.approx(log["rec"])

    total, log = loss_fn.generator_loss(x, x_hat, step=100)
    assert calls.n == 1
    assert log["gan_weight"] == 0.5
    assert total.item() == pytest.approx(log["rec"] + 0.5 * log["g_adv"], rel=1e-6)
    assert loss_fn.generator_loss(x, x_hat, step=10_000)[1]["gan_weight"] == 0.5


def test_generator_loss_total_is_weighted_sum_and_skips() -> None:
    loss_fn = _small_loss(
        perceptual_weight=0.7,
        disc_start=0,
        gan_weight=0.25,
        semantic_weight=0.3,
        codebook_weight=2.0,
        entropy_weight=0.1,
        rec_kind="l1",
    )
    lp_calls = _CountCalls(loss_fn.lpips)
    x, x_hat = _images(13), _images(14).requires_grad_(True)
    q = {"codebook": torch.tensor(0.2), "commitment": torch.tensor(0.05), "entropy": torch.tensor(-1.5)}
    sem_pred, sem_target = torch.randn(2, 4, 8), torch.randn(2, 4, 8)

    loss_fn.discriminator.eval()  # BN in eval mode, so the recomputation below gives the same logits
    total, log = loss_fn.generator_loss(x, x_hat, 5, quant_losses=q, sem_pred=sem_pred, sem_target=sem_target)
    assert lp_calls.n == 1
    assert set(log) == {"rec", "perceptual", "g_adv", "gan_weight", "semantic", "vq", "entropy", "total"}
    assert log["rec"] == pytest.approx((x_hat - x).abs().mean().item())
    assert log["perceptual"] == pytest.approx(loss_fn.lpips(x_hat, x).mean().item())
    assert log["g_adv"] == pytest.approx(-loss_fn.discriminator(x_hat).mean().item(), rel=1e-5)
    assert log["semantic"] == pytest.approx(semantic_loss(sem_pred, sem_target).item())
    assert log["vq"] == pytest.approx(0.25)
    assert log["entropy"] == pytest.approx(-1.5)
    expected = (
        log["rec"] + 0.7 * log["perceptual"] + 0.25 * log["g_adv"] + 0.3 * log["semantic"] + 2.0 * 0.25 + 0.1 * -1.5
    )
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert log["total"] == pytest.approx(total.item())

    # Missing inputs skip their terms: no semantic, no quantizer losses.
    total, log = loss_fn.generator_loss(x, x_hat, 5)
    assert set(log) == {"rec", "perceptual", "g_adv", "gan_weight", "total"}
    assert total.item() == pytest.approx(log["rec"] + 0.7 * log["perceptual"] + 0.25 * log["g_adv"], rel=1e-5)


def test_generator_loss_zero_weights_skip_computation() -> None:
    loss_fn = _small_loss(perceptual_weight=0.0, gan_weight=0.0, disc_start=0, semantic_weight=0.0, codebook_weight=0.0)
    assert loss_fn.lpips is None  # no VGG built at all
    calls = _CountCalls(loss_fn.discriminator)
    x, x_hat = _images(15), _images(16)
    q = {"codebook": torch.tensor(1.0), "commitment": torch.tensor(1.0)}
    total, log = loss_fn.generator_loss(
        x, x_hat, 10, quant_losses=q, sem_pred=torch.randn(1, 2, 3), sem_target=torch.randn(1, 2, 3)
    )
    assert calls.n == 0
    assert set(log) == {"rec", "gan_weight", "total"}
    assert log["gan_weight"] == 0.0
    assert total.item() == pytest.approx(log["rec"])


def test_generator_loss_missing_quant_keys_raise() -> None:
    loss_fn = _small_loss(entropy_weight=0.1)
    x = _images(17)
    with pytest.raises(KeyError, match="commitment"):
        loss_fn.generator_loss(x, x, 0, quant_losses={"codebook": torch.tensor(0.0)})
    with pytest.raises(KeyError, match="entropy"):
        loss_fn.generator_loss(x, x, 0, quant_losses={"codebook": torch.tensor(0.0), "commitment": torch.tensor(0.0)})


def test_adaptive_gan_weight_matches_hand_computation() -> None:
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1)  # stands in for the decoder's final conv
    h = torch.randn(2, 4, 32, 32)
    x = _images(18)

    loss_fn = _small_loss(disc_start=0, adaptive_gan_weight=True, rec_weight=1.0)
    loss_fn.discriminator.eval()
    x_hat = last(h)
    total, log = loss_fn.generator_loss(x, x_hat, 0, last_layer=last.weight)

    # By hand, on a fresh graph.
    x_hat2 = last(h)
    nll = torch.mean((x_hat2 - x) ** 2)
    g = -loss_fn.discriminator(x_hat2).mean()
    g_nll = torch.autograd.grad(nll, last.weight, retain_graph=True)[0]
    g_g = torch.autograd.grad(g, last.weight, retain_graph=True)[0]
    w = (g_nll.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4).item()
    assert log["gan_weight"] == pytest.approx(0.5 * w, rel=1e-5)
    assert total.item() == pytest.approx(nll.item() + 0.5 * w * g.item(), rel=1e-5)
    # The function itself, and the weight is detached (total still backpropagates once).
    assert adaptive_gan_weight(nll, g, last.weight).item() == pytest.approx(w, rel=1e-6)
    assert not adaptive_gan_weight(nll, g, last.weight).requires_grad
    total.backward()
    assert last.weight.grad is not None

    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(x, last(h), 0)


def test_discriminator_loss_gate_detach_and_values() -> None:
    loss_fn = _small_loss(disc_start=10)
    calls = _CountCalls(loss_fn.discriminator)
    x, x_hat = _images(19), _images(20).requires_grad_(True)

    d_loss, log = loss_fn.discriminator_loss(x, x_hat, 9)
    assert calls.n == 0
    assert d_loss.item() == 0.0 and log == {"d_loss": 0.0, "gan_weight": 0.0}
    d_loss.backward()  # safe to call unconditionally

    loss_fn.discriminator.eval()  # deterministic BN so the hand computation matches
    d_loss, log = loss_fn.discriminator_loss(x, x_hat, 10)
    assert calls.n == 2
    with torch.no_grad():
        lr, lf = loss_fn.discriminator(x), loss_fn.discriminator(x_hat)
    assert d_loss.item() == pytest.approx(0.5 * hinge_d_loss(lr, lf).item(), rel=1e-6)
    assert log["logits_real"] == pytest.approx(lr.mean().item(), rel=1e-5)
    assert log["logits_fake"] == pytest.approx(lf.mean().item(), rel=1e-5)
    assert log["gan_weight"] == 0.5
    d_loss.backward()
    assert x_hat.grad is None  # detached: nothing reaches the generator
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())


def test_vanilla_gan_option() -> None:
    loss_fn = _small_loss(disc_start=0, gan_loss="vanilla")
    loss_fn.discriminator.eval()
    x, x_hat = _images(21), _images(22)
    _, log = loss_fn.generator_loss(x, x_hat, 0)
    with torch.no_grad():
        lr, lf = loss_fn.discriminator(x), loss_fn.discriminator(x_hat)
    assert log["g_adv"] == pytest.approx(vanilla_g_loss(lf).item(), rel=1e-5)
    d_loss, _ = loss_fn.discriminator_loss(x, x_hat, 0)
    assert d_loss.item() == pytest.approx(0.5 * vanilla_d_loss(lr, lf).item(), rel=1e-5)
