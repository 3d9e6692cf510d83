"""Expert relevance scoring and selection (ESFT steps 1 and 2): ``score_experts``, ``ExpertScores``, rules,
task comparison and figures (plotting depends on scores, never the reverse)."""

from ..moe.errors import RoutingReadError
from .comparison import TaskComparison, compare_tasks
from .data import EmptyDataError
from .plotting import plot_comparison, plot_scores
from .score import AllTokensMaskedError, score_experts
from .scores import ExpertScores, ExpertSelection, IncompatibleScoresError

__all__ = [
    "AllTokensMaskedError",
    "EmptyDataError",
    "ExpertScores",
    "ExpertSelection",
    "IncompatibleScoresError",
    "RoutingReadError",
    "TaskComparison",
    "compare_tasks",
    "plot_comparison",
    "plot_scores",
    "score_experts",
]
