"""Routers: scores -> Routing. One vocabulary for every conditional technique."""

from condcomp.routing.base import Router, RouterTokens
from condcomp.routing.channel_mask import ChannelMaskPredictor, HardConcreteGates
from condcomp.routing.expert_choice import ExpertChoiceRouter
from condcomp.routing.gate import BinaryGate
from condcomp.routing.losses import load_balance_loss, router_z_loss
from condcomp.routing.soft_top_k import soft_top_k
from condcomp.routing.token_choice import TopKRouter
from condcomp.routing.token_select import TokenSelectRouter
from condcomp.routing.types import Routing, RoutingError

__all__ = ["BinaryGate", "ChannelMaskPredictor", "ExpertChoiceRouter", "HardConcreteGates", "Router", "RouterTokens", "Routing", "RoutingError", "TokenSelectRouter", "TopKRouter",
           "load_balance_loss", "router_z_loss", "soft_top_k"]
