"""Training losses of the TokenFlow image tokenizer.

The generator (encoder + quantizer + decoder) minimises

    rec_weight * rec(x, x_hat)                        # pixel MSE (or L1)
  + perceptual_weight * LPIPS(x_hat, x)               # VGG16 perceptual distance
  + w_gan(step) * g_adv(D(x_hat))                     # hinge / non-saturating GAN loss
  + semantic_weight * (1 - cos(sem_pred, sem_target)) # semantic-branch feature reconstruction
  + codebook_weight * (codebook + commitment)         # VQ losses computed by the quantizer
  + entropy_weight * entropy                          # optional codebook-usage entropy loss

and the PatchGAN discriminator D minimises ``w_gan(step) * d_loss(D(x), D(x_hat))``. ``w_gan(step)`` is
``gan_weight`` (0.5) from ``disc_start`` on and 0 before it, optionally scaled by the VQGAN adaptive
weight that balances the GAN gradient against the reconstruction gradient at the decoder's last layer.

Nothing here downloads weights: LPIPS takes its VGG16 and linear-head weights from files the user gives.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow.discriminator import PatchGANDiscriminator

# ---------------------------------------------------------------------------------------------------
# Weight-file loading
# ---------------------------------------------------------------------------------------------------


def load_tensor_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` dict from a ``.safetensors`` file or a torch ``.pt/.pth`` file.

    Torch files are read with ``weights_only=True`` so that a malicious or merely unexpected pickle
    (custom classes, whole ``nn.Module`` objects) is refused rather than executed. A URI (``s3://...``) is
    copied to a temporary file first.
    """
    if "://" in os.fspath(path):
        from tokenflow.convert import local_copy

        with local_copy(path) as local:
            return load_tensor_file(local)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {str(path)!r}")

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError: truncated file, bad header, ...
            raise ValueError(f"could not read {str(path)!r} as a safetensors file: {e}") from e

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for disallowed globals, RuntimeError for non-torch files
        raise ValueError(
            f"could not load {str(path)!r} as a plain tensor state dict with torch.load(weights_only=True): {e}"
        ) from e
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{str(path)!r} does not hold a flat dict of str -> Tensor (got {type(obj).__name__})")
    return dict(obj)


