"""mtlopt: multi-task optimization methods as optax gradient transformations."""

from mtlopt._src.grad import task_value_and_grad as task_value_and_grad
from mtlopt._src.gramian_mode import weights_from_gramian as weights_from_gramian
from mtlopt._src.inspect import task_weights as task_weights
from mtlopt._src.loss_mode import loss_weights as loss_weights
from mtlopt._src.methods.balancing import DBMTLState as DBMTLState
from mtlopt._src.methods.balancing import LogTransformState as LogTransformState
from mtlopt._src.methods.balancing import NTKMTLState as NTKMTLState
from mtlopt._src.methods.balancing import db_mtl as db_mtl
from mtlopt._src.methods.balancing import log_transform as log_transform
from mtlopt._src.methods.balancing import ntkmtl as ntkmtl
from mtlopt._src.methods.bargaining import NashMTLState as NashMTLState
from mtlopt._src.methods.bargaining import nash_mtl as nash_mtl
from mtlopt._src.methods.closed_form import AlignedMTLState as AlignedMTLState
from mtlopt._src.methods.closed_form import ConFIGState as ConFIGState
from mtlopt._src.methods.closed_form import IMTLGState as IMTLGState
from mtlopt._src.methods.closed_form import KrumState as KrumState
from mtlopt._src.methods.closed_form import aligned_mtl as aligned_mtl
from mtlopt._src.methods.closed_form import config as config
from mtlopt._src.methods.closed_form import imtl_g as imtl_g
from mtlopt._src.methods.closed_form import krum as krum
from mtlopt._src.methods.coordinate import GradDropState as GradDropState
from mtlopt._src.methods.coordinate import TrimmedMeanState as TrimmedMeanState
from mtlopt._src.methods.coordinate import graddrop as graddrop
from mtlopt._src.methods.coordinate import trimmed_mean as trimmed_mean
from mtlopt._src.methods.dual_cone import DualProjState as DualProjState
from mtlopt._src.methods.dual_cone import UPGradState as UPGradState
from mtlopt._src.methods.dual_cone import dualproj as dualproj
from mtlopt._src.methods.dual_cone import upgrad as upgrad
from mtlopt._src.methods.loss_weighting import DWAState as DWAState
from mtlopt._src.methods.loss_weighting import dwa as dwa
from mtlopt._src.methods.min_norm import CAGradState as CAGradState
from mtlopt._src.methods.min_norm import MGDAState as MGDAState
from mtlopt._src.methods.min_norm import cagrad as cagrad
from mtlopt._src.methods.min_norm import mgda as mgda
from mtlopt._src.methods.projection import GradVacState as GradVacState
from mtlopt._src.methods.projection import PCGradState as PCGradState
from mtlopt._src.methods.projection import gradvac as gradvac
from mtlopt._src.methods.projection import pcgrad as pcgrad
from mtlopt._src.methods.scalarization import LinearState as LinearState
from mtlopt._src.methods.scalarization import MeanState as MeanState
from mtlopt._src.methods.scalarization import linear as linear
from mtlopt._src.methods.scalarization import mean as mean
from mtlopt._src.native import kernel_available as native_kernel_available
from mtlopt._src.native import status as native_kernel_status
from mtlopt._src.sampling import cagrad_fast_groups as cagrad_fast_groups
from mtlopt._src.sampling import cagrad_fast_weights as cagrad_fast_weights
from mtlopt._src.solvers import SolverInfo as SolverInfo
from mtlopt._src.tree import TaskScaled as TaskScaled
from mtlopt._src.tree import combine as combine
from mtlopt._src.tree import gramian as gramian

__version__ = "0.1.0"

__all__ = [
    "AlignedMTLState",
    "CAGradState",
    "ConFIGState",
    "DBMTLState",
    "DWAState",
    "DualProjState",
    "GradDropState",
    "GradVacState",
    "IMTLGState",
    "KrumState",
    "LinearState",
    "LogTransformState",
    "MGDAState",
    "MeanState",
    "NTKMTLState",
    "NashMTLState",
    "PCGradState",
    "SolverInfo",
    "TaskScaled",
    "TrimmedMeanState",
    "UPGradState",
    "aligned_mtl",
    "cagrad",
    "cagrad_fast_groups",
    "cagrad_fast_weights",
    "combine",
    "config",
    "db_mtl",
    "dualproj",
    "dwa",
    "graddrop",
    "gradvac",
    "gramian",
    "imtl_g",
    "krum",
    "linear",
    "log_transform",
    "loss_weights",
    "mean",
    "mgda",
    "nash_mtl",
    "native_kernel_available",
    "native_kernel_status",
    "ntkmtl",
    "pcgrad",
    "task_value_and_grad",
    "task_weights",
    "trimmed_mean",
    "upgrad",
    "weights_from_gramian",
]

# --- exports: learned_scales ---
from mtlopt._src.methods.learned_scales import IMTLLState as IMTLLState
from mtlopt._src.methods.learned_scales import IMTLState as IMTLState
from mtlopt._src.methods.learned_scales import UWState as UWState
from mtlopt._src.methods.learned_scales import imtl as imtl
from mtlopt._src.methods.learned_scales import imtl_l as imtl_l
from mtlopt._src.methods.learned_scales import uw as uw

