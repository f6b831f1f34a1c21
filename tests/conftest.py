"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

# llama_cpp is imported inside the fixtures, never here: a test checks that
# importing `scheduler` loads no llama_cpp, and conftest runs before every test.


@pytest.fixture(scope="session")
def default_model_path():
    """Path of the default GGUF model (assembled into the cache on first use)."""
    from backends.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def llama_model(default_model_path):
    """The default model loaded once for the session; backends share it."""
    from backends.models import LlamaModel

    model = LlamaModel(default_model_path)
    yield model
    model.close()


@pytest.fixture(scope="session")
def llama_backend(llama_model):
    """A LlamaCppBackend (16 slots, n_ctx 4096, 2 threads, logits kept, a KV stream per slot) shared by the session.

    A stream per slot (kv_unified=False, not the default) makes llama.cpp batch only consecutive slots with
    equal token counts, which the bit-exact batching tests rely on; the default unified layout is covered by
    the engine and KV tests. Tests that use it start from clear_kv() themselves; they must not close it.
    """
    from backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(llama_model, n_ctx=4096, n_seq_max=16, n_threads=2, return_logits=True,
                              kv_unified=False)
    yield backend
    backend.close()
