"""Standard recommendation models, each in an fxrec-sparse spelling and a plain-torch one."""
from fxrec.models.dlrm import DLRM, DLRM_DCN, DLRM_DCNPlain, DLRMPlain
from fxrec.models.mlp import MLP, LowRankCrossNet, dot_interaction
from fxrec.models.two_tower import TwoTower, TwoTowerPlain, in_batch_softmax_loss

__all__ = ["DLRM", "DLRM_DCN", "DLRMPlain", "DLRM_DCNPlain", "TwoTower", "TwoTowerPlain", "MLP",
           "LowRankCrossNet", "dot_interaction", "in_batch_softmax_loss"]
