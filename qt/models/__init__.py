"""Networks of QT: the transformer actor and the twin critic (plain nn.Modules)."""

from qt.models.actor import ActorOutput, QTActor
from qt.models.critic import TwinCritic
from qt.models.transformer import CausalTransformer

__all__ = ["ActorOutput", "CausalTransformer", "QTActor", "TwinCritic"]
