"""The base model: resolve `model.base` to a directory, check its files, load it (quantized or not)
and hash its weights for lineage.

Every base, the built-in demo included, goes through the same `from_pretrained` path.
bitsandbytes is imported only inside the functions that need it.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from orchestrator.data.files import hash_file
from orchestrator.data.tokenize import load_tokenizer
from orchestrator.spec import JobSpec, ModelSpec, Problem, SpecError

__all__ = ["base_sha256", "base_weights_dir", "check_base_files", "inference_device", "inference_device_map", "load_base",
           "load_base_for_inference", "load_base_for_training", "load_tokenizer", "loaded_weight_bytes",
           "quantization_config", "resolve_base", "return_freed_tensors_to_os", "torch_dtype"]  # load_tokenizer: data.tokenize's, the loader's own


def resolve_base(model: ModelSpec, progress=None) -> str:
    """A local directory (built-in models are built and cached on first use) or a hub id.

    `progress(done, total)` is called while a built-in model is being pre-trained."""
    if model.base.startswith("builtin:"):
        from orchestrator.models.builtin import resolve_builtin

        return str(resolve_builtin(model.base, progress=progress))
    return model.base


# A hub repository id: `name` or `owner/name` (huggingface_hub's validate_repo_id: letters,
# digits, - _ . ; at most 96 characters each; no leading or trailing - or .).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/)?[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?$")


def check_base_files(path: str, revision: str | None = None) -> None:
    """Raise `SpecError` when the base cannot be had: a local directory that lacks weights or a
    tokenizer (a config.json alone is enough to plan memory, not to train), a path that is not a
    directory, a name that is not a hub id, or a hub id neither in the local cache nor on a
    reachable hub."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        _check_hub_id(path, revision)
        return
    missing = []
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("weight files (*.safetensors or *.bin)")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        missing.append("tokenizer files (tokenizer.json, tokenizer.model or tokenizer_config.json)")
    if missing:
        raise SpecError([Problem(path="model.base", message=f"the model directory {folder} has no "
                                                            f"{' and no '.join(missing)}",
                                 fix="copy the whole saved model (save_pretrained writes the weights and "
                                     "tokenizer files), or point at a complete one")])


def _check_hub_id(base: str, revision: str | None) -> None:
    from orchestrator.planning.architectures import hub_config

    looks_local = base.startswith((".", "/", "~")) or base.count("/") > 1 or Path(base).exists()
    if looks_local or not _HUB_ID.match(base) or "--" in base or ".." in base:
        raise SpecError([Problem(path="model.base",
                                 message=f"'{base}' is neither a model directory nor a hub id",
                                 fix="point at a directory that save_pretrained wrote (config.json, weights, "
                                     "tokenizer), or name a hub repository as owner/name")])
    try:
        hub_config(base, revision)
    except Exception as e:  # offline, unknown repo, gated repo: the same to the user
        reason = "HF_HUB_OFFLINE is set" if "HF_HUB_OFFLINE" in str(e) else (str(e).splitlines() or [""])[0][:120]
        raise SpecError([Problem(path="model.base",
                                 message=f"the hub id '{base}' is not in the local hub cache and the hub cannot be "
                                         f"reached or does not have it ({reason or type(e).__name__})",
                                 fix="download it where the hub is reachable (huggingface-cli download "
                                     f"{base}) or point model.base at a local model directory")]) from None


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def quantization_config(spec: JobSpec):
    """The `BitsAndBytesConfig` for the spec, or None for an unquantized base."""
    q = spec.quantization
    if q.bits is None:
        return None
    from transformers import BitsAndBytesConfig

    dtype = torch_dtype(spec.model.dtype)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    # ZeRO-3 partitions every parameter it is given, and can only shard the packed 4-bit
    # weights if they are stored in the model's float dtype rather than uint8.
    storage = dtype if spec.distributed.deepspeed.stage == 3 else None
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype, **({"bnb_4bit_quant_storage": storage} if storage else {}))


def attn_implementation(spec: JobSpec, device: str) -> str | None:
    """The attention kernel to load with, as transformers' `attn_implementation` argument.

    `auto` is None: transformers picks sdpa where the architecture supports it and eager where it
    does not (Gemma-2's soft-capping has no sdpa path). A model loaded on the CPU (generate,
    evaluate, merge on a machine without a GPU) with flash_attention_2 asked uses transformers'
    choice too, flash-attention's equal in results. flash_attention_2 without the flash-attn
    package is refused with the fix."""
    wanted = spec.model.attn_implementation
    if wanted == "auto" or (wanted == "flash_attention_2" and not str(device).startswith("cuda")):
        return None
    if wanted != "flash_attention_2":
        return wanted
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise SpecError([Problem(path="model.attn_implementation", message="flash_attention_2 needs the flash-attn "
                                 "package, which is not installed on this node",
                                 fix="pip install flash-attn on the GPU nodes (or their image), or set "
                                 "model.attn_implementation=auto")])
    return wanted


