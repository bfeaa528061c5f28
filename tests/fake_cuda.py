"""A pretend CUDA device for CPU-only machines: catches device mixes and counts host syncs.

``FakeCuda()`` is a ``TorchDispatchMode``. Inside it, tensors created on ``cuda:0`` (factory
functions, ``.to("cuda:0")``, ``module.to("cuda:0")``) are ``FakeCudaTensor`` wrappers: their
``.device`` says ``cuda:0`` while the values live in an ordinary CPU tensor, so every op computes
the real result (custom ``torch.ops.dspark`` ops included, through their CPU kernels) and a run
inside the mode gives exactly the tokens of the same run on the CPU.

What it checks, per op:

* **device mix**: an op (other than a copy between devices) that gets a fake-CUDA tensor together
  with a CPU tensor of one element or more raises :class:`DeviceMixError`. Real CUDA accepts a few
  such mixes (0-dim CPU scalars, which are allowed here too; CPU index tensors, which it copies
  over with a blocking transfer): the check is stricter than CUDA on purpose, since each of those
  is a hidden transfer.
* **host syncs** (``mode.syncs``, a list of op names): reading a value on the host
  (``.item()``, ``int()``, ``bool()``, ``.tolist()``, ``.cpu()`` / blocking ``.to("cpu")``) and ops
  whose output shape depends on the values (``nonzero``, boolean-mask indexing, ``masked_select``,
  ``unique``, ``repeat_interleave`` without ``output_size``): on a GPU each one waits for the
  queued work. A non-blocking ``.to("cpu", non_blocking=True)`` is not counted.
* **blocking uploads** (``mode.blocking_uploads``): ``copy_`` / ``.to("cuda")`` from a CPU tensor
  without ``non_blocking=True``; PyTorch synchronises the stream after such a copy.

* **generators**: inside the mode ``torch.Generator(device="cuda:0")`` makes a CPU generator tagged
  as the fake device's (the same stream of numbers as a CPU generator with the same seed); an op on
  fake-CUDA tensors given an untagged (CPU) generator raises :class:`DeviceMixError`, as CUDA would
  (recognised by its state: a CPU generator in exactly a fake one's state would pass).

CUDA events and streams cannot be faked (no CUDA runtime here). Use the device string
``"cuda:0"`` (with the index): resolving a bare ``"cuda"`` asks the runtime.
"""

from __future__ import annotations

import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

FAKE_DEVICE = torch.device("cuda", 0)


class DeviceMixError(RuntimeError):
    pass


