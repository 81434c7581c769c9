"""GGUF file -> Hugging Face model directory (config.json, model.safetensors, tokenizer files).

llama.cpp's converter changes a checkpoint on its way into GGUF, and each change is undone here:
- tensor names: `blk.N.attn_q.weight` becomes `model.layers.N.self_attn.q_proj.weight`, and so on;
- llama (not qwen2, not gemma): the rows of attn_q / attn_k are permuted within each head from the
  rotate-half rope layout (first half of the head dims, then the second) to the interleaved one
  llama.cpp computes with (pairs of adjacent dims). `_unpermute_rows` puts them back;
- gemma2/gemma3: every RMSNorm weight is stored as (1 + w), because llama.cpp's RMSNorm multiplies
  by the weight while Gemma's multiplies by (1 + weight). One is subtracted again;
- quantized tensors (Q4_K, Q8_0, ...) are dequantized with the `gguf` package.
Everything the GGUF metadata does not state (Gemma-3's local rope base and layer pattern, Gemma's
query scaling) gets the value llama.cpp itself assumes when it runs the file.

Only the header is parsed here, by a small reader of our own: `gguf.GGUFReader` builds Python
objects for every element of the 262k-entry vocabulary arrays and takes ~12 s on gemma-3-270m.
Weights stream from a memory map into model.safetensors one tensor at a time, so peak memory is
about one dequantized tensor, not the whole model.
"""
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import BadPath, BadValue, MissingPackage, PathExists
from .paths import partial_tag, remove_stale_partials

# Bump when the output of a conversion changes, so caches of older conversions are redone.
CONVERTER_VERSION = 1
# Written last into a converted directory: its presence means the conversion completed.
CONVERSION_MARKER = "nudgefast_conversion.json"

_GGUF_MAGIC = b"GGUF"


class GGUFError(BadValue):
    """A file that is not a GGUF file nudgefast can read or convert (a ValueError, and a user error)."""


def _gguf_constants():
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise MissingPackage("reading GGUF files needs the gguf package: pip install 'gguf>=0.10'") from None
    return GGML_QUANT_SIZES, GGMLQuantizationType
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


# ----------------------------------------------------------------------------- reading the header