def _load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str, source: str) -> None:
    """Copy ``state`` (keys = ``prefix`` + the module's own keys) into ``module``, strictly.

    Unlike ``load_state_dict`` the errors name the file, list every missing and unexpected key, and
    report both shapes on a mismatch, which is what one needs when pointing at the wrong checkpoint.
    """
    own = module.state_dict()
    expected = {prefix + k: v for k, v in own.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: key mismatch; missing keys: {missing}; unexpected keys: {unexpected}")
    for key, ref in expected.items():
        if state[key].shape != ref.shape:
            raise ValueError(
                f"{source}: shape mismatch for {key!r}: file has {tuple(state[key].shape)}, "
                f"model expects {tuple(ref.shape)}"
            )
    module.load_state_dict({k[len(prefix) :]: v for k, v in state.items()}, strict=True)


# ---------------------------------------------------------------------------------------------------
# LPIPS perceptual distance
# ---------------------------------------------------------------------------------------------------


class _NetLinLayer(nn.Module):
    """LPIPS linear head: a 1x1 conv (no bias) that weights each channel's squared feature difference.

    ``model[0]`` is the reference's Dropout slot; LPIPS is always run in eval mode, where dropout is
    the identity, so an ``nn.Identity`` keeps the checkpoint key ``model.1.weight`` with no behaviour.
    """

    def __init__(self, chn_in: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(chn_in, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalise features to unit length over channels: x / (||x||_2 + eps), x [B, C, H, W]."""
    # vector_norm rather than sqrt(sum(x**2)): same value, but where a position's features are all zero
    # (common after ReLU, notably with random VGG weights) its backward stays finite, while sqrt's is
    # inf * 0 = NaN and would poison the input gradient even through the ReLU that zeroed them.
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)


# torchvision's VGG16 ("D") layout: conv channels, "M" = 2x2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _vgg16_features() -> nn.Sequential:
    """``torchvision.models.vgg16().features[:30]`` (up to relu5_3), with the same layer indices.

    Built here rather than via ``torchvision.models.vgg16(weights=None)`` because that also allocates
    and initialises the 102M-parameter classifier, ~1 s and ~400 MB for nothing. Keys (``N.weight``,
    ``N.bias``) and init (Kaiming-normal fan_out, zero bias) match torchvision's, so torchvision vgg16
    state dicts load as is.
    """
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(in_ch, v, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            in_ch = v
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity (Zhang et al. 2018), VGG16 variant ("lpips-vgg").

    Both inputs are images in [-1, 1], [B, 3, H, W]; the output is one distance per image, [B].

    Args:
        vgg_path: torchvision ``vgg16`` state dict (``features.N.weight/bias``; ``classifier.*`` keys
            are ignored), as ``.safetensors`` or a torch file.
        lin_path: LPIPS linear heads (``lin0.model.1.weight`` ... ``lin4.model.1.weight``, as in the
            LPIPS / taming ``vgg.pth``), as ``.safetensors`` or a torch file.

    Without paths the weights are random (VGG: torchvision's init; heads: 1/C, i.e. a plain channel
    mean, so the distance stays >= 0) and ``pretrained`` is False: useful for tests only, the numbers
    are not a perceptual metric. ``pretrained`` is True only when both files were loaded.

    The module is frozen: no parameter requires grad and it stays in eval mode even if a parent calls
    ``.train()``. Gradients still flow to the input images, which is the point of a perceptual loss.
    """

    # (x - shift) / scale maps [-1, 1] images onto the ImageNet statistics VGG16 was trained with.
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)
    # Ends of the torchvision vgg16.features slices; each tap is the last ReLU before a max-pool:
    # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    TAP_ENDS = (4, 9, 16, 23, 30)
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, vgg_path: str | os.PathLike | None = None, lin_path: str | os.PathLike | None = None):
        super().__init__()
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)

        self.features = _vgg16_features()
        # A ModuleDict named like the checkpoint (lin0..lin4) so its keys match the file as is.
        self.lins = nn.ModuleDict({f"lin{i}": _NetLinLayer(c) for i, c in enumerate(self.CHANNELS)})
        with torch.no_grad():
            for lin, c in zip(self.lins.values(), self.CHANNELS, strict=True):
                lin.model[1].weight.fill_(1.0 / c)

        if vgg_path is not None:
            state = load_tensor_file(vgg_path)
            # A full torchvision checkpoint also carries the classifier; it is not needed here.
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
            _load_checked(self.features, state, "features.", f"VGG16 weights {str(vgg_path)!r}")
        if lin_path is not None:
            state = load_tensor_file(lin_path)
            _load_checked(self.lins, state, "", f"LPIPS linear heads {str(lin_path)!r}")
        self.pretrained = vgg_path is not None and lin_path is not None

        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Ignore ``mode``: LPIPS is a fixed metric and always runs in eval mode."""
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """VGG16 activations at the five taps for images already scaled, x [B, 3, H, W]."""
        taps, start = [], 0
        for end in self.TAP_ENDS:
            for i in range(start, end):
                x = self.features[i](x)
            taps.append(x)  # [B, C_k, H / 2**k, W / 2**k]
            start = end
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Perceptual distance between images x and y in [-1, 1], [B, 3, H, W] -> [B]."""
        # The two images go through VGG separately (as in the reference) so that d(x, x) is exactly 0.
        feats_x = self._taps((x - self.shift) / self.scale)
        feats_y = self._taps((y - self.shift) / self.scale)
        dist = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins.values(), feats_x, feats_y, strict=True):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2  # [B, C_k, h, w]
            dist = dist + lin(diff).mean(dim=(1, 2, 3))  # 1x1 conv -> [B, 1, h, w] -> spatial mean [B]
        return dist


# ---------------------------------------------------------------------------------------------------
# Pure loss functions
# ---------------------------------------------------------------------------------------------------