class FakeCudaTensor(torch.Tensor):
    """Reports ``device == cuda:0``; holds its values in ``self.elem`` (a CPU tensor). The C++ side
    sees a meta tensor, so no CUDA device guard is ever needed."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device="meta",
            requires_grad=elem.requires_grad,
        )
        r.elem = elem
        return r

    @property
    def device(self):
        return FAKE_DEVICE

    @property
    def is_cuda(self):
        return True

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"fake CUDA tensor used outside FakeCuda(): {func}")

    def tolist(self):
        _active[-1]._sync("tolist")
        return self.elem.tolist()

    def __repr__(self):
        return f"FakeCudaTensor({self.elem!r})"


_RealGenerator = torch.Generator
_fake_generators = weakref.WeakSet()


def _is_fake_generator(g) -> bool:
    # ops receive a fresh Python wrapper of the generator, so recognise it by its state
    st = g.get_state()
    return any(torch.equal(st, f.get_state()) for f in _fake_generators)


class FakeCudaGenerator(_RealGenerator):
    """``torch.Generator(device)`` inside the mode: a CPU generator, tagged when asked for cuda."""

    def __new__(cls, device="cpu"):
        dev = torch.device(device)
        if dev.type == "cuda":
            g = _RealGenerator.__new__(cls, "cpu")
            _fake_generators.add(g)
            return g
        return _RealGenerator(dev)

    def __init__(self, device="cpu"):
        pass


_active = []
_COPY_OPS = {"aten::_to_copy", "aten::copy_", "aten::lift_fresh", "aten::_copy_from", "aten::_copy_from_and_resize"}
_SHAPE_SYNC_OPS = {
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::nonzero_numpy",
    "aten::argwhere",
}


def _is_fake_device(dev) -> bool:
    return dev is not None and torch.device(dev).type in ("cuda", "meta")


class FakeCuda(TorchDispatchMode):
    def __init__(self, where: bool = False):
        super().__init__()
        # Claim the FAKE mode slot: torch then skips CUDA lazy initialisation for "cuda" factories.
        self._mode_key = torch._C._TorchDispatchModeKey.FAKE
        self.syncs = []
        self.blocking_uploads = []
        self.where = where  # record a stack summary with each sync (debugging)

    def __enter__(self):
        self._prev_lift = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)  # torch.tensor(data, device="cuda:0") goes through _to_copy
        _active.append(self)
        torch.Generator = FakeCudaGenerator
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Generator = _RealGenerator
        _active.pop()
        torch._C._set_only_lift_cpu_tensors(self._prev_lift)
        return super().__exit__(*exc)

    def _label(self, what):
        if self.where:
            frames = [f for f in traceback.extract_stack()[:-3] if "dspark_native" in f.filename]
            what = f"{what} @ {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else what
        return what

    def _sync(self, what):
        self.syncs.append(self._label(what))

    def reset(self):
        self.syncs.clear()
        self.blocking_uploads.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        leaves = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        fake_in = [x for x in leaves if isinstance(x, FakeCudaTensor)]
        real_in = [x for x in leaves if not isinstance(x, FakeCudaTensor)]
        dev = kwargs.get("device")
        if name in _COPY_OPS:
            if name == "aten::copy_" and isinstance(args[0], FakeCudaTensor) and real_in:
                if not kwargs.get("non_blocking", len(args) > 2 and args[2]):
                    self.blocking_uploads.append(self._label(name))
            elif name == "aten::_to_copy":
                src_fake = isinstance(args[0], FakeCudaTensor)
                if _is_fake_device(dev) and not src_fake and not kwargs.get("non_blocking", False):
                    self.blocking_uploads.append(self._label(name))
                if src_fake and dev is not None and not _is_fake_device(dev) and not kwargs.get("non_blocking", False):
                    self._sync(".cpu()")
            elif name == "aten::copy_" and not isinstance(args[0], FakeCudaTensor) and fake_in:
                if not kwargs.get("non_blocking", len(args) > 2 and args[2]):
                    self._sync("copy_ to host")
        elif fake_in and any(x.dim() > 0 for x in real_in):
            shapes = [tuple(x.shape) for x in real_in if x.dim() > 0]
            raise DeviceMixError(f"{func}: fake-CUDA tensors mixed with CPU tensors of shape {shapes}")
        if fake_in:
            for x in tree_leaves((args, kwargs)):
                if isinstance(x, torch._C.Generator) and not _is_fake_generator(x):
                    raise DeviceMixError(f"{func}: fake-CUDA tensors with a CPU generator")
        if fake_in:
            if name == "aten::_local_scalar_dense":
                self._sync("item")
            elif name in _SHAPE_SYNC_OPS:
                self._sync(name)
            elif name in ("aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"):
                idx = args[1] if len(args) > 1 else kwargs.get("indices")
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (idx or [])):
                    self._sync(f"{name} with a boolean mask")
            elif (
                name == "aten::repeat_interleave"
                and func._overloadname in ("Tensor", "self_Tensor")
                and kwargs.get("output_size") is None
            ):
                self._sync("repeat_interleave without output_size")

        wrap = bool(fake_in)
        if dev is not None:
            wrap = _is_fake_device(dev)
            if wrap:
                kwargs = dict(kwargs, device=torch.device("cpu"))

        def unwrap(x):
            return x.elem if isinstance(x, FakeCudaTensor) else x

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if not wrap or name == "aten::_local_scalar_dense":
            return out
        # in-place ops return their (mutated) input: hand back the same wrapper
        mine = {id(x.elem): x for x in fake_in}

        def rewrap(x):
            if not isinstance(x, torch.Tensor) or isinstance(x, FakeCudaTensor):
                return x
            same = mine.get(id(x))
            return FakeCudaTensor(x) if same is None else same

        return tree_map(rewrap, out)


def to_fake_cuda(module: torch.nn.Module) -> torch.nn.Module:
    """Move a module's parameters and buffers to the fake device (call inside ``FakeCuda()``)."""
    with torch.no_grad():
        return module.to(FAKE_DEVICE)
