"""What executes a step: the real llama.cpp backend and the cost-modelled one, with their cost models."""

import ctypes
import sys

if sys.platform.startswith("linux"):
    # llama.cpp's CUDA library exports its own instances of libstdc++ templates (std::ostream::_M_insert<long>).
    # When numpy has loaded libstdc++ first (privately, as Python loads extensions), libllama's references bind to
    # those copies and llama_model_load_from_file segfaults printing the model's hyper-parameters. Putting the
    # system libstdc++ in the global scope first makes every later library bind to it, whatever came before.
    try:
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError:  # no libstdc++ on this system: llama.cpp cannot be loaded either, and says so itself
        pass
