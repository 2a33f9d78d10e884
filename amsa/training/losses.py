"""Training losses of AMSA (paper section 3.3): ``L = w_rec L_rec + w_per L_per + w_adv L_adv``.

* ``L_rec``: mean absolute error (L1) between the SR output and the HR image.
* ``L_per``: Frobenius norm of the difference of VGG19 ``relu5_1`` features (over the whole batch, as the
  official release computes it), on ImageNet-normalised ``[0, 1]`` images.
* ``L_adv``: WGAN-GP (Gulrajani et al. 2017) with the official :class:`ImageDiscriminator`; the critic is
  trained on ``D(fake) - D(real) + lambda * GP`` with ``lambda = 10``.

The paper's weights are ``w_rec, w_per, w_adv = 1, 1e-4, 1e-6``; the ``-rec`` models use ``L_rec`` only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ImageDiscriminator",
    "PerceptualLoss",
    "gradient_penalty",
    "reconstruction_loss",
    "wgan_critic_loss",
    "wgan_generator_loss",
]


def reconstruction_loss(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """``L_rec = mean |SR - HR|`` (scalar)."""
    return F.l1_loss(sr, hr)


class PerceptualLoss(nn.Module):
    """``L_per = || phi(SR) - phi(HR) ||_F`` for a frozen feature extractor ``phi`` (VGG19 up to ``relu5_1``).

    Args:
        extractor: module mapping ``[B, 3, H, W]`` images in ``[0, 1]`` to a dict of feature maps (as
            ``amsa.VGGFeatures``); its parameters are not trained.
        layer: the key of the feature map to compare (default ``"relu5_1"``).
    """

    def __init__(self, extractor: nn.Module, layer: str = "relu5_1") -> None:
        super().__init__()
        self.extractor = extractor.requires_grad_(False).eval()
        self.layer = layer

    def train(self, mode: bool = True) -> PerceptualLoss:
        # the extractor stays in eval mode: it is a fixed measure, not a trained network
        super().train(mode)
        self.extractor.eval()
        return self

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        phi_sr = self.extractor(sr)[self.layer]
        with torch.no_grad():
            phi_hr = self.extractor(hr)[self.layer]
        return torch.linalg.vector_norm((phi_sr - phi_hr).float())


class ImageDiscriminator(nn.Module):
    """The official critic (``ImageDiscriminator(in_nc=3, ndf=32)``, same parameter names, so official
    ``net_d`` checkpoints load).

    Five blocks ``conv_block1..5`` of ``conv3x3 - BN - LReLU(0.2) - conv3x3 stride 2 - BN - LReLU(0.2)``
    with ``ndf, 2 ndf, 4 ndf, 8 ndf, 16 ndf`` channels (each halves the resolution), then ``out_block``:
    global average pooling, 1x1 conv ``16 ndf -> 1024``, LReLU(0.2), 1x1 conv ``1024 -> 1``, sigmoid (the
    official critic ends in a sigmoid even under the WGAN loss). Input ``[B, in_channels, H, W]``, output
    ``[B, 1, 1, 1]``. Init as the official one: conv weights N(0, 0.02), BN weights N(1, 0.02), biases 0.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 32) -> None:
        super().__init__()
        widths = [in_channels] + [ndf * 2**i for i in range(5)]
        for i in range(5):
            c_in, c_out = widths[i], widths[i + 1]
            block = nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, 1, 1),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(c_out, c_out, 3, 2, 1),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, inplace=True),
            )
            self.add_module(f"conv_block{i + 1}", block)
        self.out_block = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(widths[-1], 1024, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(1024, 1, 1),
            nn.Sigmoid(),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv_block1[0].in_channels
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"ImageDiscriminator: expected [B, {c}, H, W], got {list(x.shape)}")
        for i in range(1, 6):
            x = getattr(self, f"conv_block{i}")(x)
        return self.out_block(x)


def wgan_critic_loss(real_pred: torch.Tensor, fake_pred: torch.Tensor) -> torch.Tensor:
    """Critic's Wasserstein loss ``E[D(fake)] - E[D(real)]`` (scalar)."""
    return fake_pred.mean() - real_pred.mean()


def wgan_generator_loss(fake_pred: torch.Tensor) -> torch.Tensor:
    """Generator's adversarial loss ``L_adv = -E[D(fake)]`` (scalar)."""
    return -fake_pred.mean()


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """WGAN-GP penalty ``E[(|| grad_x D(x_hat) ||_2 - 1)^2]`` at ``x_hat = alpha real + (1 - alpha) fake``.

    Args:
        critic: the discriminator.
        real, fake: ``[B, C, H, W]`` (``fake`` detached from the generator).
        alpha: ``[B]`` mixing weights in ``[0, 1]``, one per sample (drawn by the caller, so that seeded
            training stays reproducible).

    Returns a scalar that is differentiable w.r.t. the critic's parameters (double backward).
    """
    if real.shape != fake.shape:
        raise ValueError(f"gradient_penalty: real {list(real.shape)} and fake {list(fake.shape)} differ")
    if alpha.shape != real.shape[:1]:
        raise ValueError(f"gradient_penalty: alpha must be [B] = [{real.shape[0]}], got {list(alpha.shape)}")
    a = alpha.to(real.dtype).view(-1, *([1] * (real.dim() - 1)))
    x_hat = (a * real.detach() + (1.0 - a) * fake.detach()).requires_grad_(True)
    pred = critic(x_hat)
    (grad,) = torch.autograd.grad(pred.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1.0).pow(2).mean()
