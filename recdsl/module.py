"""The compiled cell as a ``torch.nn.Module``: parameters, input checking, dtypes, state.

``compile`` is the public entry point: source (or a path) in, module out.  The module
owns the cell's params as ``nn.Parameter`` attributes named as in the source, checks
the tensors it is called with, picks the computing dtype, fills in initial states, and
hands the run to the backend chosen once at compile time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from . import ir
from .analysis import Analysis, analyze
from .plan import BackendKind, ExecutionPlan, LowPrecisionInputs, PlanOptions
from .plan import plan as make_plan
from .errors import BackendError, DeclarationError, InputError, RecDSLError
from .frontend import load, read_source
from .ir import Kind, RefKind

_LOW_PRECISION = (torch.float16, torch.bfloat16)
DEFAULT_CHUNK_SIZE = 64


def _shape_words(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(["B", "T", "*heads"] + [str(s) for s in shape]) + "]"


def _step_shape_words(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(["B", "*heads"] + [str(s) for s in shape]) + "]"


def _tracing() -> bool:
    """Whether torch.compile (dynamo) or export is tracing the current call."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


_REAL_PARTS = {torch.complex128: torch.float64, torch.complex64: torch.float32, torch.complex32: torch.float32}


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return _REAL_PARTS.get(dtype, dtype)


