"""SAM variants on the fused core: LookSAM, MomentumSAM, GSAM, FriendlySAM (one small module each)."""

from .friendly_sam import FriendlySAM
from .gsam import GSAM, ProportionalRho
from .looksam import LookSAM
from .momentum_sam import MomentumSAM

__all__ = ["LookSAM", "MomentumSAM", "GSAM", "ProportionalRho", "FriendlySAM"]
