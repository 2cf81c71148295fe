"""lookahead_optax: an exact, fast, drop-in Lookahead optimizer for optax.

Import the public names from here; the underscored modules are private and may
change without notice (don't import `lookahead_optax._*`).
"""

from lookahead_optax._catch_up import CatchUpState
from lookahead_optax._checkpoint import check_state_structure
from lookahead_optax._checkpoint import migrate_optax_state
from lookahead_optax._flax import eval_model
from lookahead_optax._flax import eval_train_state
from lookahead_optax._lazy import LazyState
from lookahead_optax._lazy import lazy
from lookahead_optax._lookahead import LookaheadState
from lookahead_optax._lookahead import lookahead
from lookahead_optax._lookahead import PullbackState
from lookahead_optax._diloco import diloco
from lookahead_optax._outer import snoo
from lookahead_optax._ranger import ranger
from lookahead_optax._participation import ReplicaCounts
from lookahead_optax._replica_mean import ReplicaMeanState
from lookahead_optax._replica_mean import replica_mean
from lookahead_optax._replicas import check_replicas_agree
from lookahead_optax._report import CommunicationReport
from lookahead_optax._report import Collective
from lookahead_optax._report import communication_report
from lookahead_optax._replicas import replicas_agree
from lookahead_optax._ranger import scale_by_ranger_radam
from lookahead_optax._sparse import SparseRows
from lookahead_optax._sparse_grad import sparse_value_and_grad
from lookahead_optax._state import eval_params
from lookahead_optax._state import slow_params
from lookahead_optax._types import CycleRows
from lookahead_optax._types import StreamingState

__version__ = "0.1.0"

__all__ = (
    "CatchUpState",
    "Collective",
    "CommunicationReport",
    "CycleRows",
    "LazyState",
    "LookaheadState",
    "PullbackState",
    "ReplicaCounts",
    "ReplicaMeanState",
    "SparseRows",
    "StreamingState",
    "check_replicas_agree",
    "check_state_structure",
    "communication_report",
    "diloco",
    "eval_model",
    "eval_params",
    "eval_train_state",
    "lazy",
    "lookahead",
    "migrate_optax_state",
    "ranger",
    "replica_mean",
    "replicas_agree",
    "scale_by_ranger_radam",
    "slow_params",
    "snoo",
    "sparse_value_and_grad",
)