@contextmanager
def _kernel_refusal(spec: JobSpec):
    """transformers' refusal of an attention kernel the architecture lacks, as a SpecError that
    names the field (e.g. `sdpa` asked of Gemma-2)."""
    try:
        yield
    except ValueError as err:
        if "attention implementation" not in str(err):
            raise
        raise SpecError([Problem(path="model.attn_implementation",
                                 message=f"{spec.model.attn_implementation} is not supported by this architecture "
                                 f"({str(err).split('.')[0]})",
                                 fix="set model.attn_implementation=auto (sdpa where supported, else eager)")]) from err


def load_base(spec: JobSpec, path: str, device: str | dict = "cpu", quantize: bool = True):
    """The base causal LM, in the spec's dtype and (when asked) quantized as the spec says, on
    `device`: a device ("cpu", "cuda:0") or a transformers device map (`inference_device_map`)."""
    from transformers import AutoModelForCausalLM

    from transformers.integrations import is_deepspeed_zero3_enabled

    qconfig = quantization_config(spec) if quantize else None
    kwargs = {"quantization_config": qconfig} if qconfig else {}
    device_map = device if isinstance(device, dict) or device == "auto" else {"": device}
    on_cpu = isinstance(device_map, dict) and all(str(d) == "cpu" for d in device_map.values())
    # The weights go straight to `device` (no whole copy in host memory first on a GPU worker);
    # a 4-bit model must be placed by the device map at load, bitsandbytes refuses a later `.to()`.
    # Under a registered ZeRO-3 config transformers refuses a device map and places them itself:
    # partitioned, or (quantized) on the process's current device (bitsandbytes' quantizer).
    zero3 = is_deepspeed_zero3_enabled()
    with _kernel_refusal(spec):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(spec.model.dtype), revision=spec.model.revision,
            attn_implementation=attn_implementation(spec, "cpu" if on_cpu else "cuda"),
            trust_remote_code=spec.model.trust_remote_code, **({} if zero3 else {"device_map": device_map}), **kwargs)
    if qconfig and qconfig.load_in_4bit and on_cpu:
        _keep_4bit_trainable_on_cpu(model)
    elif qconfig and on_cpu:
        _keep_8bit_dtype_on_cpu(model)
    return model


# The share of a GPU's memory a model's weights may take when inference places it there: the rest
# holds the KV cache and activations of a batch of prompts (8 x 2,048 tokens of a 7B Llama in
# bf16: 8 GiB of cache) and the CUDA context (~0.5 GiB).
INFERENCE_WEIGHTS_SHARE = 0.8


def inference_device_map(cuda_devices: int, model_bytes: int | None = None, gpu_bytes: int | None = None) -> dict | str:
    """Where generate, evaluate, serve, the pyfunc and merge load a model, as transformers'
    `device_map`: without a GPU, the CPU; the whole model on GPU 0 when its weights fit one GPU
    (or their size or the GPU's is unknown); spread over every GPU ("auto") when they fit only all
    of them together; the CPU when they fit none: never accelerate's partial offload to the CPU,
    which a 4-bit model cannot take and a merge cannot write through."""
    if cuda_devices < 1:
        return {"": "cpu"}
    if model_bytes is None or gpu_bytes is None or model_bytes <= INFERENCE_WEIGHTS_SHARE * gpu_bytes:
        return {"": 0}
    if cuda_devices > 1 and model_bytes <= INFERENCE_WEIGHTS_SHARE * gpu_bytes * cuda_devices:
        return "auto"
    return {"": "cpu"}


def loaded_weight_bytes(spec: JobSpec, path: str, quantize: bool = True) -> int | None:
    """The bytes the weights at `path` take once loaded: their parameter count (read from the
    safetensors headers) x 2 or 4 bytes (model.dtype), or x 0.5 / 1 quantized to 4 / 8 bits (a
    little low: the embeddings and head stay in model.dtype). None without safetensors files."""
    import math

    files = _safetensors_files(spec.model, path)
    if not files:
        return None
    params = sum(math.prod(shape) for _, _, shape, _, _ in _safetensors_index(files).values())
    bits = spec.quantization.bits if quantize else None
    per_param = {4: 0.5, 8: 1}.get(bits, 4 if spec.model.dtype == "float32" else 2)
    return int(params * per_param)