class CompiledCell(nn.Module):
    """A recdsl cell compiled to a module.

    Call it with one tensor per ``input``, batch-first: ``[B, T, *heads, *shape]``,
    positionally in declaration order or by name.  It returns the output
    ``[B, T, *heads, *shape]`` (a tuple when the cell has several ``out`` lines), or
    ``(output, state)`` with ``return_state=True``, where ``state`` maps each state
    (and each scan carry, as ``scan.carry``) to its final value ``[B, *heads, *shape]``.
    Passing that ``state`` to the next call continues the sequence.
    ``cu_seqlens=offsets`` runs sequences of different lengths packed along time
    (``[1, total_T, ...]``, states ``[N, ...]``); :meth:`step` runs one time step.
    """

    def __init__(
        self,
        analysis: Analysis,
        backend: str = "auto",
        chunk_size: int | None = None,
        backend_options: Mapping[str, Any] | None = None,
        allow_tf32: bool = False,
    ) -> None:
        super().__init__()
        # An empty buffer that follows .double(), .half() and .to(dtype), so that the
        # computing dtype follows them too in a cell without params.
        self.register_buffer("_dtype_anchor", torch.empty(0), persistent=False)
        self.analysis = analysis
        self.cell: ir.CellIR = analysis.cell
        if chunk_size is not None:
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
                raise BackendError(f"chunk_size must be a positive int, got {chunk_size!r}", expected="e.g. chunk_size=64")
            if backend not in ("chunked", "auto"):
                raise BackendError(f"chunk_size applies to the chunked backend, not '{backend}'", expected="backend='chunked' (or 'auto')")
        # Every decision about how to run the cell, made once: see recdsl.plan.
        self.plan: ExecutionPlan = make_plan(analysis, backend, PlanOptions(
            chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
            backend_options=tuple(sorted(dict(backend_options or {}).items())),
            allow_tf32=bool(allow_tf32),
        ))
        from .backends import runner

        # Resolved once here, so that a forward pass only calls (torch.compile traces no imports).
        self._run = runner(self.plan.backend)
        self._run_on_gpu = runner(self.plan.gpu.backend) if self.plan.gpu is not None else None
        # step(): one step of the loop over time, the definition every backend agrees with.
        self._run_step = runner(BackendKind.SEQUENTIAL)
        # The newton backend reports each call's solve (iterations, residual) here.
        self.last_solve: Any = None
        reserved = set(dir(self))
        for param in self.cell.params:
            if param.name in reserved or param.name.startswith("_"):
                raise DeclarationError(
                    f"param name '{param.name}' clashes with an attribute of torch.nn.Module",
                    param.span,
                    expected="another name for the param",
                )
            self.register_parameter(param.name, nn.Parameter(self._initial_value(param)))

    @property
    def backend(self) -> str:
        """The name of the backend this module runs on (on CPU tensors; see ``plan.gpu`` for CUDA)."""
        return self.plan.backend.value

    @property
    def backend_reason(self) -> str:
        """Why the plan stage chose that backend."""
        return self.plan.reason

    # ---- parameters
    def _initial_value(self, param: ir.Param) -> torch.Tensor:
        shape = param.type.shape
        is_complex = param.type.kind is Kind.COMPLEX
        init = param.init
        if init.scheme == "expr":
            assert init.expr is not None
            from .backends.torch_ops import Evaluator, Numerics

            consts = self._consts(Numerics(torch.float64, torch.device("cpu")))
            value = Evaluator(Numerics(torch.float64, torch.device("cpu")), consts).evaluate(init.expr)
            value = value.expand(shape).clone()
            return value.to(torch.complex64 if is_complex else torch.float32)
        parts = 2 if is_complex else 1
        drawn = []
        for _ in range(parts):
            tensor = torch.empty(shape, dtype=torch.float32)
            if init.scheme == "zeros":
                nn.init.zeros_(tensor)
            elif init.scheme == "ones":
                nn.init.ones_(tensor) if len(drawn) == 0 else nn.init.zeros_(tensor)
            elif init.scheme == "normal":
                nn.init.normal_(tensor, 0.0, init.args[0] / math.sqrt(parts))
            elif init.scheme == "uniform":
                nn.init.uniform_(tensor, init.args[0], init.args[1])
            elif init.scheme == "glorot":
                fan_in = shape[-2] if len(shape) >= 2 else shape[-1]
                fan_out = shape[-1]
                bound = math.sqrt(6.0 / (fan_in + fan_out)) / math.sqrt(parts)
                nn.init.uniform_(tensor, -bound, bound)
            else:  # pragma: no cover - the checker admits only the schemes above
                raise ValueError(init.scheme)
            drawn.append(tensor)
        if is_complex:
            return torch.complex(drawn[0], drawn[1])
        return drawn[0]

    def _consts(self, numerics) -> dict[tuple[RefKind, str], torch.Tensor]:
        """The values of the consts the cell reads, evaluated once per (dtype, device).

        A const nothing reads is never evaluated.  The values live on this module (not in a
        global table), are not parameters or buffers, and are left out of pickles.
        """
        from .backends.torch_ops import Evaluator

        key = (numerics.real, numerics.device)
        cache = self.__dict__.setdefault("_const_values", {})
        cached = cache.get(key)
        if cached is None:
            cached = {}
            # Tensors made under inference_mode could not be saved for a later backward, and
            # a trace (torch.compile, export) must not leave its fake tensors in the cache.
            with torch.inference_mode(False), torch.no_grad():
                evaluator = Evaluator(numerics, cached)
                for const in self.cell.used_consts():
                    cached[(RefKind.CONST, const.name)] = evaluator.evaluate(const.value)
            if not _tracing():
                cache[key] = cached
        return dict(cached)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_const_values", None)  # derived; recomputed on first use
        state.pop("_initial_values", None)
        return state

    # ---- calling
    def _bind_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        declared = self.cell.inputs
        if not kwargs and len(args) == len(declared):  # the common call: every input by position
            return {d.name: value for d, value in zip(declared, args)}
        names = [i.name for i in declared]
        signature = ", ".join(f"{i.name}: {_shape_words(i.type.shape)}" for i in self.cell.inputs)
        if len(args) > len(names):
            raise InputError(f"cell {self.cell.name} takes {len(names)} input{'s' if len(names) != 1 else ''}, got {len(args)}", expected=signature)
        bound = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names:
                raise InputError(f"cell {self.cell.name} has no input '{name}'", expected=signature)
            if name in bound:
                raise InputError(f"input '{name}' is given twice (by position and by name)", expected=signature)
            bound[name] = value
        missing = [n for n in names if n not in bound]
        if missing:
            raise InputError(f"input '{missing[0]}' is missing", expected=signature)
        return bound

    def _check_inputs(self, inputs: dict[str, Any], time_axis: bool = True) -> tuple[int, int, tuple[int, ...]]:
        """Validate shapes and dtypes; return ``(B, T, heads)``.

        Without ``time_axis`` (one step, :meth:`step`) inputs are ``[B, *heads, *shape]`` and T is 1.
        """
        accepted = self._accepted_inputs(inputs, time_axis)
        if accepted is not None:
            return accepted
        reference: tuple[str, tuple[int, ...]] | None = None
        first = inputs[self.cell.inputs[0].name]
        lead_dims = 2 if time_axis else 1
        for declared in self.cell.inputs:
            value = inputs[declared.name]
            expected = _shape_words(declared.type.shape) if time_axis else _step_shape_words(declared.type.shape)
            if not isinstance(value, torch.Tensor):
                raise InputError(f"input '{declared.name}' is a {type(value).__name__}, not a torch.Tensor", expected=f"a tensor of shape {expected}")
            if not (value.is_floating_point() or value.is_complex()):
                raise InputError(f"input '{declared.name}' has dtype {value.dtype}", expected="a floating-point (or, for complex inputs, complex) tensor")
            if value.is_complex() and declared.type.kind is not Kind.COMPLEX:
                raise InputError(f"input '{declared.name}' is complex but is declared real", expected=f"a real tensor of shape {expected}")
            if value.device.type == "meta":
                raise InputError(f"input '{declared.name}' is on the meta device, which holds no values", expected="a tensor with values (on cpu, cuda, ...)")
            rank = declared.type.rank
            shape = tuple(value.shape)
            if value.dim() < rank + lead_dims or shape[value.dim() - rank :] != declared.type.shape:
                axes = "batch, time" if time_axis else "batch (one step: no time axis)"
                raise InputError(
                    f"input '{declared.name}' has shape {list(shape)}",
                    expected=f"{expected}: {axes}, optional head dims, then its declared shape [{', '.join(map(str, declared.type.shape))}]",
                )
            lead = shape[: value.dim() - rank]
            if value.device != first.device:
                raise InputError(
                    f"input '{declared.name}' is on {value.device} but input '{self.cell.inputs[0].name}' is on {first.device}",
                    expected="every input, state and param on one device",
                )
            if reference is None:
                reference = (declared.name, lead)
            elif lead != reference[1]:
                raise InputError(
                    f"input '{declared.name}' has leading dims {list(lead)} but input '{reference[0]}' has {list(reference[1])}",
                    expected="the same [B, T, *heads] for every input" if time_axis else "the same [B, *heads] for every input",
                )
        assert reference is not None
        lead = reference[1]
        if not time_axis:
            return lead[0], 1, lead[1:]
        if lead[1] == 0:
            raise InputError("the sequences are empty (T = 0)", expected="at least one time step")
        return lead[0], lead[1], lead[2:]

    def _accepted_inputs(self, inputs: dict[str, Any], time_axis: bool) -> tuple[int, int, tuple[int, ...]] | None:
        """``(B, T, heads)`` when every input passes :meth:`_check_inputs`' checks, else None (that
        method then finds the first failure and says what it is): the checks of a call that
        passes them, without building the messages of the ones that fail."""
        lead = None
        device = None
        lead_dims = 2 if time_axis else 1
        for declared in self.cell.inputs:
            value = inputs[declared.name]
            if not isinstance(value, torch.Tensor):
                return None
            complex_value = value.is_complex()
            if not (complex_value or value.is_floating_point()) or (complex_value and declared.type.kind is not Kind.COMPLEX):
                return None
            shape = value.shape
            rank = declared.type.rank
            split = len(shape) - rank
            if split < lead_dims or shape[split:] != declared.type.shape:
                return None
            if lead is None:
                lead, device = shape[:split], value.device
                if device.type == "meta":
                    return None
            elif shape[:split] != lead or value.device != device:
                return None
        if lead is None:
            return None
        if not time_axis:
            return lead[0], 1, tuple(lead[1:])
        if lead[1] == 0:
            return None
        return lead[0], lead[1], tuple(lead[2:])

    def _numerics(self, inputs: dict[str, torch.Tensor]):
        from .backends.torch_ops import Numerics

        input_dtypes = [_real_dtype(v.dtype) for v in inputs.values()]
        compute = input_dtypes[0]
        # (torch.promote_types is a dispatched op: called only where two dtypes differ)
        for dtype in input_dtypes[1:] + [_real_dtype(p.dtype) for p in self._parameter_list()] + [self._dtype_anchor.dtype]:
            if dtype != compute:
                compute = torch.promote_types(compute, dtype)
        output_dtype = input_dtypes[0]
        for dtype in input_dtypes[1:]:
            if dtype != output_dtype:
                output_dtype = torch.promote_types(output_dtype, dtype)
        if compute in _LOW_PRECISION:
            compute = torch.float32  # accumulate low-precision inputs in fp32
        device = next(iter(inputs.values())).device
        return Numerics(compute, device), (output_dtype if output_dtype in _LOW_PRECISION else None)

    def initial_state(self, batch_size: int, *heads: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The state a call starts from when none is given: ``{name: [B, *heads, *shape]}``."""
        from .backends.torch_ops import Numerics

        device = torch.device(device) if device is not None else next((p.device for p in self.parameters()), torch.device("cpu"))
        numerics = Numerics(_real_dtype(dtype), device)
        return self._initial_state(numerics, (batch_size, *heads))

    def _parameter_list(self) -> list[nn.Parameter]:
        """The module's params, as ``self.parameters()`` lists them (its own, when it has no submodules)."""
        if self._modules:
            return list(self.parameters())
        return [p for p in self._parameters.values() if p is not None]

    def _named_parameter_items(self):
        """``self.named_parameters()``, without its generator machinery when the module has no submodules."""
        if self._modules:
            return list(self.named_parameters())
        return [(name, p) for name, p in self._parameters.items() if p is not None]

    def _initial_state(self, numerics, lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """The declared initial values, ``{name: [*lead, *shape]}``, states then scan carries.

        Values that read no param (``state h = 0``) are evaluated once per (dtype, device),
        kept on this module like the consts, and only expanded per call; values that read
        params (which change between calls) are evaluated every call.
        """
        key = (numerics.real, numerics.device)
        cache = self.__dict__.setdefault("_initial_values", {})
        values = cache.get(key)
        if values is None:
            values = self._evaluate_initial_values(numerics, reads_params=False)
            if not _tracing():
                cache[key] = values
        order = self._initial_order()
        if len(values) < len(order):
            values = {**values, **self._evaluate_initial_values(numerics, reads_params=True)}
        state = {}
        for name, init, declared in order:
            state[name] = values[name].expand(lead + declared.shape)
        return state

    def _initial_order(self) -> list[tuple[str, ir.Expr, ir.Type]]:
        """Each state and scan carry: its name, initial value and declared type."""
        inits = [(s.name, s.init, s.type) for s in self.cell.states]
        for scan in self.cell.scans:
            inits += [(f"{scan.name}.{c.name}", c.identity, c.type) for c in scan.monoid.carries]
        return inits

    def _evaluate_initial_values(self, numerics, reads_params: bool) -> dict[str, torch.Tensor]:
        """The unexpanded initial values of the states and carries whose initial value reads a
        param (``reads_params``), or of those that read none."""
        from .backends.torch_ops import Evaluator

        chosen = [(name, init, declared) for name, init, declared in self._initial_order() if any(ref.kind is RefKind.PARAM for ref in ir.refs(init)) == reads_params]
        if not chosen:
            return {}
        values = self._consts(numerics)
        # Only the params an initial value reads are cast (a bfloat16 weight matrix is not copied for `state h = 0`).
        read = {ref.label for _, init, _ in chosen for ref in ir.refs(init) if ref.kind is RefKind.PARAM}
        for name, param in self.named_parameters():
            if name in read:
                values[(RefKind.PARAM, name)] = param.to(numerics.dtype_of(Kind.COMPLEX if param.is_complex() else Kind.REAL))
        evaluator = Evaluator(numerics, values)
        if reads_params:
            return {name: evaluator.evaluate(init).to(numerics.dtype_of(declared.kind)) for name, init, declared in chosen}
        # Kept across calls: made outside inference_mode (a later backward could not save them
        # otherwise) and outside any autograd graph.
        with torch.inference_mode(False), torch.no_grad():
            return {name: evaluator.evaluate(init).to(numerics.dtype_of(declared.kind)) for name, init, declared in chosen}

    def _carried_types(self) -> dict[str, ir.Type]:
        types = {s.name: s.type for s in self.cell.states}
        for scan in self.cell.scans:
            types.update({f"{scan.name}.{c.name}": c.type for c in scan.monoid.carries})
        return types

    def _check_param_devices(self, device: torch.device) -> None:
        for name, param in self._named_parameter_items():
            if param.device != device:
                raise InputError(
                    f"param '{name}' is on {param.device} but the inputs are on {device}",
                    expected=f"module.to('{device}') (params and inputs on one device)",
                )

    @staticmethod
    def _check_state_value(name: str, value: torch.Tensor, declared: ir.Type, device: torch.device) -> None:
        """A given state value must be a float (or, for a complex state, complex) tensor on the inputs' device.

        Casting would lose information silently: the imaginary part of a complex value for
        a real state, or the fraction of an integer one's later updates.
        """
        if not (value.is_floating_point() or value.is_complex()):
            raise InputError(f"state '{name}' has dtype {value.dtype}", expected="a floating-point (or, for a complex state, complex) tensor")
        if value.is_complex() and declared.kind is not Kind.COMPLEX:
            raise InputError(f"state '{name}' is complex but is declared real", expected=f"a real tensor ({value.dtype} would lose its imaginary part)")
        if value.device != device:
            raise InputError(f"state '{name}' is on {value.device} but the inputs are on {device}", expected="every input, state and param on one device")

    def forward(
        self,
        *args: torch.Tensor,
        state: Mapping[str, torch.Tensor] | None = None,
        return_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs: torch.Tensor,
    ):
        """Run the cell over whole sequences (see the class docstring).

        ``cu_seqlens``: several sequences of different lengths packed along time, as in
        flash-linear-attention: inputs ``[1, total_T, *heads, *shape]`` and offsets, an
        int64 tensor ``[N + 1]`` rising from 0 to ``total_T``; sequence ``n`` is steps
        ``cu_seqlens[n]`` to ``cu_seqlens[n + 1] - 1``.  Every state starts afresh at each
        sequence's first step (a reverse state at its last step), and ``state=`` and the
        returned state are ``[N, *heads, *shape]`` (a reverse state's value at each
        sequence's first step; ``plan.varlen`` says how the backend does it).
        """
        inputs = self._bind_inputs(args, kwargs)
        batch, steps, heads = self._check_inputs(inputs)
        segments = None
        if cu_seqlens is not None:
            segments = self._check_offsets(cu_seqlens, batch, steps, next(iter(inputs.values())).device)
            batch = segments.count  # states are per sequence
        numerics, output_dtype = self._numerics(inputs)
        self._check_param_devices(numerics.device)
        lead = (batch, *heads)
        carried = self._given_state(state, self._initial_state(numerics, lead), lead, numerics)
        # bfloat16/float16 values go to the kernels of a NATIVE plan as they are (packed batches: cast).
        native = segments is None and self.plan.for_device(numerics.device.type).low_precision is LowPrecisionInputs.NATIVE
        cast_inputs, params, consts = self._cast(inputs, numerics, native)
        if segments is not None:
            from .backends.segments import run_packed

            on_gpu = self._run_on_gpu is not None and numerics.device.type == "cuda"
            plan, run = (self.plan.gpu, self._run_on_gpu) if on_gpu else (self.plan, self._run)
            reporting = {"report": self._record_solve} if plan.backend is BackendKind.NEWTON else {}
            outputs, final = run_packed(run, plan, segments, cast_inputs, params, consts, carried, numerics, **reporting)
        elif self._run_on_gpu is not None and numerics.device.type == "cuda":
            reporting = {"report": self._record_solve, "previous": self.last_solve} if self.plan.gpu.backend is BackendKind.NEWTON else {}
            outputs, final = self._run_on_gpu(self.plan.gpu, cast_inputs, params, consts, carried, numerics, **reporting)
        else:
            reporting = {"report": self._record_solve, "previous": self.last_solve} if self.plan.backend is BackendKind.NEWTON else {}
            outputs, final = self._run(self.plan, cast_inputs, params, consts, carried, numerics, **reporting)
        if output_dtype is not None:
            outputs = [o if o.is_complex() else o.to(output_dtype) for o in outputs]
        result = outputs[0] if len(outputs) == 1 else tuple(outputs)
        if return_state:
            return result, final
        return result

    def _given_state(self, state: Mapping[str, torch.Tensor] | None, carried: dict[str, torch.Tensor], lead: tuple[int, ...], numerics) -> dict[str, torch.Tensor]:
        """``carried`` (the declared initial values, ``[*lead, *shape]``) with the values given in ``state``, checked and cast."""
        if state is not None:
            types = self._carried_types()
            if not isinstance(state, Mapping):
                raise InputError(f"state must be a dict of tensors, got {type(state).__name__}", expected="the dict returned with return_state=True")
            for name, value in state.items():
                if name not in types:
                    raise InputError(f"cell {self.cell.name} has no state '{name}'", expected="keys among: " + ", ".join(types))
                declared = types[name]
                if not isinstance(value, torch.Tensor) or tuple(value.shape) not in (lead + declared.shape, declared.shape):
                    got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise InputError(f"state '{name}' has shape {got}", expected=f"[{', '.join(map(str, lead + declared.shape))}] (batch, heads, then the declared shape)")
                self._check_state_value(name, value, declared, numerics.device)
                carried[name] = value.to(numerics.dtype_of(declared.kind)).expand(lead + declared.shape)
        return carried

    def _cast(self, inputs: dict[str, torch.Tensor], numerics, native: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The inputs, params and consts in the computing dtype; with ``native``
        (:attr:`LowPrecisionInputs.NATIVE`) real bfloat16/float16 inputs and params are left in
        their own dtype, for kernels that convert them as they load them."""

        def keep(value: torch.Tensor) -> bool:
            return native and value.dtype in _LOW_PRECISION

        def cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return value if value.dtype == dtype else value.to(dtype)  # .to of the same dtype is a dispatch for nothing

        cast_inputs = {
            d.name: inputs[d.name] if keep(inputs[d.name]) and d.type.kind is Kind.REAL else cast(inputs[d.name], numerics.dtype_of(d.type.kind if inputs[d.name].is_complex() or d.type.kind is Kind.COMPLEX else Kind.REAL))
            for d in self.cell.inputs
        }
        params = {
            name: p if keep(p) else cast(p, numerics.complex if p.is_complex() else numerics.real) for name, p in self._named_parameter_items()
        }
        consts = {name: value for (_, name), value in self._consts(numerics).items()}
        return cast_inputs, params, consts

    # ---- packed variable-length batches
    def _check_offsets(self, cu_seqlens: Any, batch: int, steps: int, device: torch.device):
        """Validate ``cu_seqlens`` against inputs ``[batch, steps, ...]``; return the :class:`~recdsl.backends.segments.Segments`."""
        from .backends.segments import Segments

        first = self.cell.inputs[0].name
        expected = f"cu_seqlens: an int64 tensor [N + 1] rising from 0 to total_T = {steps} (the inputs' time length)"
        if not isinstance(cu_seqlens, torch.Tensor):
            raise InputError(f"cu_seqlens is a {type(cu_seqlens).__name__}, not a torch.Tensor", expected=expected)
        if cu_seqlens.dtype not in (torch.int64, torch.int32):
            raise InputError(f"cu_seqlens has dtype {cu_seqlens.dtype}", expected=expected)
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise InputError(f"cu_seqlens has shape {list(cu_seqlens.shape)}", expected=expected + ", at least [0, total_T]")
        if batch != 1:
            raise InputError(
                f"input '{first}' has batch size {batch} with cu_seqlens",
                expected=f"the sequences packed along time into one batch row: [1, total_T, *heads, *shape] (here total_T = {steps})",
            )
        offsets = tuple(int(v) for v in cu_seqlens.tolist())
        if offsets[0] != 0:
            raise InputError(f"cu_seqlens starts at {offsets[0]}", expected=expected + ", so it starts at 0")
        if offsets[-1] != steps:
            raise InputError(f"cu_seqlens ends at {offsets[-1]} but input '{first}' has {steps} time steps", expected=expected)
        for n, (start, end) in enumerate(zip(offsets, offsets[1:])):
            if end <= start:
                raise InputError(
                    f"cu_seqlens is not increasing: sequence {n} runs from {start} to {end}",
                    expected=expected + ", strictly increasing (every sequence at least one step)",
                )
        return Segments.of(offsets, device)

    # ---- one step at a time
    def _step_refusal(self) -> str | None:
        """Why :meth:`step` cannot run this cell, or None.

        A state (or scan) that runs backwards in time has at step t the value computed from
        steps t..T-1, which a decoder has not seen yet.
        """
        backwards = list(self.cell.reversed_recurrences)
        if backwards:
            names = ", ".join(f"'{name}'" for name in backwards)
            return f"state {names} of cell {self.cell.name} runs backwards in time: its value at a step depends on the steps after it"
        return None

    def step(self, *args: torch.Tensor, state: Mapping[str, torch.Tensor] | None = None, **kwargs: torch.Tensor):
        """One time step, for decoding: inputs ``[B, *heads, *shape]`` (no time axis) -> ``(outputs, new_state)``.

        ``outputs`` is one tensor ``[B, *heads, *shape]`` per ``out`` line (the tensor
        itself when there is one); ``new_state`` is the dict ``forward(..., return_state=True)``
        returns, to pass to the next call.  ``state=None`` starts from the declared
        initial state.  A loop of ``step`` gives what ``forward`` gives over the whole
        sequence.  The step is the sequential backend's loop body evaluated from the IR
        (whatever backend the module was compiled for), so nothing is planned per call.
        """
        refusal = self._step_refusal()
        if refusal is not None:
            raise BackendError(f"step() cannot run one step at a time: {refusal}", expected="forward() over the whole sequence")
        inputs = self._bind_inputs(args, kwargs)
        batch, _, heads = self._check_inputs(inputs, time_axis=False)
        numerics, output_dtype = self._numerics(inputs)
        self._check_param_devices(numerics.device)
        lead = (batch, *heads)
        # Decoding passes every state back each call: evaluate the declared initial values only when one is missing.
        complete = isinstance(state, Mapping) and all(name in state for name in self._carried_types())
        carried = self._given_state(state, {} if complete else self._initial_state(numerics, lead), lead, numerics)
        cast_inputs, params, consts = self._cast(inputs, numerics)
        one_step = {name: value.unsqueeze(1) for name, value in cast_inputs.items()}  # [B, 1, *heads, *shape]
        outputs, final = self._run_step(self.plan, one_step, params, consts, carried, numerics)
        outputs = [o.squeeze(1) for o in outputs]
        if output_dtype is not None:
            outputs = [o if o.is_complex() else o.to(output_dtype) for o in outputs]
        return (outputs[0] if len(outputs) == 1 else tuple(outputs)), final

    def _record_solve(self, solve: Any) -> None:
        self.last_solve = solve

    def extra_repr(self) -> str:
        dims = ", ".join(f"{n}={v}" for n, v in self.cell.dims)
        return f"cell={self.cell.name}({dims}), backend={self.backend}"


def compile(
    source_or_path: str | Path,
    backend: str = "auto",
    *,
    cell: str | None = None,
    chunk_size: int | None = None,
    max_elements: int | None = None,
    backend_options: Mapping[str, Any] | None = None,
    allow_tf32: bool = False,
    dims: Mapping[str, int | float] | None = None,
    **dim_values: int | float,
) -> CompiledCell:
    """Compile a recdsl program to a ``torch.nn.Module``.

    ``source_or_path`` is the program text or a path to a ``.rec`` file; ``cell`` picks one
    cell when the file defines several; the cell's dims are bound by keywords (``d=64``)
    or by the mapping ``dims`` (``dims={"d": 64}``, the only way for a dim named like a
    keyword of this function, e.g. ``cell``); those with defaults may be left out.
    ``backend`` is ``auto`` or a name from :data:`recdsl.backends.BACKENDS`
    (``sequential``, ``scan``, ``chunked``, ``triton``, ``newton``); ``chunk_size`` sets the chunk
    length of the chunked form (default 64).  ``max_elements`` caps the elements of
    every param, const, state and per-step value (default ``$RECDSL_MAX_ELEMENTS`` or
    2 ** 28, see :mod:`recdsl.limits`); a larger one is a located ``DimensionError``.
    ``backend_options`` passes options to the chosen backend (the newton backend's
    ``jacobian``, ``tolerance``, ``max_iterations``, ``warm_start``).  ``allow_tf32`` lets the Triton
    kernels multiply float32 matrices as TF32 (faster on tensor cores, about 1e-3
    relative error); by default float32 products are exact.

    >>> import torch, recdsl
    >>> mod = recdsl.compile('''
    ... cell Ema(d, decay = 0.9) {
    ...     input x: [d]
    ...     state h: [d] = 0
    ...     h = decay * h + (1 - decay) * x
    ...     out h
    ... }''', d=4)
    >>> mod(torch.ones(2, 3, 4)).shape
    torch.Size([2, 3, 4])
    """
    from .frontend import check_option_clashes, check_option_types, dim_arguments
    from .limits import check_sizes, element_budget

    check_option_types("compile", cell, backend)
    bound = dim_arguments("compile", dims, dim_values)
    budget = element_budget(max_elements)
    cell_ir = load(source_or_path, cell=cell, dims=bound)
    try:
        check_option_clashes("compile", {"chunk_size": chunk_size, "max_elements": max_elements, "backend_options": backend_options, "allow_tf32": allow_tf32 or None}, cell_ir, bound)
        check_sizes(cell_ir, budget)
        analysis = analyze(cell_ir)
        return CompiledCell(analysis, backend, chunk_size, backend_options, allow_tf32)
    except RecDSLError as error:
        raise error.located(read_source(source_or_path)) from None
