"""Native CPU kernels, compiled from C on first use and cached (no build step at install time).

`screen_topk` runs the fused AMX screen of `screen_amx.c` (gather + bf16 tile products + running
selection in one pass, or the same from the table's int8 copy with AMX-INT8 products where
`int8_available()`; design and measurements in docs/gsu.md). `available()` is False when it
cannot run here: no C compiler, a CPU without AMX-BF16, a kernel that refuses the AMX state, or
MUSE_NATIVE_KERNELS=0 in the environment; `unavailable_reason()` says which. Callers then use the
portable torch path, which gives the same results, slower.

The shared library is built with the compiler named by $CC (default `cc`) into
$MUSE_KERNEL_CACHE (default ~/.cache/muse-recsys/kernels), under a name that hashes the source
and the flags, written to a temporary name and renamed so concurrent first uses do not collide.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path

from typing import TYPE_CHECKING

import torch

from kernels.scratch import scratch

if TYPE_CHECKING:  # int8_screen calls into this module
    from kernels.int8_screen import Int8Candidates

__all__ = ["available", "id_range", "int8_available", "pair_cosines", "pair_cosines_accepts", "quantize_int8_candidates",
           "rescore_topk", "screen_rescore_topk", "screen_topk", "unavailable_reason", "unit_candidates"]

_SOURCES = [Path(__file__).with_name(name) for name in ("screen_amx.c", "int8_candidates.c", "unit_candidates.c", "id_range.c",
                                                                "pair_cosines.c")]
_HEADERS = [Path(__file__).with_name("table_rows.h")]
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mf16c", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8", "-fPIC", "-shared", "-fopenmp"]
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
_log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("MUSE_KERNEL_CACHE") or Path.home() / ".cache" / "muse-recsys" / "kernels")


def available() -> bool:
    """True when `screen_topk` can run in this process (compiled, AMX-BF16 CPU and OS)."""
    return _screen_fn() is not None


def int8_available() -> bool:
    """True when `screen_topk` can also run the int8 screen here (AMX-INT8 as well)."""
    return available() and bool(_STATE["int8"])


def _screen_fn():
    """The ctypes function `muse_screen_topk_amx`, or None (see `unavailable_reason`). Loaded
    once under the lock; read without it after that (a call asks about a dozen times)."""
    if "screen" in _STATE:
        return _STATE["screen"]
    with _LOCK:
        if "screen" not in _STATE:
            fn, _STATE["reason"] = _load()
            _STATE["screen"] = fn  # last: its presence says the load is complete
            if fn is None:
                _log.info("native AMX screen not used: %s; using the portable torch path", _STATE["reason"])
        return _STATE["screen"]


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    _screen_fn()
    return _STATE["reason"]  # type: ignore[return-value]


# CPU features the library is compiled for: checked before it is even loaded, since the compiler
# may use AVX-512 anywhere in it.
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "f16c", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpu_flags() -> set[str]:
    """The `flags` of /proc/cpuinfo (empty where there is none: not Linux, not x86)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _load():
    if os.environ.get("MUSE_NATIVE_KERNELS", "1") == "0":
        return None, "disabled by MUSE_NATIVE_KERNELS=0"
    missing = [flag for flag in _REQUIRED_CPU_FLAGS if flag not in _cpu_flags()]
    if missing:
        return None, f"this CPU does not offer {', '.join(missing)}"
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"could not build {', '.join(source.name for source in _SOURCES)}: {error}"
    if not library.muse_amx_available():
        return None, "the OS does not grant this process the AMX state"
    _STATE["int8"] = bool(library.muse_amx_int8_available()) and "amx_int8" in _cpu_flags()
    fn = library.muse_screen_topk_amx
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_double,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_double, ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p]
    rescore = library.muse_rescore_topk
    rescore.restype = ctypes.c_int64
    rescore.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                        ctypes.c_int64, ctypes.c_double, ctypes.c_double, ctypes.c_void_p, ctypes.c_int64,
                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    _STATE["rescore"] = rescore
    both = library.muse_screen_rescore
    both.restype = ctypes.c_int64
    both.argtypes = fn.argtypes + rescore.argtypes
    _STATE["screen_rescore"] = both
    quantize = library.muse_quantize_candidates
    quantize.restype = None
    quantize.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p]
    _STATE["quantize"] = quantize
    unit = library.muse_unit_candidates
    unit.restype = ctypes.c_float
    unit.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                     ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    _STATE["unit"] = unit
    bf16 = library.muse_bf16_candidates
    bf16.restype = None
    bf16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_void_p]
    _STATE["bf16"] = bf16
    id_range = library.muse_id_range
    id_range.restype = None
    id_range.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    _STATE["id_range"] = id_range
    cosines = library.muse_pair_cosines
    cosines.restype = ctypes.c_int
    cosines.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    _STATE["cosines"] = cosines
    return fn, None


