"""Routers: scores -> Routing. One vocabulary for every conditional technique."""

from condcomp.routing.expert_choice import ExpertChoiceRouter
from condcomp.routing.losses import load_balance_loss, router_z_loss
from condcomp.routing.token_choice import TopKRouter
from condcomp.routing.types import Routing, RoutingError

__all__ = ["ExpertChoiceRouter", "Routing", "RoutingError", "TopKRouter", "load_balance_loss", "router_z_loss"]
