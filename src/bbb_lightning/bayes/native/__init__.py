"""Native CPU kernels of the mean-field Gaussian posterior, compiled on first use.

On a CPU, what a Bayes-by-Backprop step adds to a deterministic one is elementwise work over
every weight: Gaussian draws, softplus, sigmoid, log. In torch ops each is one or more passes
over memory, and ``torch.randn`` draws one Mersenne-Twister number at a time (3.4 ns per
normal here). ``gaussian.cpp`` does the same work in fewer, vectorized passes:

- :func:`standard_normal`: N(0, 1) draws from Philox4x32-10 counters (the generator of
  cuRAND and of PyTorch on CUDA) and Box-Muller, 16 or 8 lanes at a time, split over the intra-op
  threads. Each call takes a fresh 64-bit key from torch's default generator, so
  ``torch.manual_seed`` makes runs reproducible, and element i depends on (key, i) only, so the
  draws are the same for any number of threads;
- :func:`random_signs`: +1 or -1 with probability 1/2 each (flipout's Rademacher signs), one
  Philox bit per sign, written as floats in one pass;
- :func:`scaled_normal`: mu + sigma eps (or sigma eps) for S samples, eps never stored: the
  draws without autograd (the many-sample predictive) in one pass instead of two;
- :func:`local_noise` and :func:`local_noise_backward`: local reparameterization's
  pre-activations mean + sqrt(variance) eps for S samples in one pass, and their gradients in
  one more (:func:`bbb_lightning.bayes.local_reparameterization.sample_preactivations`);
- :func:`softplus_scale`: sigma = softplus(rho) + min_scale, sigmoid(rho) and sum log sigma from
  one exp(-|rho|) per weight;
- :func:`kl_rho_grad`: the rho-gradient of the Gaussian KL in one pass;
- :func:`sample_with_kl`: one use of sigma (a draw, a perturbation or the variance) and the
  Gaussian-prior KL in one pass over mu and rho; :func:`sample_with_kl_node` makes it one
  autograd node, written in C++, whose backward gives the gradients of both in one more pass
  (:func:`bbb_lightning.bayes.gaussian_ops.sample_with_kl`).

This package is an optional backend behind one hook, :func:`serves`: the reference path
(:mod:`bbb_lightning.bayes.functional`) asks it where a kernel applies (contiguous float32 CPU
tensors, the kernels built, and :func:`active`: not under ``torch.compile``, a ``torch.func``
transform or :func:`stepped_aside`) and computes in torch ops otherwise (float64, CUDA, where
the compiler's fusion is the fast path, or when the kernels cannot be built).

The build uses ``torch.utils.cpp_extension`` (a C++ compiler with OpenMP and ``ninja``), takes 30
to 100 s once (it says so in one line), and is cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) in a folder of its own per torch installation, Python version,
source and compiler flags (:func:`build_key`): two virtual environments on one machine, or two
clones with different sources, never rebuild each other's kernels. ``BBB_LIGHTNING_NATIVE=0`` turns
the kernels off (:func:`check_setting` validates the switch without building); a failed build warns
once and falls back. :func:`status` says which is in use.

Processes that build at once (the ranks of a DDP job, two runs started together) take turns
under an operating-system lock, which a killed process releases; one that has to wait says so
in one line naming the holder's pid. torch's own lock is a plain file that a build interrupted
by Ctrl-C or a kill leaves behind, after which every later build in that directory waits
forever; under our lock such a file can only be stale, and is removed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ENV_VAR",
    "active",
    "build",
    "build_directory",
    "build_key",
    "check_setting",
    "kernels",
    "kl_rho_grad",
    "local_noise",
    "local_noise_backward",
    "random_signs",
    "sample_with_kl",
    "sample_with_kl_node",
    "scaled_normal",
    "serves",
    "softplus_scale",
    "standard_normal",
    "status",
    "stepped_aside",
]

ENV_VAR = "BBB_LIGHTNING_NATIVE"
SOURCE = Path(__file__).with_name("gaussian.cpp")
# Compiler flags per instruction set, as PyTorch builds its own CPU kernels: the widest one
# torch itself uses on this machine (``torch.backends.cpu.get_cpu_capability``).
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

log = logging.getLogger(__name__)


def check_setting() -> bool:
    """Whether ``BBB_LIGHTNING_NATIVE`` asks for the kernels (the default); raises ``ValueError``
    naming the value and what is allowed for anything but 0/1, false/true, off/on. Builds
    nothing: the entry points call it before any other work."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"{ENV_VAR} must be 0 or 1 (or false/true, off/on), got {value!r}")
    return value in ("1", "true", "on")