def _build() -> Path:
    compiler = os.environ.get("CC", "cc")
    source = b"".join(path.read_bytes() for path in [*_SOURCES, *_HEADERS])
    digest = hashlib.sha256(source + " ".join([compiler, *_FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"screen_amx-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _log.info("compiling the native AMX screen (once, a second) into %s", target.parent)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run([compiler, *_FLAGS, "-o", tmp, *map(str, _SOURCES)], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"{compiler} exited {result.returncode}: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# Rows per piece when a user's history is split so that every thread has work: below this, the
# warm-up of a piece's running thresholds costs more than the parallelism gains.
MIN_SPLIT_ROWS = 16_384

# Below these, a sampled start reads more extra rows (one in sample_every) than it saves: its gain
# grows with the candidates (their hits), its cost with the rows (measured: no gain at C <= 32,
# 4-10% at C = 100 to 1,000).
MIN_SAMPLE_EVERY = 16
MIN_SAMPLED_CANDIDATES = 64
# The most likely a candidate's sample is to fail its proof (a second screen then settles it).
SAMPLE_FAILURE = 1e-5
SAMPLE_VALUES = 64  # sampled bests kept per candidate (screen_amx.c)


# A history whose screen rows take at most this many bytes is sampled densely (`sampled_start`):
# its sampled rows are read again from the cache by the screen that follows ...
DENSE_SAMPLE_MAX_BYTES = 4 << 20
DENSE_SAMPLE_PER_K = 5  # ... one row in k / this
DENSE_SAMPLE_MIN_ROWS = 48  # ... where that samples at least this many rows


def sampled_start(k: int, n_cands: int, length: int, row_bytes: int) -> int:
    """`sample_every` for a first screen for the top-k of n_cands candidates over histories of
    `length` rows of `row_bytes` each in the copy screened: one row in k, so the sample holds
    about one of a candidate's k best behaviours and its value, ranked `sample_rank` (8), lies
    near the user's 8k-th best. Histories of at most DENSE_SAMPLE_MAX_BYTES, whose sampled rows
    cost little to read twice, are sampled at one row in k / 5 (ranked 17th: near the 85th best
    at k = 50, a start twice as high) where that gives DENSE_SAMPLE_MIN_ROWS rows: with 1,000
    candidates, 100 users of 1,000 rows 3-9% faster, 10 of 10,000 rows ~10%, k = 16 and 100 3-7%
    (50 rows sampled at k = 100); 300 rows 3% slower (30 sampled), 20,000 rows no faster, and at L = 100K, C = 100 one row in 10
    saved fewer hits (79K -> 52K) than its rows, read from memory, cost. 0 (thresholds from
    -inf) for small k or few candidates, where the sample would cost more than it saves."""
    if k < MIN_SAMPLE_EVERY or n_cands < MIN_SAMPLED_CANDIDATES:
        return 0
    dense = k // DENSE_SAMPLE_PER_K
    if length * row_bytes <= DENSE_SAMPLE_MAX_BYTES and length >= DENSE_SAMPLE_MIN_ROWS * dense:
        return dense
    return k


@functools.lru_cache(maxsize=256)
def sample_rank(k: int, sample_every: int) -> int:
    """The rank, among the sampled scores of one row in `sample_every`, a screen's thresholds
    start from (a window below): the smallest r for which more than r - 1 of a candidate's k - 1
    best behaviours are sampled with probability at most SAMPLE_FAILURE (binomial, the sampled
    positions taken as random). Only then can fewer than k behaviours reach the value and the
    proof fail; whatever the scores, at least r sampled behaviours do.
    Raises ValueError where r would exceed the sampled bests kept (too dense a sample for k)."""
    p, n = 1.0 / sample_every, k - 1
    tail = 1.0  # P(X >= r), X ~ Binomial(n, p)
    for r in range(1, SAMPLE_VALUES):
        tail -= math.comb(n, r - 1) * p ** (r - 1) * (1 - p) ** (n - r + 1)
        if tail <= SAMPLE_FAILURE:
            return r
    raise ValueError(f"screen_topk: a sample of one row in {sample_every} for k = {k} needs a rank past the "
                     f"{SAMPLE_VALUES - 1} sampled bests kept; sample fewer rows")


def screen_topk(
    screen: torch.Tensor,
    unit_cands: torch.Tensor,
    history: torch.Tensor,
    lengths: torch.Tensor,
    keep: int,
    k: int,
    window: float,
    sample_every: int = 0,
    threads: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    int8_cands: Int8Candidates | None = None,
    windows: torch.Tensor | None = None,
    window_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Survivors per (user, candidate) by bf16 (or int8) cosine, in one fused pass: at most the
    best `keep`, and none more than `window` below the k-th best.

    Args:
        screen: bfloat16 [N+1, D] unit rows of the table (zero rows for ineligible items), or the
            int8 codes [N+1, D'] of `kernels.int8_screen` (then `int8_cands` is required and
            `int8_available()` must be True).
        unit_cands: float32 [B, C, D] unit candidate vectors.
        history: [B, L] item ids (0 = padding); lengths: [B].
        keep: survivors per (user, candidate), at most.
        k: the top-k the survivors are for; window: a behaviour screened more than this below a
            candidate's k-th best screened score is dropped (`inf`: never). With window at least
            twice the screen's error, such a behaviour cannot be in the exact top-k.
        sample_every: > 0: thresholds start from a sample of every this-many-th row of the user
            (all its pieces' samples together), a window below its `sample_rank`-th best; the
            caller's proof fails, rarely, where fewer than k of a user's behaviours reach that
            value, and a second screen without a sample settles those. 0: thresholds start at
            -inf. Ignored with an infinite window.
        threads: worker threads (default torch.get_num_threads()). When users are fewer than
            threads, a user's history is split into pieces of at least MIN_SPLIT_ROWS rows, and
            where that leaves threads idle (shorter histories) its candidates into ranges of 32
            (each range gathers the rows again, which a short history makes cheap).
        out: contiguous tensors of the returned shapes and dtypes to write into (a caller's
            reused buffers: at B = 100, C = 1,000 the outputs are 180 MB, and fresh ones fault in
            page by page), else new ones.
        int8_cands: the candidates quantised for an int8 screen (`quantize_candidates`).
        windows: float32 [B, C] times `window_factor`: each candidate's own window in place of
            `window` (which must then be finite): twice its own screen error, narrower than the
            call's largest (the factor lets a caller pass the errors themselves: a torch multiply
            cost ~25 us of a call at L = 100K, C = 100, its caches cold after the screen).

    Returns:
        scores float32 [B, C, keep] (bf16-product cosines accumulated in float32, or int8 sums
        times the candidate's scale; unordered,
        -inf in unused slots), positions int64 [B, C, keep] (-1 in unused slots),
        bound float32 [B, C]: every eligible behaviour not returned scored at most this
        (-inf when none was left out), n_valid int64 [B]: eligible behaviours per user.
    Raises RuntimeError when `available()` is False.
    """
    fn = _screen_fn()
    if fn is None:
        raise RuntimeError(f"native screen unavailable: {unavailable_reason()}")
    args, outputs = _screen_args(screen, unit_cands, history, lengths, keep, k, window, sample_every, threads, out,
                                 int8_cands, windows, window_factor)
    if fn(*args) != 0:
        raise MemoryError(f"screen_topk: could not allocate buffers for {history.shape[0]} users x "
                          f"{unit_cands.shape[1]} candidates x {keep} kept")
    return outputs


def _screen_args(screen, unit_cands, history, lengths, keep, k, window, sample_every, threads, out, int8_cands, windows,
                 window_factor, counts=None, checked=True):
    """(the arguments of muse_screen_topk_amx, its outputs): `screen_topk`'s checks and conversions
    (checked=False: only the history's and lengths' conversions, see `screen_rescore_topk`)."""
    n_users, block_len = history.shape
    n_cands, dim = unit_cands.shape[1], unit_cands.shape[2]
    int8 = screen.dtype == torch.int8
    if int8:
        if checked:
            _check_int8_screen(screen, int8_cands, n_users, n_cands, dim)
        cands, cand_pad, lo = int8_cands.codes, int8_cands.codes.shape[1], int8_cands.lo
        pairs = screen.shape[1] // 2  # the kernel reads int8 rows as 16-bit pairs
    elif screen.dtype != torch.bfloat16 or not screen.is_contiguous() or screen.shape[1] != dim:
        raise ValueError(f"screen_topk: `screen` must be contiguous bfloat16 [N+1, {dim}], got {screen.dtype} {tuple(screen.shape)}")
    else:
        cands, cand_pad = _padded_candidates(unit_cands)
        pairs = dim
    history = _rows_contiguous(history)
    lengths = _dense(lengths, torch.int64)
    shapes = ((n_users, n_cands, keep), (n_users, n_cands, keep), (n_users, n_cands), (n_users,))
    dtypes = (torch.float32, torch.int64, torch.float32, torch.int64)
    if out is None:
        out = tuple(torch.empty(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes))
    elif checked and any(t.shape != shape or t.dtype != dtype or not t.is_contiguous() for t, shape, dtype in zip(out, shapes, dtypes)):
        raise ValueError(f"screen_topk: `out` must be contiguous tensors of shapes {shapes} and dtypes {dtypes}")
    scores, positions, bound, n_valid = out
    if windows is not None and checked:
        windows = _dense(windows, torch.float32)
        if windows.shape != (n_users, n_cands) or not math.isfinite(window):
            raise ValueError(f"screen_topk: `windows` must be [{n_users}, {n_cands}], with a finite `window`")
    threads = threads or torch.get_num_threads()
    splits = max(1, min(math.ceil(threads / n_users), block_len // MIN_SPLIT_ROWS))
    cand_splits = max(1, math.ceil(threads / (n_users * splits)))
    args = (
        screen.data_ptr(), screen.shape[0], pairs, history.data_ptr(), history.stride(0), lengths.data_ptr(),
        n_users, block_len, cands.data_ptr(), n_cands, cand_pad, keep, k, window, sample_every,
        sample_rank(k, sample_every) if sample_every > 0 else 1, splits, cand_splits,
        threads,
        scores.data_ptr(), positions.data_ptr(), bound.data_ptr(), n_valid.data_ptr(),
        int(int8), int8_cands.scale.data_ptr() if int8 else None,
        lo.data_ptr() if int8 and lo is not None else None,
        int8_cands.mark_slack if int8 else 0.0, windows.data_ptr() if windows is not None else None, window_factor,
        counts.data_ptr() if counts is not None else None,
    )
    return args, (scores, positions, bound, n_valid)


def _check_int8_screen(screen, int8_cands, n_users, n_cands, dim):
    """Raises ValueError unless `screen` and `int8_cands` fit an int8 screen of these candidates."""
    if int8_cands is None or not _STATE.get("int8"):
        raise ValueError("screen_topk: an int8 screen needs `int8_cands` and an AMX-INT8 CPU (int8_available())")
    if not screen.is_contiguous() or screen.shape[1] != dim + dim % 2:
        raise ValueError(f"screen_topk: int8 `screen` must be contiguous [N+1, {dim + dim % 2}], got {tuple(screen.shape)}")
    shape = (n_users, -(-n_cands // 16) * 16, -(-dim // 64) * 64)
    cands, lo = int8_cands.codes, int8_cands.lo
    if cands.shape != shape or not cands.is_contiguous() or (lo is not None and (lo.shape != shape or not lo.is_contiguous())):
        raise ValueError(f"screen_topk: `int8_cands` do not match {n_users} users x {n_cands} candidates of dim {dim}")


def _padded_candidates(unit_cands: torch.Tensor) -> tuple[torch.Tensor, int]:
    """float32 [B, C, D] -> (bf16 [B, C', D'] zero padded, C'): C' rounds C up to 16, D' rounds D
    up to 32 (the tile products take candidates 16 at a time and dims 32 at a time)."""
    n_users, n_cands, dim = unit_cands.shape
    dim_pad, cand_pad = -(-dim // 32) * 32, -(-n_cands // 16) * 16
    padded = scratch("screen-candidates", (n_users, cand_pad, dim_pad), torch.bfloat16)
    unit_cands = _dense(unit_cands, torch.float32)
    _STATE["bf16"](unit_cands.data_ptr(), n_users, n_cands, dim, cand_pad, dim_pad, padded.data_ptr())
    return padded, cand_pad


def quantize_int8_candidates(
    unit_cands: torch.Tensor, dim_scale: torch.Tensor, lo_steps: int, codes: torch.Tensor, lo: torch.Tensor | None,
    scale: torch.Tensor, error_terms: tuple[float, float, float] | None = None, cand_error: torch.Tensor | None = None,
) -> tuple[float, float, float]:
    """Quantises unit candidates for the int8 screen, in one native call (int8_candidates.c has
    the arithmetic; kernels.int8_screen.quantize_candidates is the caller).

    Args: unit_cands float32 [B, C, D]; dim_scale float32 [D]; lo_steps: lo codes per hi step;
    codes int8 [B, C', D''] and lo (same, or None: one part) written whole, zero padded;
    scale float32 [B, C'] written (1 in padding); error_terms (slack, row_term, constant) and
    cand_error float32 [B, C]: where given, each candidate's own screen error
    slack * (row_term * ||q~|| + ||q~ - q|| + constant) is written there, rounded up.
    Returns the largest ||q~ - q||, ||q~|| and (two parts) ||q~ - q~hi|| over the candidates, in
    float64 (0 without candidates).
    Raises RuntimeError when `available()` is False.
    """
    if _screen_fn() is None:
        raise RuntimeError(f"native kernels unavailable: {unavailable_reason()}")
    n_users, n_cands, dim = unit_cands.shape
    unit_cands, dim_scale = _dense(unit_cands, torch.float32), _dense(dim_scale, torch.float32)
    if (error_terms is None) != (cand_error is None) or (
        cand_error is not None and (cand_error.shape != (n_users, n_cands) or cand_error.dtype != torch.float32
                                    or not cand_error.is_contiguous())):
        raise ValueError(f"quantize_int8_candidates: `cand_error` must come with `error_terms`, contiguous float32 "
                         f"[{n_users}, {n_cands}]")
    stats = (ctypes.c_double * 3)()
    terms = (ctypes.c_double * 3)(*error_terms) if error_terms is not None else None
    _STATE["quantize"](
        unit_cands.data_ptr(), n_users, n_cands, dim, dim_scale.data_ptr(), codes.shape[1], codes.shape[2],
        int(lo is not None), lo_steps, codes.data_ptr(), lo.data_ptr() if lo is not None else None, scale.data_ptr(), stats,
        terms, cand_error.data_ptr() if cand_error is not None else None,
    )
    if any(math.isnan(value) for value in stats):
        raise MemoryError("quantize_int8_candidates: could not allocate its buffer")
    return stats[0], stats[1], stats[2]


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}


def _dense(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` as a contiguous tensor of `dtype`: itself when it already is one (a call passes
    ~10 such tensors; even a no-op conversion is a dispatch, ~1 us warm and several times that
    inside a call, whose screen has evicted the interpreter's working set from the caches)."""
    return tensor if tensor.dtype == dtype and tensor.is_contiguous() else tensor.to(dtype).contiguous()


def _rows_contiguous(history: torch.Tensor) -> torch.Tensor:
    """int64 history [B, L] whose rows are contiguous (a row stride may exceed L: a block of
    columns of a wider history is read in place)."""
    if history.dtype != torch.int64:
        history = history.to(torch.int64)
    return history if history.stride(1) == 1 else history.contiguous()


def id_range(ids: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty contiguous int64 CPU tensor, in one native pass.
    Raises RuntimeError when `available()` is False."""
    if _screen_fn() is None:
        raise RuntimeError(f"native kernels unavailable: {unavailable_reason()}")
    if ids.dtype != torch.int64 or not ids.is_contiguous() or ids.device.type != "cpu" or not ids.numel():
        raise ValueError("id_range: `ids` must be a non-empty contiguous int64 CPU tensor")
    out = (ctypes.c_int64 * 2)()
    _STATE["id_range"](ids.data_ptr(), ids.numel(), out)
    return out[0], out[1]


def pair_cosines_accepts(table: torch.Tensor) -> bool:
    """Whether `pair_cosines` reads this table: a CPU matrix of one of its storage dtypes."""
    return table.dim() == 2 and table.dtype in _DTYPE_CODES and table.device.type == "cpu"


def pair_cosines(table: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """Cosines float32 [B, C, M] between rows `targets` [B, C] of `table` [N+1, D] (float32 /
    float16 / bfloat16 / int8, as stored) and rows `ids` [B, M] (shared by a user's targets) or
    [B, C, M], in one native call; 0 where either row is zero or its id lies outside the table.
    Each pair is summed on its own in one fixed order (pair_cosines.c), so its bits do not depend
    on the batch it comes in. Raises RuntimeError when `available()` is False."""
    if _screen_fn() is None:
        raise RuntimeError(f"native kernels unavailable: {unavailable_reason()}")
    if table.dim() != 2 or table.dtype not in _DTYPE_CODES or any(t.device.type != "cpu" for t in (table, targets, ids)):
        raise ValueError(f"pair_cosines: `table` must be a CPU tensor [N+1, D] of {list(_DTYPE_CODES)}, and the ids on "
                         f"the CPU, got {table.dtype} {tuple(table.shape)} on {table.device}")
    if targets.dim() != 2 or ids.dim() not in (2, 3) or ids.shape[0] != targets.shape[0] or (
            ids.dim() == 3 and ids.shape[1] != targets.shape[1]):
        raise ValueError(f"pair_cosines: `targets` must be [B, C] and `ids` [B, M] or [B, C, M], got "
                         f"{tuple(targets.shape)} and {tuple(ids.shape)}")
    table, targets, ids = _dense(table, table.dtype), _dense(targets, torch.int64), _dense(ids, torch.int64)
    n_users, n_targets = targets.shape
    out = torch.empty(n_users, n_targets, ids.shape[-1])
    status = _STATE["cosines"](table.data_ptr(), _DTYPE_CODES[table.dtype], table.shape[0], table.shape[1],
                               targets.data_ptr(), n_users, n_targets, ids.data_ptr(), ids.shape[-1], int(ids.dim() == 3),
                               threads or torch.get_num_threads(), out.data_ptr())
    if status != 0:
        raise MemoryError(f"pair_cosines: could not allocate the norms of {ids.numel()} rows")
    return out


def unit_candidates(table: torch.Tensor, inv_norm: torch.Tensor, row_error: torch.Tensor | None, ids: torch.Tensor,
                    out: torch.Tensor) -> float:
    """Rows `ids` [...] of the table [N+1, D] (any stored dtype) as float32 times their reciprocal
    norms `inv_norm` [N+1], into `out` [..., D] (contiguous float32), in one native call; returns
    the largest `row_error` [N+1] (float32) over the ids (0.0 without ids or without row_error).
    The ids must lie in the table (the caller has checked them).
    Raises RuntimeError when `available()` is False."""
    if _screen_fn() is None:
        raise RuntimeError(f"native kernels unavailable: {unavailable_reason()}")
    table, inv_norm, ids = _dense(table, table.dtype), _dense(inv_norm, torch.float32), _dense(ids, torch.int64)
    if not out.is_contiguous() or out.dtype != torch.float32 or out.shape != (*ids.shape, table.shape[1]):
        raise ValueError(f"unit_candidates: `out` must be contiguous float32 {[*ids.shape, table.shape[1]]}")
    errors = _dense(row_error, torch.float32).data_ptr() if row_error is not None else None
    return float(_STATE["unit"](table.data_ptr(), _DTYPE_CODES[table.dtype], table.shape[1], inv_norm.data_ptr(), errors,
                                ids.data_ptr(), ids.numel(), out.data_ptr()))


def rescore_topk(
    table: torch.Tensor,
    inv_norm: torch.Tensor,
    unit_cands: torch.Tensor,
    history: torch.Tensor,
    lengths: torch.Tensor,
    screened: torch.Tensor,
    positions: torch.Tensor,
    bound: torch.Tensor,
    k: int,
    error: tuple[float, float],
    threads: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    pair_error: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Exact top-k of each (user, candidate) among its screened survivors, and whether it is proven.

    Args: table [N+1, D] (float32 / float16 / bfloat16 / int8, as stored); inv_norm float32 [N+1]
    (1 / row norm, 0 for zero rows); unit_cands float32 [B, C, D]; history [B, L]; lengths [B];
    screened float32 [B, C, m] and positions int64 [same] (history positions, -1 = unused): the
    survivors and their screened scores, each within error = (absolute, relative) of its exact
    cosine (eps(a) = absolute + relative * |a|); bound float32 [B, C]: every eligible behaviour left
    out screened at most this (-inf: none was); out: contiguous float32 and int64 tensors
    [B, C, k] to write scores and positions into (a caller's output, every slot written), else
    new ones; pair_error: float32 [B, C] each pair's own absolute error in place of error[0]
    (a candidate's own screen error).
    Returns scores float32 [B, C, k] descending (ties toward the larger position; -inf past the
    eligible survivors), positions int64 [B, C, k] (-1 there), proven bool [B, C]: the result is
    the exact top-k of the whole history (nothing eligible was left out, or what was falls below
    the k-th exact score even with its error), and all_proven: whether every pair is (counted
    in the native call: a torch or numpy reduction of `proven` cost ~15-40 us of a call
    here). Scores are <candidate, row> *
    inv_norm[id] with every row summed in one fixed order (copies of an item tie exactly); only
    survivors that can still enter the top-k are scored (see muse_rescore_topk).
    Raises RuntimeError when `available()` is False.
    """
    if _screen_fn() is None:
        raise RuntimeError(f"native kernels unavailable: {unavailable_reason()}")
    args, (scores, top_positions, proven) = _rescore_args(table, inv_norm, unit_cands, history, lengths, screened,
                                                          positions, bound, k, error, threads, out, pair_error)
    status = _STATE["rescore"](*args)
    if status < 0:
        raise MemoryError("rescore_topk: could not allocate its per-thread buffers")
    return scores, top_positions, proven, status == 0


def _rescore_args(table, inv_norm, unit_cands, history, lengths, screened, positions, bound, k, error, threads, out,
                  pair_error, counts=None, checked=True):
    """(the arguments of muse_rescore_topk, its outputs): `rescore_topk`'s checks and conversions
    (checked=False: only the table's, history's and lengths', see `screen_rescore_topk`)."""
    table, history, lengths = _dense(table, table.dtype), _rows_contiguous(history), _dense(lengths, torch.int64)
    n_users, n_cands, m = positions.shape
    if checked:
        inv_norm, unit_cands = _dense(inv_norm, torch.float32), _dense(unit_cands, torch.float32)
        positions, screened, bound = _dense(positions, torch.int64), _dense(screened, torch.float32), _dense(bound, torch.float32)
    if out is None:
        scores = torch.empty(n_users, n_cands, k)
        top_positions = torch.empty(n_users, n_cands, k, dtype=torch.int64)
    else:
        scores, top_positions = out
        shape = (n_users, n_cands, k)
        if checked and (scores.shape != shape or top_positions.shape != shape or scores.dtype != torch.float32
                        or top_positions.dtype != torch.int64 or not scores.is_contiguous()
                        or not top_positions.is_contiguous()):
            raise ValueError(f"rescore_topk: `out` must be contiguous float32 and int64 tensors of shape {shape}")
    if pair_error is not None and checked:
        pair_error = _dense(pair_error, torch.float32)
        if pair_error.shape != (n_users, n_cands):
            raise ValueError(f"rescore_topk: `pair_error` must be [{n_users}, {n_cands}], got {tuple(pair_error.shape)}")
    proven = torch.empty(n_users, n_cands, dtype=torch.bool)
    args = (
        table.data_ptr(), _DTYPE_CODES[table.dtype], table.shape[1], inv_norm.data_ptr(), unit_cands.data_ptr(),
        history.data_ptr(), history.stride(0), lengths.data_ptr(), screened.data_ptr(), positions.data_ptr(),
        bound.data_ptr(), n_users, n_cands, m, k, error[0], error[1],
        pair_error.data_ptr() if pair_error is not None else None, threads or torch.get_num_threads(),
        scores.data_ptr(), top_positions.data_ptr(), proven.data_ptr(), counts.data_ptr() if counts is not None else None,
    )
    return args, (scores, top_positions, proven)


def screen_rescore_topk(
    screen: torch.Tensor, table: torch.Tensor, inv_norm: torch.Tensor, unit_cands: torch.Tensor,
    history: torch.Tensor, lengths: torch.Tensor, keep: int, k: int, window: float, error: tuple[float, float],
    screen_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], sample_every: int = 0,
    int8_cands: Int8Candidates | None = None, windows: torch.Tensor | None = None, window_factor: float = 1.0,
    pair_error: torch.Tensor | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
    threads: int | None = None, checked: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """`screen_topk` into `screen_out` (required: its survivors are the re-scoring's input), then
    `rescore_topk` of those survivors, in one native call: the arguments are the two functions'
    own, and so are the result (`rescore_topk`'s) and the errors raised. `screen_out` then holds
    each pair's survivors in its first slots only (the re-scoring is told how many; the slots
    past them are not written). One call because the
    Python between two runs with its caches full of the screen's rows (at L = 100K, C = 100 the
    re-scoring's wrapper alone took ~80 us there, its C call ~0.45 ms). checked=False is for a
    caller that built every input but the table, history and lengths itself, to the documented
    shapes, dtypes and layouts (the CPU path's own buffers): their checks are skipped, each a
    dispatch inside a call whose screen has just emptied the caches.
    """
    fn = _screen_fn()
    if fn is None:
        raise RuntimeError(f"native screen unavailable: {unavailable_reason()}")
    # each pair's survivors in its first slots, counted: the re-scoring lists no further, and the
    # rest of a pair's `keep` slots go unwritten (0.99x a call at L = 100K, C = 100)
    counts = scratch("fused-counts", tuple(screen_out[2].shape), torch.int64)
    screen_args, (screened, positions, bound, _) = _screen_args(
        screen, unit_cands, history, lengths, keep, k, window, sample_every, threads, screen_out, int8_cands, windows,
        window_factor, counts, checked)
    rescore_args, (scores, top_positions, proven) = _rescore_args(
        table, inv_norm, unit_cands, history, lengths, screened, positions, bound, k, error, threads, out, pair_error,
        counts, checked)
    status = _STATE["screen_rescore"](*screen_args, *rescore_args)
    if status == -2:
        raise MemoryError(f"screen_topk: could not allocate buffers for {history.shape[0]} users x "
                          f"{unit_cands.shape[1]} candidates x {keep} kept")
    if status < 0:
        raise MemoryError("rescore_topk: could not allocate its per-thread buffers")
    return scores, top_positions, proven, status == 0