__all__ += ["IMTLLState", "IMTLState", "UWState", "imtl", "imtl_l", "uw"]
# --- end exports: learned_scales ---

# --- exports: rate_balancing ---
from mtlopt._src.methods.rate_balancing import FAMOState as FAMOState  # noqa: E402
from mtlopt._src.methods.rate_balancing import GradNormState as GradNormState  # noqa: E402
from mtlopt._src.methods.rate_balancing import famo as famo  # noqa: E402
from mtlopt._src.methods.rate_balancing import gradnorm as gradnorm  # noqa: E402

__all__ += ["FAMOState", "GradNormState", "famo", "gradnorm"]
# --- end exports: rate_balancing ---

# --- exports: scalarizations ---
from mtlopt._src.methods.scalarization import COSMOSState as COSMOSState  # noqa: E402
from mtlopt._src.methods.scalarization import GLSState as GLSState  # noqa: E402
from mtlopt._src.methods.scalarization import PBIState as PBIState  # noqa: E402
from mtlopt._src.methods.scalarization import STCHState as STCHState  # noqa: E402
from mtlopt._src.methods.scalarization import cosmos as cosmos  # noqa: E402
from mtlopt._src.methods.scalarization import gls as gls  # noqa: E402
from mtlopt._src.methods.scalarization import pbi as pbi  # noqa: E402
from mtlopt._src.methods.scalarization import stch as stch  # noqa: E402

__all__ += ["COSMOSState", "GLSState", "PBIState", "STCHState", "cosmos", "gls", "pbi", "stch"]
# --- end exports: scalarizations ---

# --- exports: rlw_dwa ---
from mtlopt._src.methods.loss_weighting import RLWState as RLWState  # noqa: E402
from mtlopt._src.methods.loss_weighting import rlw as rlw  # noqa: E402

__all__ += ["RLWState", "rlw"]
# --- end exports: rlw_dwa ---

# --- exports: diagnostics ---
from mtlopt._src.diagnostics import Diagnostics as Diagnostics  # noqa: E402
from mtlopt._src.diagnostics import DiagnosticsState as DiagnosticsState  # noqa: E402
from mtlopt._src.diagnostics import diagnostics as diagnostics  # noqa: E402
from mtlopt._src.diagnostics import task_diagnostics as task_diagnostics  # noqa: E402
from mtlopt._src.diagnostics import with_diagnostics as with_diagnostics  # noqa: E402

__all__ += [
    "Diagnostics",
    "DiagnosticsState",
    "diagnostics",
    "task_diagnostics",
    "with_diagnostics",
]
# --- end exports: diagnostics ---

# --- exports: flax_glue ---
from mtlopt._src.accumulate import AccumulateState as AccumulateState  # noqa: E402
from mtlopt._src.accumulate import accumulate as accumulate  # noqa: E402
from mtlopt._src.paths import by_path as by_path  # noqa: E402

__all__ += ["AccumulateState", "accumulate", "by_path"]
# --- end exports: flax_glue ---

# --- exports: fair ---
from mtlopt._src.methods.fair import FairGradState as FairGradState  # noqa: E402
from mtlopt._src.methods.fair import PCDState as PCDState  # noqa: E402
from mtlopt._src.methods.fair import fairgrad as fairgrad  # noqa: E402
from mtlopt._src.methods.fair import pcd as pcd  # noqa: E402

__all__ += ["FairGradState", "PCDState", "fairgrad", "pcd"]
# --- end exports: fair ---

# --- exports: stochastic ---
from mtlopt._src.methods.stochastic import MoDoState as MoDoState  # noqa: E402
from mtlopt._src.methods.stochastic import SDMGradState as SDMGradState  # noqa: E402
from mtlopt._src.methods.stochastic import modo as modo  # noqa: E402
from mtlopt._src.methods.stochastic import sdmgrad as sdmgrad  # noqa: E402

__all__ += ["MoDoState", "SDMGradState", "modo", "sdmgrad"]
# --- end exports: stochastic ---

# --- exports: tracking ---
from mtlopt._src.methods.tracking import ExcessMTLState as ExcessMTLState  # noqa: E402
from mtlopt._src.methods.tracking import MoCoState as MoCoState  # noqa: E402
from mtlopt._src.methods.tracking import excess_mtl as excess_mtl  # noqa: E402
from mtlopt._src.methods.tracking import moco as moco  # noqa: E402

__all__ += ["ExcessMTLState", "MoCoState", "excess_mtl", "moco"]
# --- end exports: tracking ---

# --- exports: modifiers ---
from mtlopt._src.modifiers import SmoothWeightsState as SmoothWeightsState  # noqa: E402
from mtlopt._src.modifiers import refresh_weights as refresh_weights  # noqa: E402
from mtlopt._src.modifiers import smooth_weights as smooth_weights  # noqa: E402

__all__ += ["SmoothWeightsState", "refresh_weights", "smooth_weights"]
# --- end exports: modifiers ---
