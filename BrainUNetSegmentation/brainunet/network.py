"""BrainUNet: a 3D U-Net with residual blocks and additive attention gates on every skip.

Imported lazily (it needs torch): the Slicer module never imports this at module scope.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass
class NetworkConfig:
    in_channels: int = 3
    out_channels: int = 4  # background, NETC, SNFH, ET
    features: tuple[int, ...] = (32, 64, 128, 256, 320)  # one entry per resolution level
    blocks_per_level: int = 1  # residual blocks per encoder / decoder level
    attention: bool = True
    deep_supervision: bool = False
    dropout: float = 0.0

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.features) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "features" in known:
            known["features"] = tuple(int(f) for f in known["features"])
        return cls(**known)


#: The paper's configuration (about 23 M parameters; BENCHMARKS.md counts them).
PAPER_CONFIG = NetworkConfig(features=(32, 64, 128, 256, 512), blocks_per_level=1)


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=True)


class ResidualBlock(nn.Module):
    """conv-norm-act-conv-norm plus a (projected) identity, then activation."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        if cin != cout or stride != 1:
            self.skip = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), _norm(cout))
        else:
            self.skip = nn.Identity()
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        y = self.act(self.norm1(self.conv1(x)))
        y = self.dropout(y)
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


class AttentionGate(nn.Module):
    """Additive attention (Oktay et al. 2018): the decoder signal g decides which skip voxels pass."""

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.theta_x = nn.Conv3d(skip_channels, inter_channels, 1, bias=False)
        self.phi_g = nn.Conv3d(gate_channels, inter_channels, 1, bias=True)
        self.psi = nn.Conv3d(inter_channels, 1, 1, bias=True)

    def forward(self, x, g):
        a = F.relu(self.theta_x(x) + self.phi_g(g), inplace=True)
        alpha = torch.sigmoid(self.psi(a))
        return x * alpha


class BrainUNet(nn.Module):
    def __init__(self, config: NetworkConfig | None = None):
        super().__init__()
        self.config = config = config or NetworkConfig()
        f = config.features
        if len(f) < 2:
            raise ValueError("BrainUNet needs at least two resolution levels")

        def stage(cin, cout, stride):
            blocks = [ResidualBlock(cin, cout, stride, config.dropout)]
            blocks += [ResidualBlock(cout, cout, 1, config.dropout) for _ in range(config.blocks_per_level - 1)]
            return nn.Sequential(*blocks)

        self.encoders = nn.ModuleList(
            [stage(config.in_channels, f[0], 1)] + [stage(f[i - 1], f[i], 2) for i in range(1, len(f))]
        )
        self.upsamplers = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.heads = nn.ModuleList()
        for i in reversed(range(len(f) - 1)):
            self.upsamplers.append(nn.ConvTranspose3d(f[i + 1], f[i], 2, stride=2, bias=False))
            self.gates.append(AttentionGate(f[i], f[i], max(f[i] // 2, 1)) if config.attention else nn.Identity())
            self.decoders.append(stage(2 * f[i], f[i], 1))
            self.heads.append(nn.Conv3d(f[i], config.out_channels, 1))

    def forward(self, x):
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        outputs = []
        for up, gate, dec, head in zip(self.upsamplers, self.gates, self.decoders, self.heads):
            x = up(x)
            skip = skips.pop()
            if self.config.attention:
                skip = gate(skip, x)
            x = dec(torch.cat([skip, x], dim=1))
            if self.config.deep_supervision and self.training:
                outputs.append(head(x))
        if self.config.deep_supervision and self.training:
            return outputs[::-1]  # full resolution first
        return self.heads[-1](x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
