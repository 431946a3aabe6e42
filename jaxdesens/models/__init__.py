"""Recognition models: ResNet-18/34 with an optional Feature Selection Masknet branch."""

from jaxdesens.models.fsm import FeatureSelectionMasknet
from jaxdesens.models.resnet import STAGE_NAMES, ResNet, broadcast_mask

__all__ = ["FeatureSelectionMasknet", "ResNet", "STAGE_NAMES", "broadcast_mask"]
