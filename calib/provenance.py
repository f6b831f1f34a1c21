"""Where a profile came from (model file, llama.cpp build, machine, CPU load) and whether it fits this run."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path
from typing import Any


class ProfileMismatch(ValueError):
    """The profile was calibrated on another model or llama.cpp build."""


def check_profile(profile: Any, profile_name: str, model: dict, build: dict, machine: dict,
                  force: bool = False) -> list[str]:
    """Refuse a profile from another model or build unless force; return warnings (machine, forced problems)."""
    meta = getattr(profile, "meta", {}) or {}
    problems: list[str] = []
    pm = meta.get("model")
    if not isinstance(pm, dict):
        problems.append("it names no model (it was not made by `tokenstep calibrate`)")
    elif pm.get("sha256") and pm.get("sha256") != model.get("sha256"):
        problems.append(f"it was calibrated on model {pm.get('name')!r} ({pm.get('file')}, sha256 "
                        f"{str(pm.get('sha256'))[:12]}...) but this run uses {model.get('name')!r} "
                        f"({model.get('file')}, sha256 {str(model.get('sha256'))[:12]}...)")
    elif not pm.get("sha256") and (pm.get("name"), pm.get("size_bytes")) != (model.get("name"),
                                                                                model.get("size_bytes")):
        problems.append(f"it was calibrated on model {pm.get('name')!r} ({pm.get('size_bytes')} bytes) but this "
                        f"run uses {model.get('name')!r} ({model.get('size_bytes')} bytes)")
    built = meta.get("llama_cpp_python")
    if built != build.get("llama_cpp_python"):
        problems.append(f"it was calibrated with llama-cpp-python {built or 'of unknown version'} but "
                        f"{build.get('llama_cpp_python')} is installed")
    if problems and not force:
        raise ProfileMismatch(f"profile {profile_name!r} does not fit this backend: {'; '.join(problems)}. "
                              "Calibrate this model and build with `tokenstep calibrate --model NAME --out FILE` "
                              "and pass --profile FILE, or pass --force to compare anyway.")
    warnings = [f"forced: {p}" for p in problems]
    pmach = meta.get("machine") or {}
    for key in ("cpu_model", "nproc"):
        if pmach.get(key) is not None and pmach.get(key) != machine.get(key):
            warnings.append(f"profile {key} {pmach.get(key)!r} differs from this machine's {machine.get(key)!r}")
    return warnings


def check_instances(profile: Any, profile_name: str, instances: int, force: bool = False) -> list[str]:
    """Refuse a profile calibrated for another number of instances sharing the machine, unless force.

    A step's time depends on the cores its instance has and on what the other instances run meanwhile,
    so a profile of one instance with the machine to itself misprices each of two sharing it (on a 2-vCPU VM a
    B = 4 decode on 1 thread took 1.9x its 2-thread time) and the reverse.
    """
    ctx = (getattr(profile, "meta", {}) or {}).get("context") or {}
    calibrated = int(ctx.get("instances", 1))
    if calibrated == instances:
        return []
    problem = (f"profile {profile_name!r} was calibrated as one of {calibrated} instance(s) sharing the machine "
               f"({ctx.get('n_threads', '?')} thread(s) each) but this run has {instances}")
    if not force:
        raise ProfileMismatch(f"{problem}. Calibrate one with `tokenstep calibrate --instances {instances} --out FILE` "
                              "and pass --profile FILE, or pass --force to compare anyway.")
    return [f"forced: {problem}"]


# -- where a profile came from ---------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> dict:
    """{"file", "size_bytes", "sha256"} of a model file (the hash is cached per size and mtime)."""
    p = Path(path)
    st = p.stat()
    return {"file": p.name, "size_bytes": st.st_size, "sha256": _sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)}


def model_fingerprint(llama_model) -> dict:
    """Name, architecture, file name, size and sha256 of a loaded LlamaModel."""
    return {"name": llama_model.name, "architecture": llama_model.architecture, **file_fingerprint(llama_model.path)}


def build_info() -> dict:
    """llama-cpp-python version and llama.cpp's system info line."""
    import llama_cpp as L

    info = L.llama_print_system_info()
    return {"llama_cpp_python": getattr(L, "__version__", None),
            "llama_cpp_system_info": info.decode("utf-8", "replace").strip() if isinstance(info, bytes) else str(info)}


def machine_info() -> dict:
    """CPU model, core counts, platform and Python version of this machine."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_model": cpu or platform.processor() or None, "nproc": affinity or os.cpu_count(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def load_snapshot() -> dict:
    """Load average and CPU pressure (PSI "some" avg10/avg60) now: how shared the CPU was."""
    out: dict = {}
    try:
        out["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        fields = dict(item.split("=") for item in some[1:])
        out["cpu_pressure_some_avg10_pct"] = float(fields["avg10"])
        out["cpu_pressure_some_avg60_pct"] = float(fields["avg60"])
    except (OSError, IndexError, KeyError, ValueError):
        pass
    return out