REC_KINDS = ("l2", "l1")
GAN_LOSSES = ("hinge", "vanilla")


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Pixel reconstruction loss, mean over all elements: MSE (``"l2"``, default) or L1 (``"l1"``)."""
    if kind == "l2":
        return F.mse_loss(x_hat, x)
    if kind == "l1":
        return F.l1_loss(x_hat, x)
    raise ValueError(f"unknown reconstruction loss kind {kind!r}; expected one of {REC_KINDS}")


def semantic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, target), cosine over the last dim; [..., D] x [..., D] -> [].

    ``target`` (the frozen teacher's features) is detached here so that no gradient can reach it.
    """
    if pred.shape != target.shape:
        raise ValueError(f"semantic_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return (1.0 - F.cosine_similarity(pred, target.detach(), dim=-1)).mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss: 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge generator loss: -mean(D(x_hat))."""
    return -logits_fake.mean()


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Logistic (BCE) discriminator loss: 0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_hat))))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def vanilla_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean(softplus(-D(x_hat))) = BCE of D(x_hat) against "real"."""
    return F.softplus(-logits_fake).mean()


_D_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}
_G_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_g_loss,
    "vanilla": vanilla_g_loss,
}


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN adaptive weight ||d nll / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4).

    Scales the GAN loss so its gradient at the decoder's last layer has the size of the reconstruction
    gradient there. Clamped to [0, 1e4] and detached: it is a step size, not something to optimise.
    Both graphs are retained because the caller backpropagates the total loss afterwards.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(nll_grads) / (torch.linalg.vector_norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach()


# ---------------------------------------------------------------------------------------------------
# Config and the combined loss
# ---------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class LossConfig:
    """Weights and options of the tokenizer losses (defaults follow the TokenFlow reference)."""

    rec_kind: str = "l2"
    """Pixel reconstruction loss: "l2" (MSE) or "l1"."""
    rec_weight: float = 1.0
    """Weight of the pixel reconstruction loss."""
    perceptual_weight: float = 1.0
    """Weight of the LPIPS perceptual loss; 0 skips it and builds no VGG."""
    gan_weight: float = 0.5
    """Weight of the generator and discriminator GAN losses once step >= disc_start."""
    disc_start: int = 20_000
    """First training step at which the GAN losses are on (weight 0 before)."""
    gan_loss: str = "hinge"
    """GAN objective: "hinge" or "vanilla" (logistic D loss, non-saturating G loss)."""
    adaptive_gan_weight: bool = False
    """Scale the generator GAN loss by the VQGAN adaptive weight (needs last_layer)."""
    semantic_weight: float = 1.0
    """Weight of the semantic feature loss (1 - cosine similarity to the teacher)."""
    codebook_weight: float = 1.0
    """Weight of the quantizer's codebook + commitment losses (commitment already includes beta)."""
    entropy_weight: float = 0.0
    """Weight of the quantizer's codebook entropy loss; 0 (default) skips it. A positive weight needs the
    quantizer to compute the term (`QuantizerConfig.entropy_loss = True`)."""
    lpips_vgg_path: str | None = None
    """torchvision VGG16 weights for LPIPS (.safetensors or torch file); None = random (tests only)."""
    lpips_lin_path: str | None = None
    """LPIPS linear-head weights (.safetensors or torch file); None = uniform channel mean (tests only)."""

    def __post_init__(self) -> None:
        if self.rec_kind not in REC_KINDS:
            raise ValueError(f"rec_kind must be one of {REC_KINDS}, got {self.rec_kind!r}")
        if self.gan_loss not in GAN_LOSSES:
            raise ValueError(f"gan_loss must be one of {GAN_LOSSES}, got {self.gan_loss!r}")
        for name in (
            "rec_weight",
            "perceptual_weight",
            "gan_weight",
            "semantic_weight",
            "codebook_weight",
            "entropy_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {self.disc_start}")


