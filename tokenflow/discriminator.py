"""PatchGAN discriminator (pix2pix ``NLayerDiscriminator``) used for the tokenizer's adversarial loss.

The discriminator does not output one real/fake score per image: it outputs a grid of logits, each
judging one overlapping patch of the input (70x70 pixels for the default ``n_layers=3``). Realism of
local texture is what the pixel and perceptual losses miss, so that is what the GAN loss targets.

Layout for the defaults (ndf=64, n_layers=3), 4x4 kernels, padding 1:

    Conv(3 -> 64, s2, bias)     + LeakyReLU(0.2)         # H/2
    Conv(64 -> 128, s2)   + BN  + LeakyReLU(0.2)         # H/4
    Conv(128 -> 256, s2)  + BN  + LeakyReLU(0.2)         # H/8
    Conv(256 -> 512, s1)  + BN  + LeakyReLU(0.2)         # H/8 - 1
    Conv(512 -> 1, s1, bias)                             # H/8 - 2

so a 256x256 image gives a [B, 1, 30, 30] logit map and a 64x64 image a [B, 1, 6, 6] one.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchGANDiscriminator(nn.Module):
    """pix2pix / taming-transformers N-layer PatchGAN discriminator.

    Args:
        in_channels: channels of the images to judge (3 for RGB).
        ndf: channels of the first conv layer; layer ``n`` has ``ndf * min(2**n, 8)`` channels.
        n_layers: number of stride-2 downsampling convs (the first one included); one stride-1 conv
            and the 1-channel output conv follow them.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        kw, padw = 4, 1

        # First layer: no normalisation (pix2pix: BN on the raw image hurts), so it keeps its bias.
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        # Downsampling body. Convs followed by BatchNorm have no bias: BN's shift makes it redundant.
        mult = 1
        for n in range(1, n_layers):
            prev_mult, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev_mult, ndf * mult, kw, stride=2, padding=padw, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        # One more conv at stride 1 widens the receptive field without shrinking the map further.
        prev_mult, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev_mult, ndf * mult, kw, stride=1, padding=padw, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        # Output: one logit per patch.
        layers.append(nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw))
        self.main = nn.Sequential(*layers)

        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DCGAN-style init, as in pix2pix/taming ``weights_init``.

        Conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0. Conv biases (first and last
        layer only) keep PyTorch's default init, as in the reference.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits for images ``x`` [B, C, H, W] -> [B, 1, h, w] (h = H/2**n_layers - 2)."""
        return self.main(x)