def _extension_name(isa: str) -> str:
    return "bbb_lightning_gaussian_" + (isa.lower() if isa in _ISA_FLAGS else "portable")


def _flags(isa: str) -> list[str]:
    # No contraction of a * b + c into a fused multiply-add at the compiler's discretion: it
    # decides per inlined copy of a loop, and at::parallel_for runs the serial and the threaded
    # copy of each kernel, so the rounding (and the draws) would depend on the thread count.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if isa in _ISA_FLAGS:
        flags += [*_ISA_FLAGS[isa], f"-DCPU_CAPABILITY_{isa}", f"-DCPU_CAPABILITY={isa}"]
    return flags


def build_key(isa: str) -> str:
    """What a build depends on, as 16 hex digits: the torch installation (its directory and
    version: a module compiled against one torch does not load in another, and two virtual
    environments hold two installations even of one version), the Python version, the kernels'
    source and the compiler flags for ``isa``."""
    parts = [
        str(Path(torch.__file__).resolve().parent),
        torch.__version__,
        f"py{sys.version_info.major}.{sys.version_info.minor}",
        hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        " ".join(_flags(isa)),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_directory(isa: str) -> Path:
    """Where :func:`build` compiles and caches the kernels for ``isa``: one folder per
    :func:`build_key` under ``TORCH_EXTENSIONS_DIR``, or torch's default extensions root."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / "bbb_lightning" / f"{_extension_name(isa)}-{build_key(isa)}"


@contextlib.contextmanager
def _exclusive_build(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/build.flock`` (released by the OS if this
    process dies; the holder writes its pid there), saying in one line when another process
    holds it, and remove torch's ``lock`` file there, which only an interrupted build can have
    left while we hold ours. Without ``fcntl`` (Windows), torch's lock alone."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(directory / "build.flock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            log.warning(
                "waiting for the native kernels' build in %s (held by pid %s; once it is done "
                "this run loads the result)",
                directory,
                holder,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        stale = directory / "lock"
        if stale.exists():
            log.warning("removing %s, left by an interrupted build", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(isa: str) -> ModuleType:
    """Compile (or load from the cache) the kernels for the instruction set ``isa``:
    ``"AVX512"`` or ``"AVX2"`` (16 or 8 float lanes), anything else portable code, in
    :func:`build_directory`. Raises what the compiler raised. :func:`kernels` builds the one
    torch itself uses on this CPU; the others exist for users of other CPUs, and for the tests
    that check them here."""
    from torch.utils import cpp_extension

    name, directory = _extension_name(isa), build_directory(isa)
    with _exclusive_build(directory):
        if (directory / f"{name}.so").is_file():
            log.debug("loading native kernels %s from %s", name, directory)
        else:
            log.warning(
                "compiling the native CPU kernels into %s (once per torch installation; "
                "30 to 100 s)",
                directory,
            )
        return cpp_extension.load(
            name, [str(SOURCE)], extra_cflags=_flags(isa), build_directory=str(directory)
        )


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernels (built on the first call), or None if disabled or unbuildable."""
    if not check_setting():
        return None
    try:
        return build(torch.backends.cpu.get_cpu_capability())
    except Exception as error:  # no compiler, no ninja, no OpenMP, ...: fall back, loudly
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(
            f"bbb_lightning: native Gaussian kernels unavailable "
            f"({type(error).__name__}: {reason}); using torch ops (slower on CPU). "
            f"Set {ENV_VAR}=0 to skip the build.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def status() -> str:
    """``'native'`` if the kernels are in use for float32 CPU tensors, else ``'torch'``."""
    return "native" if kernels() is not None else "torch"


_stepped_aside = 0  # how many stepped_aside() blocks are open


@contextlib.contextmanager
def stepped_aside() -> Iterator[None]:
    """Within the block the kernels serve nothing: every tensor takes the reference path
    (:mod:`bbb_lightning.bayes.functional`), e.g. to compare the two or to time the reference."""
    global _stepped_aside
    _stepped_aside += 1
    try:
        yield
    finally:
        _stepped_aside -= 1


def active() -> bool:
    """Whether the backend may serve now: not :func:`stepped_aside`, not traced by
    ``torch.compile`` (whose own fusion replaces it) and under no ``torch.func`` transform
    (``grad``, ``vmap``, ...), which the kernels' hand-written autograd nodes do not support."""
    return (
        not _stepped_aside
        and not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def _cpu_float32(tensor: Tensor) -> bool:
    return (
        tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
        and active()
        and kernels() is not None
    )


def serves(*tensors: Tensor | None) -> bool:
    """The one hook of the backend: whether the kernels compute for these tensors now
    (:func:`active`, the kernels built, every tensor given contiguous float32 on the CPU).
    The reference path asks it where a kernel applies and otherwise computes in torch ops."""
    present = [tensor for tensor in tensors if tensor is not None]
    return (
        bool(present)
        and all(
            tensor.is_contiguous() and tensor.device.type == "cpu" and tensor.dtype == torch.float32
            for tensor in present
        )
        and active()
        and kernels() is not None
    )


def _run(kernel: str, *args: object) -> Any:
    """``kernels().<kernel>(*args)``. While ``torch.profiler`` records, the call is recorded as
    ``bbb_lightning::<kernel>`` (a compiled call is invisible to the profiler otherwise); when it
    does not, the check costs tens of nanoseconds."""
    function = getattr(kernels(), kernel)
    if not torch.autograd._profiler_enabled():
        return function(*args)
    with torch.profiler.record_function(f"bbb_lightning::{kernel}"):
        return function(*args)


def _key() -> int:
    """A fresh 64-bit Philox key from torch's default CPU generator (drawn in C++: a
    ``torch.randint`` costs microseconds, and a training step draws one key per tensor)."""
    return kernels().random_key()  # only called where the kernels are built


def standard_normal(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """eps ~ N(0, I) of ``shape``, with the dtype and device of ``like``.

    Example:
        >>> eps = standard_normal((1000,), torch.zeros(1))
        >>> eps.shape, abs(float(eps.mean())) < 0.2, abs(float(eps.std()) - 1) < 0.1
        (torch.Size([1000]), True, True)
    """
    if not _cpu_float32(like):
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    out = torch.empty(shape, dtype=torch.float32)
    return _run("normal_", out, _key())


_BITS_PER_DRAW = 16


def random_signs(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Independent signs, +1 or -1 with probability 1/2 each, of ``shape``, with the dtype and
    device of ``like``.

    Natively one Philox bit per sign, like :func:`standard_normal` in its keys and its
    independence from the thread count. Otherwise 16 signs per draw of 16 uniform random bits
    (``bernoulli_`` costs one draw per sign, and about 15 times the time on a CPU).
    """
    if _cpu_float32(like):
        return _run("random_signs_", torch.empty(shape, dtype=torch.float32), _key())
    count = math.prod(shape)
    device = like.device
    words = torch.randint(
        0, 1 << _BITS_PER_DRAW, (-(-count // _BITS_PER_DRAW), 1), dtype=torch.int32, device=device
    )
    shifts = torch.arange(_BITS_PER_DRAW, dtype=torch.int32, device=device)
    bits = words.bitwise_right_shift(shifts).bitwise_and_(1).reshape(-1)[:count]
    return bits.to(like.dtype).mul_(2).sub_(1).reshape(shape)


def scaled_normal(sample_shape: tuple[int, ...], sigma: Tensor, mu: Tensor | None) -> Tensor:
    """mu + sigma eps (sigma eps where ``mu`` is None), eps ~ N(0, I) of shape
    ``sample_shape + sigma.shape``, without autograd, in one pass. eps is never stored: only
    for a draw whose gradient is not needed. Only for tensors :func:`serves`."""
    out = torch.empty((*sample_shape, *sigma.shape), dtype=torch.float32)
    mean = sigma.new_empty(0) if mu is None else mu.detach()
    return _run("scaled_normal_", out, sigma, mean, _key())


def local_noise(
    mean: Tensor, variance: Tensor, sample_shape: tuple[int, ...], min_variance: float, keep: bool
) -> tuple[Tensor, Tensor]:
    """(out, eps) without autograd: out = mean + sqrt(max(variance, min_variance)) eps of shape
    ``sample_shape + mean.shape``, eps ~ N(0, I) of that shape (normal i of stream s, as
    :func:`scaled_normal`), returned only if ``keep`` (else empty). Only for tensors
    :func:`serves`."""
    return _run(
        "local_noise",
        mean.detach(),
        variance.detach(),
        list(sample_shape),
        _key(),
        min_variance,
        keep,
    )


def local_noise_backward(
    grad: Tensor, eps: Tensor, variance: Tensor, min_variance: float
) -> tuple[Tensor, Tensor]:
    """(dL/dmean, dL/dvariance) of L = <grad, out> for :func:`local_noise`'s out, in one pass:
    sum_s grad_s (empty for one sample, where it is ``grad`` itself) and
    sum_s grad_s eps_s / (2 sqrt(variance)) where variance >= min_variance, else 0."""
    return _run("local_noise_backward", grad.contiguous(), eps, variance.detach(), min_variance)


def softplus_scale(rho: Tensor, min_scale: float, log_sum: bool) -> tuple[Tensor, Tensor, float]:
    """(sigma, sigmoid(rho), sum log sigma) with sigma = softplus(rho) + min_scale, without
    autograd; the sum is 0.0 unless ``log_sum``. Only for tensors :func:`serves`."""
    return _run("softplus_scale", rho.detach(), min_scale, log_sum)


def kl_rho_grad(
    rho: Tensor, sigma: Tensor, dsigma: Tensor, weight: float, grad: float, min_scale: float
) -> Tensor:
    """(sigma weight - grad / sigma) sigmoid(rho), finite for any finite rho; see
    :meth:`~bbb_lightning.bayes.gaussian_ops.ScaleValues.sigma_minus_inverse`."""
    return _run("kl_rho_grad", rho.detach(), sigma, dsigma, weight, grad, min_scale)


_VARIANCE = 2  # sample_with_kl's use that draws nothing (gaussian_ops.VARIANCE)


def sample_with_kl(
    mu: Tensor,
    rho: Tensor,
    use: int,
    sample_shape: tuple[int, ...],
    min_scale: float,
    loc: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, eps, KL) without autograd, where out is mu + sigma eps (``use``
    0), sigma eps (1) or sigma^2 (2, no eps and no sample shape), eps ~ N(0, I) of shape
    ``sample_shape + rho.shape``, and KL = KL(N(mu, sigma^2) || N(loc, scale^2)) summed, a 0-dim
    tensor. Only for tensors :func:`serves`."""
    return _run(
        "sample_with_kl",
        mu.detach(),
        rho.detach(),
        use,
        list(sample_shape),
        _key() if use != _VARIANCE else 0,  # no noise: the generator is left as it is
        min_scale,
        loc,
        scale,
    )


def sample_with_kl_node(
    mus: list[Tensor],
    rhos: list[Tensor],
    use: int,
    sample_shape: list[int],
    min_scales: list[float],
    locs: list[float],
    scales: list[float],
) -> tuple[list[Tensor], list[Tensor], Tensor] | None:
    """([out_t], [KL_t], released): :func:`sample_with_kl` for each tensor t of (``mus[t]``,
    ``rhos[t]``), with its own ``min_scales[t]`` and prior N(``locs[t]``, ``scales[t]``^2), from
    one autograd node written in C++ (one node per layer: weight and bias); None where the node
    does not apply: autograd records nothing (grad mode off, or no tensor requires grad), or a
    tensor is not a contiguous float32 CPU tensor (checked in C++: in Python these checks cost
    more than the node). The kernels must be built (:func:`kernels`).

    The node saves eps, mu and rho; its backward gives dL/dmu_t and dL/drho_t of
    L = sum_t <G_t, out_t> + g_t KL_t in one pass per tensor (the native
    ``sample_with_kl_backward``) and has no second derivative. ``released`` is a 0-dim bool that
    turns true once the backward has run. The node records both kernels under their names for
    ``torch.profiler`` itself, once per tensor."""
    return kernels().sample_with_kl_node(mus, rhos, use, sample_shape, min_scales, locs, scales)