@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): GGUF lists dims innermost first
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]  # arrays of numbers come back as numpy arrays, strings as str
    tensors: dict[str, GGUFTensorInfo]
    data_offset: int  # absolute file offset of the (aligned) tensor data section

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "<missing>")


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, vtype: int):
        fmt = _SCALAR_FORMATS[vtype]
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar(10)
        if self.pos + length > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header (string runs past end of file)")
        text = bytes(self.buf[self.pos:self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar(4), self.scalar(10)
            if item_type == _STRING:
                return [self.string() for _ in range(count)]
            if item_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[item_type]).newbyteorder("<")
                array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return array
            return [self.value(item_type) for _ in range(count)]  # arrays of arrays
        if vtype not in _SCALAR_FORMATS:
            raise GGUFError(f"{self.path}: unknown GGUF metadata value type {vtype}")
        return self.scalar(vtype)


def read_gguf_header(path) -> GGUFHeader:
    """Metadata and tensor directory of a GGUF file (v2 or v3, little-endian); no tensor data."""
    GGML_QUANT_SIZES, GGMLQuantizationType = _gguf_constants()
    path = Path(path)
    if not path.is_file():
        raise BadPath(f"no such GGUF file: {path}" + (" (a directory)" if path.is_dir() else ""))
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise GGUFError(f"{path} is not a GGUF file (too short)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if buf[:4] != _GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (starts with {bytes(buf[:4])!r}, "
                             f"expected {_GGUF_MAGIC!r})")
        cur = _Cursor(buf, path)
        cur.pos = 4
        version = cur.scalar(4)
        if version not in (2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {version} (big-endian or v1 files "
                             f"are not supported)")
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar(10) for _ in range(cur.scalar(4))]
            ggml_type, offset = cur.scalar(4), cur.scalar(10)
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}") from None
            n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if dims[0] % block:
                raise GGUFError(f"{path}: tensor {name!r} row length {dims[0]} is not a multiple "
                                 f"of its block size {block}")
            infos.append(GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, offset,
                                        n_elements // block * type_size))
        alignment = int(metadata.get("general.alignment", 32))
        data_offset = -(-cur.pos // alignment) * alignment
        file_size = len(buf)
    except (struct.error, IndexError):
        raise GGUFError(f"{path}: truncated or corrupt GGUF header") from None
    finally:
        buf.close()
    for info in infos:
        if data_offset + info.offset + info.nbytes > file_size:
            raise GGUFError(f"{path}: tensor {info.name!r} runs past the end of the file "
                             f"(truncated download?)")
    return GGUFHeader(path, version, metadata, {i.name: i for i in infos}, data_offset)


def _dequantize(header: GGUFHeader, info: GGUFTensorInfo, file_map: np.ndarray) -> np.ndarray:
    """One tensor as float32 in torch layout. Dequantized in row chunks so that the temporaries of
    the numpy dequantizers stay small next to the output (the 262144-row embedding is 670 MB)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.ggml_type)
    block, type_size = GGML_QUANT_SIZES[qtype]
    row_len = info.shape[-1]
    row_bytes = row_len // block * type_size
    n_rows = info.nbytes // row_bytes
    start = header.data_offset + info.offset
    raw = file_map[start:start + info.nbytes].reshape(n_rows, row_bytes)
    out = np.empty((n_rows, row_len), dtype=np.float32)
    step = max(1, (32 << 20) // max(row_len * 4, 1))
    for r in range(0, n_rows, step):
        try:
            out[r:r + step] = dequantize(np.ascontiguousarray(raw[r:r + step]), qtype)
        except NotImplementedError:
            raise GGUFError(f"{header.path}: cannot dequantize tensor {info.name!r} of type "
                             f"{qtype.name}") from None
    return out.reshape(info.shape)


# ----------------------------------------------------------------------------- config per family

def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _int(md: dict, key: str, default=None) -> int:
    value = md.get(key, default)
    if value is None:
        raise GGUFError(f"GGUF metadata lacks {key!r}")
    if isinstance(value, np.ndarray):  # per-layer values (e.g. OpenELM): not a plain transformer
        raise GGUFError(f"GGUF metadata {key!r} varies per layer; not supported")
    return int(value)


def _rope(md: dict, arch: str, default_theta: float) -> tuple[float, dict | None]:
    """(theta, scaling) where scaling is None or {"rope_type": "linear", "factor": f}."""
    theta = _f32(md.get(f"{arch}.rope.freq_base", default_theta))
    kind = md.get(f"{arch}.rope.scaling.type", "none")
    factor = float(md.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": factor}
    raise GGUFError(f"GGUF rope scaling type {kind!r} is not supported (only linear)")


def _rope_parameters(theta: float, scaling: dict | None) -> dict:
    """transformers >= 5 reads rope settings from `rope_parameters`; the v4 fields stay beside it."""
    return {"rope_type": "default", "rope_theta": theta, **(scaling or {})}


def _common_config(h: GGUFHeader) -> dict:
    md, arch = h.metadata, h.architecture
    embed = h.tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{h.path}: no token_embd.weight tensor")
    hidden = _int(md, f"{arch}.embedding_length")
    heads = _int(md, f"{arch}.attention.head_count")
    head_dim = _int(md, f"{arch}.attention.key_length", hidden // heads)
    if _int(md, f"{arch}.attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{h.path}: key and value head sizes differ; not supported")
    if embed.shape[1] != hidden:
        raise GGUFError(f"{h.path}: token_embd width {embed.shape[1]} != embedding_length {hidden}")
    config = {
        "vocab_size": embed.shape[0],  # rows of the embedding: may exceed the tokenizer's vocab
        "hidden_size": hidden,
        "intermediate_size": _int(md, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _int(md, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(md, f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": _int(md, f"{arch}.context_length", 2048),
        "rms_norm_eps": _f32(md.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in h.tensors,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    for name in ("bos", "eos", "pad"):
        key = "padding" if name == "pad" else name
        if f"tokenizer.ggml.{key}_token_id" in md:
            config[f"{name}_token_id"] = int(md[f"tokenizer.ggml.{key}_token_id"])
    return config


def _llama_config(h: GGUFHeader) -> dict:
    md, arch = h.metadata, h.architecture
    config = _common_config(h)
    if "rope_freqs.weight" in h.tensors:
        raise GGUFError(f"{h.path}: llama3-style rope frequency factors (rope_freqs.weight) are "
                         f"not supported")
    if _int(md, f"{arch}.rope.dimension_count", config["head_dim"]) != config["head_dim"]:
        raise GGUFError(f"{h.path}: partial rotary embeddings are not supported for llama")
    theta, scaling = _rope(md, arch, 10000.0)
    config.update({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in h.tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in h.tensors, "pretraining_tp": 1,
        "rope_theta": theta, "rope_scaling": scaling,
        "rope_parameters": _rope_parameters(theta, scaling),
    })
    return config


def _qwen2_config(h: GGUFHeader) -> dict:
    config = _common_config(h)
    theta, scaling = _rope(h.metadata, h.architecture, 1000000.0)
    config.update({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": config["num_hidden_layers"],
        "rope_theta": theta, "rope_scaling": scaling,
        "rope_parameters": _rope_parameters(theta, scaling),
    })
    return config


def _gemma_query_scale(config: dict, md: dict, arch: str, layers_of_27b: int) -> float:
    """Gemma scales q by query_pre_attn_scalar**-0.5. The 27B models use hidden/heads, the others
    head_dim; GGUF files rarely say which, and llama.cpp tells them apart by layer count."""
    if f"{arch}.attention.scale" in md:
        return round(float(md[f"{arch}.attention.scale"]) ** -2, 3)
    if config["num_hidden_layers"] == layers_of_27b:
        return config["hidden_size"] // config["num_attention_heads"]
    return config["head_dim"]


def _sliding_layers(md: dict, arch: str, n_layers: int, default_period: int) -> tuple[list, int | None]:
    """(layer_types, period): a period p makes every p-th layer global (layer i is sliding when
    (i + 1) % p != 0); an array pattern lists True for each sliding layer."""
    pattern = md.get(f"{arch}.attention.sliding_window_pattern", default_period)
    if isinstance(pattern, np.ndarray):
        if len(pattern) != n_layers:
            raise GGUFError(f"sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        sliding, period = [bool(x) for x in pattern], None
    else:
        period = int(pattern)
        sliding = [period <= 0 or (i + 1) % period != 0 for i in range(n_layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding], period


def _gemma2_config(h: GGUFHeader) -> dict:
    md, arch = h.metadata, h.architecture
    config = _common_config(h)
    theta, scaling = _rope(md, arch, 10000.0)
    layer_types, period = _sliding_layers(md, arch, config["num_hidden_layers"], 2)
    config.update({
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _gemma_query_scale(config, md, arch, layers_of_27b=46),
        "sliding_window": _int(md, f"{arch}.attention.sliding_window", 4096),
        "layer_types": layer_types,
        # llama.cpp's defaults when a file does not state them, which are Gemma-2's own values
        "attn_logit_softcapping": _f32(md.get(f"{arch}.attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": _f32(md.get(f"{arch}.final_logit_softcapping", 30.0)),
        "attention_bias": False, "cache_implementation": "hybrid",
        "rope_theta": theta, "rope_scaling": scaling,
        "rope_parameters": _rope_parameters(theta, scaling),
    })
    if period is not None:
        config["sliding_window_pattern"] = period
    return config


def _gemma3_config(h: GGUFHeader) -> dict:
    md, arch = h.metadata, h.architecture
    config = _common_config(h)
    global_theta, scaling = _rope(md, arch, 1000000.0)  # rope scaling applies to global layers only
    local_theta = _f32(md.get(f"{arch}.rope.freq_base_swa", 10000.0))
    layer_types, period = _sliding_layers(md, arch, config["num_hidden_layers"], 6)
    config.update({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _gemma_query_scale(config, md, arch, layers_of_27b=62),
        "sliding_window": _int(md, f"{arch}.attention.sliding_window", 4096),
        "layer_types": layer_types,
        "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "attention_bias": False, "use_bidirectional_attention": False,
        "rope_theta": global_theta, "rope_local_base_freq": local_theta, "rope_scaling": scaling,
        "rope_parameters": {
            "full_attention": _rope_parameters(global_theta, scaling),
            "sliding_attention": _rope_parameters(local_theta, None),
        },
    })
    if period is not None:
        config["sliding_window_pattern"] = period
    return config


# ----------------------------------------------------------------------------- tensors per family

_ATTN_MLP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
}
_LLAMA_BLOCK = {**_ATTN_MLP, "ffn_norm": "post_attention_layernorm"}
_GEMMA2_BLOCK = {**_ATTN_MLP, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GEMMA3_BLOCK = {**_GEMMA2_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class _Family:
    config: Callable[[GGUFHeader], dict]
    block_names: dict
    permuted_qk: bool = False  # llama.cpp interleaved the rope dims of q/k rows
    norm_offset: float = 0.0  # stored norm = HF norm + offset
    required_biases: tuple = field(default=())


FAMILIES = {
    "llama": _Family(_llama_config, _LLAMA_BLOCK, permuted_qk=True),
    "qwen2": _Family(_qwen2_config, _LLAMA_BLOCK,
                     required_biases=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "gemma2": _Family(_gemma2_config, _GEMMA2_BLOCK, norm_offset=1.0),
    "gemma3": _Family(_gemma3_config, _GEMMA3_BLOCK, norm_offset=1.0),
}


def _family(header: GGUFHeader) -> _Family:
    arch = header.architecture
    if arch not in FAMILIES:
        raise GGUFError(f"{header.path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[arch]


def _unpermute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. Within each head llama.cpp stores row 2*i + j where
    the HF checkpoint has row j * (head_dim / 2) + i (i < head_dim / 2, j in {0, 1})."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise GGUFError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    rest = weight.shape[1:]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def hf_tensor_names(header: GGUFHeader, config: dict) -> dict[str, str]:
    """{gguf name: HF name} for every tensor of the file; unknown or missing tensors raise."""
    family = _family(header)
    names = {}
    for gguf_name in header.tensors:
        stem, _, suffix = gguf_name.rpartition(".")
        match = _BLOCK_TENSOR.fullmatch(gguf_name)
        if match and match.group(2) in family.block_names:
            layer, part, suffix = match.groups()
            names[gguf_name] = f"model.layers.{layer}.{family.block_names[part]}.{suffix}"
        elif stem in _GLOBAL_NAMES and suffix in ("weight", "bias"):
            names[gguf_name] = f"{_GLOBAL_NAMES[stem]}.{suffix}"
        else:
            raise GGUFError(f"{header.path}: tensor {gguf_name!r} has no Hugging Face counterpart "
                             f"in a {header.architecture} model")
    produced = set(names.values())
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    for layer in range(config["num_hidden_layers"]):
        expected.update(f"model.layers.{layer}.{part}.weight" for part in family.block_names.values())
        expected.update(f"model.layers.{layer}.{part}.bias" for part in family.required_biases)
    missing = sorted(expected - produced)
    if missing:
        raise GGUFError(f"{header.path}: tensors missing for {missing[:4]}"
                         f"{' and more' if len(missing) > 4 else ''}")
    return names


def unpermuted_heads(family: _Family, config: dict, gguf_name: str) -> int | None:
    """The head count to un-permute a tensor's rows by (_unpermute_rows), or None when it is not permuted."""
    if family.permuted_qk and ".attn_q." in gguf_name:
        return config["num_attention_heads"]
    if family.permuted_qk and ".attn_k." in gguf_name:
        return config["num_key_value_heads"]
    return None


def _hf_tensor(header, family, config, gguf_name, file_map) -> torch.Tensor:
    weight = torch.from_numpy(_dequantize(header, header.tensors[gguf_name], file_map))
    heads = unpermuted_heads(family, config, gguf_name)
    if heads is not None:
        weight = _unpermute_rows(weight, heads)
    elif family.norm_offset and gguf_name.endswith("norm.weight"):
        weight = weight - family.norm_offset
    return weight


# ----------------------------------------------------------------------------- writing

def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="tensor")


def write_model_files(header: GGUFHeader, out_dir, dtype: torch.dtype = torch.float32,
                      progress: bool = False) -> dict:
    """config.json, generation_config.json and model.safetensors for `header` into `out_dir`
    (no tokenizer, not atomic: `convert_gguf` wraps this). Returns the config written."""
    family = _family(header)
    config = family.config(header)
    names = hf_tensor_names(header, config)
    out_dir = Path(out_dir)
    dtype_name = str(dtype).removeprefix("torch.")
    # architectures/model_type first for readers; "torch_dtype" is the name transformers 4 reads
    config_out = {"architectures": config["architectures"], "model_type": config["model_type"],
                  **config, "dtype": dtype_name, "torch_dtype": dtype_name}
    (out_dir / "config.json").write_text(json.dumps(config_out, indent=2) + "\n")
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if key in config}
    stops = [config[key] for key in ("eos_token_id",) if key in config]
    for key in ("eot", "eom"):  # end-of-turn ids the runtime also stops on
        extra = header.metadata.get(f"tokenizer.ggml.{key}_token_id")
        if extra is not None and int(extra) not in stops:
            stops.append(int(extra))
    if stops:
        generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    # safetensors: 8-byte little-endian header size, JSON header, then the raw tensors back to back.
    # The header needs every size up front; the shapes come from the GGUF directory.
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries, offset = {}, 0
    for gguf_name, hf_name in names.items():
        shape = list(header.tensors[gguf_name].shape)
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        entries[hf_name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": shape,
                            "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(header.path, "rb") as src, open(out_dir / "model.safetensors", "wb") as dst:
        source = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            file_map = np.frombuffer(source, dtype=np.uint8)
            dst.write(struct.pack("<Q", len(blob)) + blob)
            for gguf_name in _progress(list(names), f"converting {header.path.name}", progress):
                tensor = _hf_tensor(header, family, config, gguf_name, file_map).to(dtype)
                dst.write(tensor.contiguous().view(torch.uint8).numpy().data)
                del tensor
            del file_map  # the map cannot close while an array still points into it
        finally:
            source.close()
    return config


def write_tokenizer_files(header: GGUFHeader, out_dir) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template, when the GGUF has one),
    built by transformers' GGUF tokenizer converter."""
    md = header.metadata
    if "tokenizer.ggml.model" not in md:
        raise GGUFError(f"{header.path}: the GGUF carries no tokenizer (no tokenizer.ggml.model)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingPackage("converting the tokenizer of a GGUF file needs transformers: "
                             "pip install transformers") from None
    out_dir = Path(out_dir)
    # Load through a directory holding only the file: transformers would otherwise also pick up
    # tokenizer files that happen to sit beside the GGUF.
    with tempfile.TemporaryDirectory() as lone:
        link = Path(lone) / "model.gguf"
        try:
            link.symlink_to(header.path.resolve())
        except OSError:
            shutil.copyfile(header.path, link)
        tokenizer = AutoTokenizer.from_pretrained(lone, gguf_file=link.name, local_files_only=True)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    for loading_argument in ("is_local", "local_files_only", "name_or_path"):
        tok_config.pop(loading_argument, None)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(tokenizer, name, None) is not None:
            tok_config[name] = str(getattr(tokenizer, name))
    for flag in ("add_bos_token", "add_eos_token"):
        value = getattr(tokenizer, flag, None)
        if isinstance(value, bool):
            tok_config[flag] = value
    # One home for the template: tokenizer_config.json (transformers 5 also writes a .jinja file).
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    if "tokenizer.chat_template" in md:
        tok_config["chat_template"] = md["tokenizer.chat_template"]
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _SAFETENSORS_DTYPES:
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise GGUFError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")


