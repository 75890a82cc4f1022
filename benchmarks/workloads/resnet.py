"""A small residual CNN with BatchNorm2d on scikit-learn's ``load_digits`` (8×8 images).

BackPACK supports neither the skip connections nor BatchNorm2d: only the exact
curvatures (``ggn-exact``, ``hessian-exact``) can measure alpha* here.

1×8×8 → conv 3×3 (16) → BN → ReLU → 2 residual blocks (conv-BN-ReLU-conv-BN, + identity, ReLU)
→ block 16→32 with stride 2 (1×1 conv + BN shortcut) → global average pool → linear 10.
Pixels are divided by 16; the split is that of :mod:`.digits` (1437 train / 360 test).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Data, Workload
from .digits import load_data as load_digits_flat


def load_data(seed: int, size: str) -> Data:
    data = load_digits_flat(seed, size)
    return Data(
        data.x_train.reshape(-1, 1, 8, 8), data.y_train, data.x_test.reshape(-1, 1, 8, 8), data.y_test
    )


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (identity, or 1×1 conv + BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (h + self.shortcut(x)).relu()


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16, 16),
        Block(16, 16),
        Block(16, 32, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


WORKLOAD = Workload(
    name="digits_resnet",
    description="residual CNN 16-16-16-32 with BatchNorm2d, cross-entropy, scikit-learn load_digits 8×8",
    load_data=load_data,
    make_model=make_model,
    loss="cross_entropy",
    batch_size=64,
    steps={"tiny": 3, "quick": 300, "full": 800},
    backpack=False,
    embedded=True,
)
