"""What this machine can hold and compute: the memory free now, the memory a load or an export needs, and
whether the CPU computes bfloat16 natively. A load or export that cannot fit is refused up front with both
figures (`check_fits`), instead of being killed by the kernel's OOM killer half-way, which loses the work and,
for a load, the model that was loaded before.

Figures are estimates from the files' headers (no weight is read): a transformers load holds its parameters in
the chosen dtype plus a margin for activations and the tokenizer; pages of a memory-mapped checkpoint are not
counted (the kernel drops them under pressure, so they never cause an OOM kill).
"""
from __future__ import annotations

import ctypes
import json
import mmap
import shutil
from pathlib import Path

import psutil

from webui.errors import Unsupported

GB = 1e9
MARGIN = 1.10          # activations, caches and allocator slack over the weights themselves
PROCESS_FLOOR = 600e6  # torch, transformers and the app's own interpreter, whatever the model


def available() -> int:
    """Bytes the kernel can hand out now without swapping (MemAvailable)."""
    return int(psutil.virtual_memory().available)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), as torch detects them."""
    import torch  # heavy: only loads and training ask

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # an older torch, or a CPU it cannot query: plain fp32
        return False


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def check_fits(what: str, need: int, disk_dir: Path | None = None, disk_need: int = 0, note: str = "",
               free: int | None = None) -> None:
    """Raise Unsupported when `need` bytes of memory (or `disk_need` bytes in `disk_dir`) are not free."""
    free = available() if free is None else free
    if need > free:
        note = f" {note}" if note else ""
        raise Unsupported(f"{what} needs about {gb(need)} of memory and {gb(free)} is free{note}; "
                          "close other programs, or pick a smaller model or a quantized format")
    if disk_dir is not None and disk_need:
        folder = Path(disk_dir)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        room = shutil.disk_usage(folder).free
        if disk_need > room:
            raise Unsupported(f"{what} writes about {gb(disk_need)} and {folder} has {gb(room)} free on its disk")


def _safetensors_header(file: Path) -> dict:
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))


def tensor_sizes(folder: Path) -> dict[str, tuple[str, int]]:
    """{name: (safetensors dtype, element count)} of a folder's safetensors weights, from their headers."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            header = _safetensors_header(file)
        except (OSError, ValueError):
            continue  # preflight names a broken file; an estimate skips it
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for n in info.get("shape", ()):
                    count *= int(n)
                out[name] = (info.get("dtype", "F32"), count)
    return out


def weights_size(path: Path) -> int:
    """Bytes of a model's weights on disk (a folder's weight files, or one GGUF)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.gguf") for f in path.glob(pattern))


def parameters(path: Path) -> int:
    """Parameter count of a transformers folder (from the safetensors headers; a .bin folder: its size / 2)."""
    sizes = tensor_sizes(path) if Path(path).is_dir() else {}
    return sum(n for _, n in sizes.values()) if sizes else weights_size(path) // 2


def source_dtype(path: Path) -> str:
    """The dtype a transformers folder was saved in ('bfloat16', 'float16', 'float32'; '' when unknown)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    found = cfg.get("dtype") or cfg.get("torch_dtype") or ""
    return found if isinstance(found, str) else ""


def load_need(path: Path, bytes_per_parameter: int) -> int:
    """Memory a transformers load of `path` holds, at `bytes_per_parameter` for its weights."""
    return int(parameters(path) * bytes_per_parameter * MARGIN + PROCESS_FLOOR)


def load_need_file(path: Path) -> int:
    """Memory a memory-mapped load of one file (a GGUF on llama.cpp) keeps resident while it runs."""
    return int(weights_size(path) * MARGIN + PROCESS_FLOOR)


def loaded_merge_need(path: Path) -> int:
    """Memory of a merge on a loaded float32 copy (PEFT's merge_and_unload, then a cast to the base's dtype
    to save it): the float32 copy plus the saved copy."""
    return int(parameters(path) * (4 + 2) * MARGIN + PROCESS_FLOOR)


def file_mappings(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """(start, end) of this process's memory-mapped files whose name ends in `suffix` (Linux; [] elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(suffix):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def drop_file_pages(tensor, mappings: list[tuple[int, int]]) -> None:
    """Drop the pages under `tensor` from this process's resident memory when they belong to a memory-mapped
    checkpoint (`mappings`, from file_mappings): a weight converted out of the checkpoint no longer needs them,
    and until the whole file is unmapped they would count beside its converted copy. Pages of a file mapping that
    was never written are dropped, not lost (a later read brings them back from the file); anonymous memory is
    never touched."""
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    if not any(lo <= start and start + size <= hi for lo, hi in mappings):
        return
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, (start + size) // page * page  # whole pages inside the tensor only
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4: MADV_DONTNEED
