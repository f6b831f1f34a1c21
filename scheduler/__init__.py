"""tokenstep's scheduler: pure token-step scheduling policy (standard library only)."""

from .backend import Backend, ClearsKV, ForgetsRequests, KnowsTokens
from .config import SchedulerConfig
from .core import Scheduler, SchedulerStats
from .messages import KVCopy, KVRemove, RequestOutput, ScheduledChunk, StepPlan, StepResult
from .policies import POLICIES, Policy, describe_policies, make_policy, register_policy
from .request import FinishReason, Request, RequestStatus, SamplingParams
from .router import ROUTERS, Router

__all__ = [
    "Backend", "ClearsKV", "FinishReason", "ForgetsRequests", "KVCopy", "KVRemove", "KnowsTokens", "POLICIES",
    "Policy", "ROUTERS", "Request", "RequestOutput", "RequestStatus", "Router", "SamplingParams", "ScheduledChunk",
    "Scheduler", "SchedulerConfig", "SchedulerStats", "StepPlan", "StepResult", "describe_policies", "make_policy",
    "register_policy",
]
