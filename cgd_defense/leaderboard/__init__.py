"""The leaderboard: grids of jobs, a resumable results database, local and Ray runners, and the
published tables, page and plots. See the README section "Leaderboard"."""
from .db import ResultsDB
from .grid import GridError, GridPlan, GridSpec, Job, list_grids, load_grid, load_plan, plan_grid

__all__ = ["GridError", "GridPlan", "GridSpec", "Job", "ResultsDB", "list_grids", "load_grid", "load_plan",
           "plan_grid"]