class TokenizerLoss(nn.Module):
    """All tokenizer training losses: a generator objective and a discriminator objective.

    Holds the frozen LPIPS network (None when ``perceptual_weight == 0``) and the trainable PatchGAN
    discriminator (``discriminator``; pass your own or get the default 64-channel, 3-layer one).
    Give the discriminator's parameters to a separate optimizer.

    Typical step::

        g_loss, g_log = loss_fn.generator_loss(x, x_hat, step, quant_losses=q, sem_pred=p, sem_target=t,
                                               last_layer=decoder.conv_out.weight)
        g_loss.backward(); opt_g.step()
        opt_d.zero_grad()   # generator_loss also left gradients on the discriminator: drop them
        d_loss, d_log = loss_fn.discriminator_loss(x, x_hat, step)
        d_loss.backward(); opt_d.step()
    """

    def __init__(self, cfg: LossConfig | None = None, discriminator: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else LossConfig()
        self.lpips = LPIPS(self.cfg.lpips_vgg_path, self.cfg.lpips_lin_path) if self.cfg.perceptual_weight > 0 else None
        self.discriminator = discriminator if discriminator is not None else PatchGANDiscriminator()
        self._d_loss = _D_LOSSES[self.cfg.gan_loss]
        self._g_loss = _G_LOSSES[self.cfg.gan_loss]

    def gan_weight_at(self, step: int) -> float:
        """GAN weight at a training step: 0 before ``disc_start``, ``gan_weight`` from it on."""
        return self.cfg.gan_weight if step >= self.cfg.disc_start else 0.0

    def generator_loss(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        step: int,
        *,
        quant_losses: dict[str, torch.Tensor] | None = None,
        sem_pred: torch.Tensor | None = None,
        sem_target: torch.Tensor | None = None,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total generator loss and its parts as floats.

        Args:
            x: real images in [-1, 1], [B, 3, H, W].
            x_hat: reconstructions, [B, 3, H, W].
            step: global training step (gates the GAN term).
            quant_losses: the quantizer's losses: "codebook" and "commitment" (the latter already
                times beta), and "entropy" when ``entropy_weight > 0``.
            sem_pred / sem_target: semantic-branch prediction and teacher features, [B, N, D].
            last_layer: the decoder's final conv weight, required when ``adaptive_gan_weight``.

        The returned dict has "total" and "gan_weight" (the effective weight of g_adv, 0 before
        disc_start) always, plus "rec", "perceptual", "g_adv", "semantic", "vq", "entropy" for the
        terms that were computed. A term whose weight is 0 or whose inputs are None is absent and is
        never computed (no LPIPS forward, no discriminator forward before disc_start).

        The discriminator forward on x_hat builds a graph through the discriminator, so backward of
        this loss also accumulates gradients on its parameters; zero them before the D step.
        """
        cfg = self.cfg
        terms: dict[str, torch.Tensor | float] = {}  # unweighted values, for logging

        # nll: the reconstruction part, whose gradient the adaptive GAN weight is matched to.
        nll = x_hat.new_zeros(())
        if cfg.rec_weight > 0:
            terms["rec"] = reconstruction_loss(x, x_hat, cfg.rec_kind)
            nll = nll + cfg.rec_weight * terms["rec"]
        if cfg.perceptual_weight > 0:
            terms["perceptual"] = self.lpips(x_hat, x).mean()
            nll = nll + cfg.perceptual_weight * terms["perceptual"]
        total = nll

        # A Python float while it is a constant, so gating it costs no device sync.
        gan_weight: float | torch.Tensor = self.gan_weight_at(step)
        if gan_weight > 0:
            terms["g_adv"] = self._g_loss(self.discriminator(x_hat))
            if cfg.adaptive_gan_weight:
                if last_layer is None:
                    raise ValueError("adaptive_gan_weight=True needs last_layer (the decoder's final weight)")
                if torch.is_grad_enabled() and nll.requires_grad:
                    gan_weight = gan_weight * adaptive_gan_weight(nll, terms["g_adv"], last_layer)
                else:
                    # No graph (e.g. validation under no_grad): the weight is undefined; the
                    # reference (taming) uses 0 then.
                    gan_weight = gan_weight * 0.0
            total = total + gan_weight * terms["g_adv"]

        if cfg.semantic_weight > 0 and sem_pred is not None and sem_target is not None:
            terms["semantic"] = semantic_loss(sem_pred, sem_target)
            total = total + cfg.semantic_weight * terms["semantic"]

        if quant_losses is not None:
            if cfg.codebook_weight > 0:
                missing = {"codebook", "commitment"} - set(quant_losses)
                if missing:
                    raise KeyError(f"quant_losses lacks {sorted(missing)} (has {sorted(quant_losses)})")
                terms["vq"] = quant_losses["codebook"] + quant_losses["commitment"]
                total = total + cfg.codebook_weight * terms["vq"]
            if cfg.entropy_weight > 0:
                if "entropy" not in quant_losses:
                    raise KeyError(f"entropy_weight > 0 but quant_losses has no 'entropy' (has {sorted(quant_losses)})")
                terms["entropy"] = quant_losses["entropy"]
                total = total + cfg.entropy_weight * terms["entropy"]

        terms["gan_weight"] = gan_weight
        terms["total"] = total
        return total, _to_floats(terms)

    def discriminator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Discriminator loss ``gan_weight(step) * d_loss(D(x), D(x_hat))`` and a log dict.

        ``x_hat`` is detached here so that no gradient reaches the generator. Before ``disc_start``
        the discriminator is not run and the loss is a zero leaf tensor that requires grad, so the
        caller may call ``.backward()`` on it unconditionally. The dict holds "d_loss" and
        "gan_weight", plus "logits_real" / "logits_fake" (mean logits) when D was run.
        """
        weight = self.gan_weight_at(step)
        if weight == 0:
            zero = x.new_zeros((), requires_grad=True)
            return zero, {"d_loss": 0.0, "gan_weight": 0.0}

        logits_real = self.discriminator(x.detach())  # [B, 1, h, w]
        logits_fake = self.discriminator(x_hat.detach())  # [B, 1, h, w]
        d_loss = weight * self._d_loss(logits_real, logits_fake)
        log = _to_floats({"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()})
        log["gan_weight"] = weight
        return d_loss, log


def _to_floats(terms: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """0-d tensors (and floats) -> floats with one device sync (one .tolist()) instead of one per term."""
    tensors = {k: v for k, v in terms.items() if isinstance(v, torch.Tensor)}
    values = torch.stack([t.detach().float().reshape(()) for t in tensors.values()]).tolist() if tensors else []
    floats = dict(zip(tensors, values, strict=True))
    return {k: floats[k] if k in floats else float(v) for k, v in terms.items()}