def convert_gguf(gguf_path, out_dir, dtype="float32", progress=True) -> Path:
    """Convert a GGUF file into a Hugging Face model directory at `out_dir` and return its path.

    The directory is built beside `out_dir` under a temporary name and renamed into place when
    complete, so an interrupted conversion never leaves a directory that looks usable. `out_dir`
    must not exist or be empty. `dtype`: "float32", "float16" or "bfloat16".
    """
    torch_dtype = _resolve_dtype(dtype)
    header = read_gguf_header(gguf_path)
    _family(header).config(header)  # fail on an unsupported file before any writing
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PathExists(f"{out_dir} already exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A conversion killed half-way (no `except` runs on SIGKILL) leaves its staging folder: remove
    # those of this target whose process is gone, then stage under a name that says whose it is.
    remove_stale_partials(out_dir.parent, f".{out_dir.name}.partial-")
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{partial_tag()}-", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        write_tokenizer_files(header, staging)  # first: fails fast without transformers
        write_model_files(header, staging, torch_dtype, progress)
        marker = {"converter_version": CONVERTER_VERSION, "source": str(header.path.resolve()),
                  "source_size": header.path.stat().st_size, "architecture": header.architecture,
                  "dtype": str(torch_dtype).removeprefix("torch.")}
        (staging / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory portably
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