def inference_device(spec: JobSpec, path: str, quantize: bool = True) -> dict | str:
    """`inference_device_map` for this machine's CUDA GPUs and the model at `path`."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return inference_device_map(0)
    return inference_device_map(count, loaded_weight_bytes(spec, path, quantize),
                                torch.cuda.get_device_properties(0).total_memory)


def load_base_for_inference(spec: JobSpec, path: str, quantize: bool = True):
    """`load_base` where this machine runs inference (`inference_device`): a CUDA GPU when there is
    one, else the CPU."""
    return load_base(spec, path, inference_device(spec, path, quantize), quantize=quantize)


# transformers finds the DeepSpeed config through a weak reference (integrations.deepspeed): the
# HfDeepSpeedConfig object must stay alive as long as the partitioned model is used, so the worker
# keeps it here for its whole life.
_ZERO3_CONFIG = None


def use_deepspeed_config(deepspeed_config: dict | None):
    """Tell transformers (and PEFT) which DeepSpeed config this process trains under: under ZeRO-3
    they then build models partitioned (`zero.Init`) and gather weights before touching them;
    under stages 0-2, or with None, any earlier ZeRO-3 config is forgotten."""
    global _ZERO3_CONFIG
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if deepspeed_config and deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        _ZERO3_CONFIG = HfDeepSpeedConfig(deepspeed_config)  # registers itself (a weak reference)
    else:
        _ZERO3_CONFIG = None
        unset_hf_deepspeed_config()
    return _ZERO3_CONFIG


# glibc's mallopt parameter and the size it starts from (its default): allocations this large or larger
# get pages of their own, which go back to the system when freed.
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES = -3, 128 * 1024


def return_freed_tensors_to_os() -> bool:
    """Make every freed tensor's memory go back to the system at once, for the rest of the process.

    ZeRO-3 keeps a shard of each weight and frees the whole tensors it passes through (zero.Init
    builds each module whole, then partitions it; forward and backward gather each layer, then free
    it). glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB), so after
    the first weight those tensors come from the heap, where the shards kept between them leave
    freed blocks the process cannot give back: measured on 2 CPU ranks loading a 308 MB bf16 model,
    418-483 MiB of freed heap per rank beside a 151 MiB shard. Fixing the threshold at glibc's
    starting value keeps large tensors out of the heap. False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator is left as it is
        return False


def load_base_for_training(spec: JobSpec, path: str, device: str, deepspeed_config: dict):
    """The base as a training worker needs it, never whole on one worker under ZeRO-3.

    Stages 0-2: the weights load straight onto `device`. ZeRO-3, unquantized: the model is built
    already partitioned (`zero.Init`, through transformers' HfDeepSpeedConfig) and each rank reads
    its own slice of each weight from the safetensors files straight into its partition, so no
    rank holds more than its shard (and, while zero.Init builds it, one module whole); freed
    tensors go back to the system (`return_freed_tensors_to_os`). ZeRO-3 with a 4-bit base follows
    transformers and PEFT: each worker loads the quantized base (stored in the model dtype,
    `bnb_4bit_quant_storage`) and DeepSpeed partitions it when the engine is built; transformers
    never builds a quantized model under `zero.Init`."""
    use_deepspeed_config(deepspeed_config)
    if spec.distributed.deepspeed.stage == 3:
        return_freed_tensors_to_os()
    if spec.distributed.deepspeed.stage != 3 or quantization_config(spec) is not None:
        return load_base(spec, path, device=device)
    files = _safetensors_files(spec.model, path)
    if not files:  # .bin weights: transformers' own ZeRO-3 load (rank 0 reads the state dict whole)
        return load_base(spec, path, device=device)
    return _load_zero3_streamed(spec, path, files)


def _safetensors_files(model: ModelSpec, path: str) -> list[Path]:
    folder = base_weights_dir(model, path)
    return sorted(folder.glob("*.safetensors")) if folder else []


# safetensors' dtype names (the file header) -> torch dtype names.
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _safetensors_index(files: list[Path]) -> dict[str, tuple[Path, str, list[int], int, int]]:
    """name -> (file, dtype, shape, start, end) for every tensor in the files (headers only)."""
    import json
    import struct

    index = {}
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                index[name] = (f, info["dtype"], info["shape"], 8 + n + start, 8 + n + end)
    return index


def _read_tensor(entry):
    """One tensor read with plain file reads, not a memory map: a mapped file's pages would stay in
    this process's memory until the whole file is closed."""
    import torch

    f, dtype, shape, start, end = entry
    with open(f, "rb") as fh:
        fh.seek(start)
        data = bytearray(fh.read(end - start))
    return torch.frombuffer(data, dtype=getattr(torch, _SAFETENSORS_DTYPES[dtype])).reshape(shape) if data \
        else torch.empty(shape, dtype=getattr(torch, _SAFETENSORS_DTYPES[dtype]))


