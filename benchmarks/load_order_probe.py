"""Which import orders and thread settings let llama.cpp load a model once numpy.linalg (OpenBLAS) is loaded.

    python -m benchmarks.load_order_probe MODEL.gguf [--n-gpu-layers 99] [--json-out FILE]

Each variant runs in its own Python process (a crash ends only that process) and reports its exit status
(negative: killed by that signal). The variants separate the suspects: numpy.linalg before or after
llama.cpp's libraries, OpenBLAS's and OpenMP's thread counts, and numpy without linalg. The shared objects each
process mapped are listed for the crashing order, to show which OpenBLAS and which libgomp met.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

LOAD = """
import llama_cpp as L
p = L.llama_model_default_params(); p.n_gpu_layers = {ngl}
m = L.llama_model_load_from_file({path!r}.encode(), p)
print("loaded" if m else "load returned NULL", flush=True)
"""
MAPS = """
libs = sorted({l.split()[-1] for l in open('/proc/self/maps') if '.so' in l})
print('\\n'.join(x for x in libs if any(k in x for k in ('blas', 'gomp', 'ggml', 'llama', 'gfortran', 'omp'))))
"""
VARIANTS = {
    "llama only": ("", {}),
    "numpy core, then llama": ("import numpy\n", {}),
    "numpy.linalg, then llama": ("import numpy.linalg\n", {}),
    "numpy.linalg, then llama, n_gpu_layers=0": ("import numpy.linalg\n", {"ngl": 0}),
    "llama libraries, then numpy.linalg": ("import llama_cpp\nimport numpy.linalg\n", {}),
    "numpy.linalg + OPENBLAS_NUM_THREADS=1": ("import numpy.linalg\n", {"env": {"OPENBLAS_NUM_THREADS": "1"}}),
    "numpy.linalg + OMP_NUM_THREADS=1": ("import numpy.linalg\n", {"env": {"OMP_NUM_THREADS": "1"}}),
    "libgomp RTLD_GLOBAL, then numpy.linalg": (
        "import ctypes, ctypes.util\nctypes.CDLL(ctypes.util.find_library('gomp') or 'libgomp.so.1', "
        "mode=ctypes.RTLD_GLOBAL)\nimport numpy.linalg\n", {}),
    "matplotlib.pyplot, then llama": ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot\n", {}),
    "numpy.linalg, libstdc++ RTLD_GLOBAL, then llama": (
        "import numpy.linalg, ctypes\nctypes.CDLL('libstdc++.so.6', mode=ctypes.RTLD_GLOBAL)\n", {}),
    "numpy.linalg, import backends, then llama": ("import numpy.linalg\nimport backends\n", {}),
    "the CLI modules, then backends.models": (
        "import importlib.util\nfrom sim.cli import SUBCOMMANDS\n[importlib.import_module(m) for m, _, _ in "
        "SUBCOMMANDS.values() if importlib.util.find_spec(m)]\nfrom backends.models import LlamaModel\n"
        "LlamaModel({path!r}, n_gpu_layers={ngl}).close()\nprint('product load ok', flush=True)\n", {}),
}


def run_variant(name: str, pre: str, opts: dict, path: str, ngl: int) -> dict:
    """Run one variant in a fresh interpreter; its status, last output lines and mapped libraries."""
    ngl = opts.get("ngl", ngl)
    code = pre.format(path=path, ngl=ngl) + MAPS + LOAD.format(path=path, ngl=ngl)
    env = {**os.environ, **opts.get("env", {})}
    res = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    return {"variant": name, "returncode": res.returncode, "stdout": res.stdout[-1500:],
            "stderr_tail": res.stderr[-1500:]}


def bindings(pre: str, path: str, ngl: int, tag: str) -> list[str]:
    """The dynamic linker's bindings of std::ostream::_M_insert<long> (LD_DEBUG=bindings) in this order."""
    import glob

    out = f"/tmp/ldbind-{tag}"
    for f in glob.glob(out + ".*"):
        os.remove(f)
    code = pre.format(path=path, ngl=ngl) + LOAD.format(path=path, ngl=ngl)
    env = {**os.environ, "LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": out}
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = []
    for f in glob.glob(out + ".*"):
        with open(f, errors="replace") as fh:
            lines += [" ".join(ln.split()[1:]) for ln in fh if "_M_insertIlE" in ln
                      and ("llama" in ln or "ggml" in ln)]
    return lines[:12]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--n-gpu-layers", type=int, default=99)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    out = []
    for name, (pre, opts) in VARIANTS.items():
        r = run_variant(name, pre, opts, args.model, args.n_gpu_layers)
        out.append(r)
        status = "ok" if r["returncode"] == 0 else f"exit {r['returncode']}"
        print(f"{name:<45} {status}", flush=True)
    for tag, pre in (("llama-first", ""), ("numpy-first", "import numpy.linalg\n"),
                     ("numpy-then-backends", "import numpy.linalg\nimport backends\n")):
        found = bindings(pre, args.model, args.n_gpu_layers, tag)
        out.append({"variant": f"bindings {tag}", "lines": found})
        print(f"bindings of std::ostream::_M_insert<long>, {tag}:", *found, sep="\n  ", flush=True)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
