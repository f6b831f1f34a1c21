"""The backend contract and the scheduler's public surface: declared capabilities, no private imports."""

import ast
from pathlib import Path

from backends.synthetic import SyntheticBackend
from scheduler import Backend, ClearsKV, ForgetsRequests, KnowsTokens, Scheduler, SchedulerConfig
from scheduler.testing import DeterministicExecutor

ROOT = Path(__file__).resolve().parent.parent


def test_nothing_outside_scheduler_imports_a_private_scheduler_module():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("scheduler", ".git") or any(p.startswith(".") for p in rel.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(rel))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.startswith("scheduler._") or ".scheduler._" in n or n.startswith("scheduler.") and
                   n.split(".")[1].startswith("_") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []


def test_backends_declare_their_capabilities():
    synthetic = SyntheticBackend()
    assert isinstance(synthetic, Backend) and isinstance(synthetic, ForgetsRequests)
    assert isinstance(synthetic, KnowsTokens) and synthetic.never_eos
    assert not isinstance(synthetic, ClearsKV)  # nothing to clear: its KV is the scheduler's accounting
    executor = DeterministicExecutor()
    assert isinstance(executor, Backend) and not isinstance(executor, ForgetsRequests)
    assert not isinstance(executor, KnowsTokens)


def test_the_scheduler_owns_its_planner_and_fast_forward():
    s = Scheduler(SchedulerConfig(), "continuous")
    assert s.fast_forward.decode_horizon() == 0  # nothing runs
    assert s.schedule(0.0).is_empty
