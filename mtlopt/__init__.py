"""mtlopt: multi-task optimization methods as optax gradient transformations."""

from mtlopt._src.grad import task_value_and_grad as task_value_and_grad
from mtlopt._src.gramian_mode import weights_from_gramian as weights_from_gramian
from mtlopt._src.inspect import task_weights as task_weights
from mtlopt._src.loss_mode import loss_weights as loss_weights
from mtlopt._src.methods.balancing import DBMTLState as DBMTLState
from mtlopt._src.methods.balancing import LogTransformState as LogTransformState
from mtlopt._src.methods.balancing import db_mtl as db_mtl
from mtlopt._src.methods.balancing import log_transform as log_transform
from mtlopt._src.methods.coordinate import TrimmedMeanState as TrimmedMeanState
from mtlopt._src.methods.coordinate import trimmed_mean as trimmed_mean
from mtlopt._src.methods.loss_weighting import DWAState as DWAState
from mtlopt._src.methods.loss_weighting import dwa as dwa
from mtlopt._src.methods.min_norm import CAGradState as CAGradState
from mtlopt._src.methods.min_norm import MGDAState as MGDAState
from mtlopt._src.methods.min_norm import cagrad as cagrad
from mtlopt._src.methods.min_norm import mgda as mgda
from mtlopt._src.methods.projection import PCGradState as PCGradState
from mtlopt._src.methods.projection import pcgrad as pcgrad
from mtlopt._src.methods.scalarization import LinearState as LinearState
from mtlopt._src.methods.scalarization import MeanState as MeanState
from mtlopt._src.methods.scalarization import linear as linear
from mtlopt._src.methods.scalarization import mean as mean
from mtlopt._src.native import kernel_available as native_kernel_available
from mtlopt._src.sampling import cagrad_fast_groups as cagrad_fast_groups
from mtlopt._src.sampling import cagrad_fast_weights as cagrad_fast_weights
from mtlopt._src.solvers import SolverInfo as SolverInfo
from mtlopt._src.tree import TaskScaled as TaskScaled
from mtlopt._src.tree import combine as combine
from mtlopt._src.tree import gramian as gramian

__version__ = "0.1.0"

__all__ = [
    "CAGradState",
    "DBMTLState",
    "DWAState",
    "LinearState",
    "LogTransformState",
    "MGDAState",
    "MeanState",
    "PCGradState",
    "SolverInfo",
    "TaskScaled",
    "TrimmedMeanState",
    "cagrad",
    "cagrad_fast_groups",
    "cagrad_fast_weights",
    "combine",
    "db_mtl",
    "dwa",
    "gramian",
    "linear",
    "log_transform",
    "loss_weights",
    "mean",
    "mgda",
    "native_kernel_available",
    "pcgrad",
    "task_value_and_grad",
    "task_weights",
    "trimmed_mean",
    "weights_from_gramian",
]

# --- exports: dual_cone ---
# --- end exports: dual_cone ---
# --- exports: bargaining ---
# --- end exports: bargaining ---
# --- exports: closed_form ---
# --- end exports: closed_form ---
# --- exports: surgery ---
# --- end exports: surgery ---
# --- exports: ntkmtl ---
# --- end exports: ntkmtl ---