def _read_own_shard(param, entry, rank: int, world: int) -> bool:
    """Read this rank's slice of a partitioned parameter straight from the file into its ZeRO-3
    partition (`param.ds_tensor`): no rank ever holds the whole tensor, not even for a moment.
    False (nothing read) where the parameter is not laid out as DeepSpeed partitions across the
    whole world: a flat split in rank order, padded at the end (zero.Init's `_partition_param`);
    the caller then gathers it instead."""
    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    shard = getattr(param, "ds_tensor", None)
    if (shard is None or param.ds_status is not ZeroParamStatus.NOT_AVAILABLE or shard.numel() == 0
            or shard.ds_numel * world != getattr(param, "ds_numel_aligned", -1)):
        return False
    f, dtype, _, start, _ = entry
    file_dtype = getattr(torch, _SAFETENSORS_DTYPES[dtype])
    first = min(rank * shard.ds_numel, param.ds_numel)
    count = min(shard.ds_numel, param.ds_numel - first)  # the last rank's slice ends in padding
    if count == 0:
        return True
    direct = file_dtype == shard.dtype and shard.device.type == "cpu"
    target = shard.narrow(0, 0, count) if direct else torch.empty(count, dtype=file_dtype)
    size = file_dtype.itemsize
    with open(f, "rb") as fh:
        fh.seek(start + first * size)
        read = fh.readinto(target.view(torch.uint8).numpy())
    if read != count * size:
        raise ValueError(f"{f}: the weight file ends inside a tensor ({read} of {count * size} bytes read)")
    if not direct:
        shard.narrow(0, 0, count).copy_(target)
    return True


def _load_zero3_streamed(spec: JobSpec, path: str, files: list[Path]):
    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, revision=spec.model.revision,
                                        trust_remote_code=spec.model.trust_remote_code)
    # Under the registered ZeRO-3 config, from_config builds the model inside zero.Init: each
    # parameter is partitioned as soon as its module is built.
    with _kernel_refusal(spec):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(spec.model.dtype),
                                                 attn_implementation=attn_implementation(spec, "cuda" if
                                                                                         torch.cuda.is_available() else "cpu"),
                                                 trust_remote_code=spec.model.trust_remote_code)
    index = _safetensors_index(files)
    prefix = getattr(model, "base_model_prefix", "")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def entry_for(name: str):
        # Some checkpoints name the body without the model's prefix ("layers.0..." for "model.layers.0...").
        short = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None
        return index.get(name) or (index.get(short) if short else None)

    missing = [n for n, _ in model.named_parameters() if entry_for(n) is None]
    if missing:
        raise ValueError(f"{path}: the weight files have no tensor for {missing[:3]} (of {len(missing)}); "
                         f"they are not a save_pretrained checkpoint of {type(model).__name__}")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with torch.no_grad():
        for name, param in model.named_parameters():  # the same order on every rank: a gather is collective
            if not _read_own_shard(param, entry_for(name), rank, world):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank == 0:
                        param.data.copy_(_read_tensor(entry_for(name)).to(param.dtype))
        for name, buffer in model.named_buffers():  # buffers are never partitioned: every rank reads its own
            entry = entry_for(name)
            if entry is not None:
                buffer.copy_(_read_tensor(entry).to(buffer.dtype))
    model.eval()  # as from_pretrained returns it
    return model


def _keep_8bit_dtype_on_cpu(model) -> None:
    """bitsandbytes' (0.50) 8-bit matmul on the CPU returns float32 whatever its input, so the
    hidden states reach the bf16/fp16 lm_head as float32, which it refuses; cast them to the
    head's dtype on the way in (a differentiable cast). The layers in between take either."""
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))


def _keep_4bit_trainable_on_cpu(model) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for an inference-only CPU kernel the
    first time it runs in eval mode on an avx512-bf16 CPU, after which no gradient reaches the
    layer's input, so LoRA below it stops learning. Our base evaluation runs before training;
    switching that kernel off keeps every layer trainable (the repacking saves no memory)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def base_weights_dir(model: ModelSpec, base_path: str) -> Path | None:
    """The local directory holding the base's weight files: the path itself, or the hub cache's
    snapshot of a hub id (None when it is not in the cache)."""
    if Path(base_path).is_dir():
        return Path(base_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_path, revision=model.revision, local_files_only=True,
                                      allow_patterns=["*.safetensors", "*.bin"]))
    except Exception:  # not cached (or not a hub id): nothing to hash
        return None


def base_sha256(model: ModelSpec, base_path: str) -> str | None:
    """sha256 over the base's weight files (name and bytes, in name order), so an adapter can tell
    at load time that the base it is put on is not the one it was trained on.

    Reads every weight file once (~1-2 GB/s: seconds for a 7B model); None when none is found."""
    import hashlib

    folder = base_weights_dir(model, base_path)
    files = (sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))) if folder else []
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        hash_file(digest, f)
    return digest.hexdigest()
