"""Property-based checks that every backend agrees with the sequential reference, on your own cell.

>>> from recdsl.testing import check_equivalence
>>> report = check_equivalence("examples/mingru.rec", dims={"d_in": 3, "d": 4}, max_examples=5)
>>> report.ok
True

:func:`check_equivalence` lets Hypothesis choose the batch size, the sequence length
(1, lengths around the chunk size, and others), head dims, the random inputs and whether
an initial state is given; it compares outputs, final states and the gradients with
respect to inputs, params and the initial state, and shrinks a failure to a minimal
counterexample that it prints as a runnable snippet.  :func:`check_monoid_laws` tests that
each declared monoid's combine is associative and has the declared identity.

Everything runs in float64 so that tolerances can be tight; ``recdsl check FILE`` runs
both from the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import ir
from .errors import RecDSLError
from .module import CompiledCell, compile

DEFAULT_ATOL = 1e-8
DEFAULT_RTOL = 1e-6


@dataclass(frozen=True)
class Example:
    """One concrete test case: everything needed to rebuild the inputs."""

    batch: int
    length: int
    heads: tuple[int, ...]
    seed: int
    with_state: bool


@dataclass(frozen=True)
class Mismatch:
    """A quantity on which a backend disagrees with the sequential reference."""

    backend: str
    quantity: str  # e.g. "output 0", "final state h", "gradient of param W"
    max_error: float
    tolerance: float

    def __str__(self) -> str:
        return f"{self.backend}: {self.quantity} differs by {self.max_error:.3e} (tolerance {self.tolerance:.3e})"


@dataclass
class Report:
    """What :func:`check_equivalence` found; ``ok`` when every backend agreed on every example."""

    cell: str
    backends: tuple[str, ...]
    examples: int = 0
    skipped: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    counterexample: Example | None = None
    snippet: str | None = None
    error: str | None = None
    note: str | None = None  # why no backend besides sequential applies

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.error is None

    def __str__(self) -> str:
        if not self.backends and self.error is None:
            return f"cell {self.cell}: only the sequential backend applies ({self.note}); nothing to compare"
        head = f"cell {self.cell}: backends {', '.join(self.backends)}"
        if self.ok:
            skipped = f", {self.skipped} skipped (non-finite reference)" if self.skipped else ""
            return f"{head} agree with sequential on {self.examples} examples{skipped} (outputs, final states, gradients)"
        lines = [f"{head}: FAILED"]
        if self.error:
            lines.append(f"  {self.error}")
        lines.extend(f"  {m}" for m in self.mismatches)
        if self.counterexample is not None:
            c = self.counterexample
            lines.append(f"  minimal counterexample: B={c.batch}, T={c.length}, heads={c.heads}, seed={c.seed}, initial state given={c.with_state}")
        if self.snippet:
            lines.append("  reproduce with:")
            lines.extend("    " + line for line in self.snippet.splitlines())
        return "\n".join(lines)


def random_inputs(module: CompiledCell, example: Example, scale: float = 0.5) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Inputs (and an initial state if ``example.with_state``) drawn from ``example.seed``, float64."""
    generator = torch.Generator().manual_seed(example.seed)

    def draw(shape: tuple[int, ...], kind: ir.Kind) -> torch.Tensor:
        real = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
        if kind is ir.Kind.COMPLEX:
            return torch.complex(real, scale * torch.randn(shape, generator=generator, dtype=torch.float64))
        return real

    inputs = {i.name: draw((example.batch, example.length, *example.heads, *i.type.shape), i.type.kind) for i in module.cell.inputs}
    state = None
    if example.with_state:
        start = module.initial_state(example.batch, *example.heads, dtype=torch.float64)
        state = {}
        for name, value in start.items():
            kind = ir.Kind.COMPLEX if value.is_complex() else ir.Kind.REAL
            noise = draw(tuple(value.shape), kind)
            # Keep -inf where the declared start is -inf (a max-plus stabiliser's identity).
            state[name] = torch.where(torch.isinf(value), value, noise) if not value.is_complex() else noise
    return inputs, state


def _leaves(outputs) -> list[torch.Tensor]:
    return list(outputs) if isinstance(outputs, tuple) else [outputs]


def _run(module: CompiledCell, inputs: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None, seed: int):
    """Outputs, final state and gradients of a fixed random projection of both."""
    leaf_inputs = {n: v.detach().clone().requires_grad_(True) for n, v in inputs.items()}
    leaf_state = None if state is None else {n: v.detach().clone().requires_grad_(bool(torch.isfinite(v).all())) for n, v in state.items()}
    module.zero_grad(set_to_none=True)
    outputs, final = module(**leaf_inputs, state=leaf_state, return_state=True)
    outputs = _leaves(outputs)
    generator = torch.Generator().manual_seed(seed + 7919)
    loss = 0.0
    for value in outputs + [final[k] for k in sorted(final)]:
        weights = torch.randn(value.shape, generator=generator, dtype=torch.float64).to(value.device)
        part = value.real if value.is_complex() else value
        finite = torch.isfinite(part)
        loss = loss + (torch.where(finite, part, torch.zeros_like(part)) * weights).sum()
        if value.is_complex():
            loss = loss + (value.imag * torch.randn(value.shape, generator=generator, dtype=torch.float64).to(value.device)).sum()
    gradients: dict[str, torch.Tensor] = {}
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()
        for name, value in leaf_inputs.items():
            if value.grad is not None:
                gradients[f"gradient of input {name}"] = value.grad
        for name, param in module.named_parameters():
            if param.grad is not None:
                gradients[f"gradient of param {name}"] = param.grad.clone()
        if leaf_state is not None:
            for name, value in leaf_state.items():
                if value.grad is not None:
                    gradients[f"gradient of initial state {name}"] = value.grad
    named = {f"output {i}": o.detach() for i, o in enumerate(outputs)}
    named.update({f"final state {k}": v.detach() for k, v in final.items()})
    named.update(gradients)
    return named


def _compare(backend: str, expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], atol: float, rtol: float) -> list[Mismatch]:
    mismatches = []
    for quantity, reference in expected.items():
        value = actual.get(quantity)
        if value is None:
            mismatches.append(Mismatch(backend, f"{quantity} (missing)", math.inf, 0.0))
            continue
        reference = reference.to(value.dtype)
        finite = torch.isfinite(reference)
        if not torch.equal(finite, torch.isfinite(value)) or not torch.equal(reference[~finite], value[~finite]):
            mismatches.append(Mismatch(backend, f"{quantity} (non-finite values differ)", math.inf, 0.0))
            continue
        if not finite.any():
            continue
        scale = reference[finite].abs().max().item()
        tolerance = atol + rtol * scale
        error = (value[finite] - reference[finite]).abs().max().item()
        if not error <= tolerance:
            mismatches.append(Mismatch(backend, quantity, error, tolerance))
    return mismatches


def compare_backends(
    module: CompiledCell,
    backends: Sequence[str],
    inputs: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor] | None = None,
    *,
    seed: int = 0,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    backend_options: Mapping[str, object] | None = None,
) -> list[Mismatch]:
    """Run ``module``'s cell on each backend and on the sequential reference; list the disagreements.

    The backends share ``module``'s parameters.  Compared: every output, every final
    state, and the gradients of a fixed random projection of both with respect to the
    inputs, the params and (if given) the initial state.  With ``device`` (``"cuda"``) the
    backends run there, on copies of the inputs, while the reference stays on the CPU.
    ``backend_options`` go to every backend compared (not to the reference).
    """
    reference_module = _with_backend(module, "sequential", None)
    expected = _run(reference_module, inputs, state, seed)
    if device is not None:
        inputs = {n: v.to(device) for n, v in inputs.items()}
        state = None if state is None else {n: v.to(device) for n, v in state.items()}
    mismatches = []
    for name in backends:
        other = _with_backend(module, name, chunk_size, backend_options)
        if device is not None:
            other = other.to(device)
        actual = {quantity: value.cpu() for quantity, value in _run(other, inputs, state, seed).items()}
        mismatches.extend(_compare(name, expected, actual, atol, rtol))
    return mismatches


def _with_backend(module: CompiledCell, backend: str, chunk_size: int | None, backend_options: Mapping[str, object] | None = None) -> CompiledCell:
    other = CompiledCell(module.analysis, backend, chunk_size if backend == "chunked" else None, backend_options)
    other.load_state_dict(module.state_dict())
    return other.to(torch.float64)


def available_backends(module: CompiledCell) -> tuple[str, ...]:
    """The backends other than ``sequential`` that can run ``module``'s cell on this machine.

    ``triton`` counts on a CPU only when ``TRITON_INTERPRET=1`` (the tests here run on CPU tensors).
    """
    import os

    from .plan import BackendKind, PlanOptions, Unsupported, plan_backend

    runnable = [b for b in BackendKind if b is not BackendKind.SEQUENTIAL]
    if os.environ.get("TRITON_INTERPRET") != "1":
        runnable.remove(BackendKind.TRITON)
    return tuple(b.value for b in runnable if not isinstance(plan_backend(module.analysis, b, PlanOptions()), Unsupported))


def _snippet(source: str, cell: str | None, dims: Mapping[str, object], backends: Sequence[str], example: Example, scale: float, chunk_size: int, param_seed: int) -> str:
    arguments = ", ".join([repr(source)] + ([f"cell={cell!r}"] if cell else []) + ([f"dims={dict(dims)!r}"] if dims else []))
    return "\n".join(
        [
            "import torch, recdsl",
            "from recdsl.testing import Example, compare_backends, random_inputs",
            f"torch.manual_seed({param_seed})",
            f"module = recdsl.compile({arguments}).double()",
            f"example = Example(batch={example.batch}, length={example.length}, heads={example.heads!r}, seed={example.seed}, with_state={example.with_state})",
            f"inputs, state = random_inputs(module, example, scale={scale})",
            f"for mismatch in compare_backends(module, {list(backends)!r}, inputs, state, seed={example.seed}, chunk_size={chunk_size}):",
            "    print(mismatch)",
        ]
    )


def _require_hypothesis() -> None:
    """Hypothesis is a dependency of recdsl; a broken or stripped install gets a hint, not a traceback."""
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise RecDSLError("recdsl check needs the hypothesis package, which is not installed", expected="pip install hypothesis (or pip install recdsl)") from None


def check_equivalence(
    source_or_path: str | Path,
    *,
    cell: str | None = None,
    dims: Mapping[str, int | float] | None = None,
    backends: Sequence[str] | None = None,
    max_examples: int = 25,
    chunk_size: int = 8,
    input_scale: float = 0.5,
    max_length: int | None = None,
    param_seed: int = 0,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    hypothesis_seed: int | None = None,
    on_example: Callable[[], None] | None = None,
) -> Report:
    """Hypothesis-driven equivalence of ``backends`` (default: all that apply) with the sequential reference.

    Params are drawn with ``torch.manual_seed(param_seed)``; inputs are normal with std
    ``input_scale``.  Lengths include 1 and lengths just below, at and above multiples of
    ``chunk_size`` (the chunked backend runs with that chunk size so that short sequences
    cross chunk boundaries).  Examples whose reference is not finite are skipped.
    ``on_example`` is called after each compared example (a progress bar's ``update``).
    """
    _require_hypothesis()
    from hypothesis import HealthCheck, assume, given, seed, settings
    from hypothesis import strategies as st

    dims = dict(dims or {})
    torch.manual_seed(param_seed)
    module = compile(source_or_path, cell=cell, dims=dims).to(torch.float64)
    chosen = tuple(backends) if backends is not None else available_backends(module)
    report = Report(module.cell.name, chosen)
    if not chosen:
        from .backends.parallel import unsupported

        report.note = unsupported(module.analysis)
        return report
    longest = max_length or 3 * chunk_size + 3
    # Any length, or one at a chunk boundary; integers first so that failures shrink to the shortest length.
    lengths = st.one_of(
        st.integers(1, longest),
        st.sampled_from(sorted({1, 2, chunk_size - 1, chunk_size, chunk_size + 1, 2 * chunk_size + 3} - {0})).filter(lambda n: 1 <= n <= longest),
    )
    examples = st.builds(
        Example,
        batch=st.integers(1, 3),
        length=lengths,
        heads=st.sampled_from([(), (2,), (1, 2)]),
        seed=st.integers(0, 2**16),
        with_state=st.booleans(),
    )
    failures: list[tuple[Example, list[Mismatch]]] = []
    reference_module = _with_backend(module, "sequential", None)

    @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=False)
    @given(examples)
    def property_holds(example: Example) -> None:
        inputs, state = random_inputs(module, example, input_scale)
        with torch.no_grad():
            reference = _leaves(reference_module(**inputs, state=state))
        finite = all(bool(torch.isfinite(r).all()) for r in reference)
        if not finite:
            report.skipped += 1
        assume(finite)
        report.examples += 1
        mismatches = compare_backends(module, chosen, inputs, state, seed=example.seed, atol=atol, rtol=rtol, chunk_size=chunk_size)
        if on_example is not None:
            on_example()
        if mismatches:
            failures.append((example, mismatches))
        assert not mismatches, "; ".join(str(m) for m in mismatches)

    runner = seed(hypothesis_seed)(property_holds) if hypothesis_seed is not None else property_holds
    try:
        runner()
    except AssertionError:
        example, mismatches = failures[-1]  # Hypothesis replays the shrunk example last
        report.mismatches = mismatches
        report.counterexample = example
        report.snippet = _snippet(str(source_or_path), cell, dims, chosen, example, input_scale, chunk_size, param_seed)
    except RecDSLError as error:
        report.error = str(error)
    except Exception as error:  # an unsatisfiable search (every reference non-finite), or a crash of a backend
        report.error = f"{type(error).__name__}: {error}"
        if failures:
            report.counterexample = failures[-1][0]
    return report


# ---- monoid laws -----------------------------------------------------------------------


@dataclass(frozen=True)
class LawViolation:
    """A declared monoid's law that fails on concrete carries."""

    monoid: str
    law: str  # "associativity", "left identity", "right identity", "identity with itself"
    carry: str
    max_error: float
    operands: dict

    def __str__(self) -> str:
        shown = "; ".join(f"{side} = {{{', '.join(f'{k}: {v}' for k, v in values.items())}}}" for side, values in self.operands.items())
        return f"monoid {self.monoid}: {self.law} fails for carry '{self.carry}' (error {self.max_error:.3e}) with {shown}"


def check_monoid_laws(
    source_or_path: str | Path,
    *,
    cell: str | None = None,
    dims: Mapping[str, int | float] | None = None,
    max_examples: int = 50,
    scale: float = 2.0,
    atol: float = 1e-9,
    rtol: float = 1e-7,
) -> list[LawViolation]:
    """Test associativity and identity of every monoid a cell scans with, on random carries.

    Returns the shrunk counterexample of each law that fails (an empty list when all hold).
    """
    _require_hypothesis()
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from .backends.torch_ops import Evaluator, Numerics, combine_carries

    module = compile(source_or_path, cell=cell, dims=dims)
    numerics = Numerics(torch.float64, torch.device("cpu"))
    violations: list[LawViolation] = []
    for scan in module.cell.scans:
        monoid = scan.monoid
        identity = {c.name: Evaluator(numerics, {}).evaluate(c.identity).to(numerics.dtype_of(c.type.kind)).expand(c.type.shape) for c in monoid.carries}

        def draw(seed_value: int) -> dict[str, torch.Tensor]:
            generator = torch.Generator().manual_seed(seed_value)
            carries = {}
            for c in monoid.carries:
                value = scale * torch.randn(c.type.shape, generator=generator, dtype=torch.float64)
                if c.type.kind is ir.Kind.COMPLEX:
                    value = torch.complex(value, scale * torch.randn(c.type.shape, generator=generator, dtype=torch.float64))
                carries[c.name] = value
            return carries

        def combine(a, b):
            return combine_carries(monoid, a, b, numerics)

        found: dict[str, LawViolation] = {}

        def worst(left, right) -> tuple[str, float] | None:
            for c in monoid.carries:
                x, y = left[c.name], right[c.name]
                both_inf = torch.isinf(x) & torch.isinf(y) & (x == y)
                difference = torch.where(both_inf, torch.zeros_like(x.real if x.is_complex() else x), (x - y).abs())
                error = difference.max().item() if difference.numel() else 0.0
                tolerance = atol + rtol * max(y[torch.isfinite(y)].abs().max().item() if torch.isfinite(y).any() else 0.0, 1.0)
                if not error <= tolerance:
                    return c.name, error
            return None

        def record(law: str, operands: dict, left, right) -> bool:
            bad = worst(left, right)
            if bad is None:
                return True
            shown = {side: {k: [round(v, 4) for v in t.flatten().tolist()] if t.dim() else round(t.item(), 4) for k, t in values.items()} for side, values in operands.items()}
            found[law] = LawViolation(monoid.name, law, bad[0], bad[1], shown)
            return False

        @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=False)
        @given(st.integers(0, 2**16), st.integers(0, 2**16), st.integers(0, 2**16))
        def laws_hold(seed_a: int, seed_b: int, seed_c: int) -> None:
            a, b, c = draw(seed_a), draw(seed_b), draw(seed_c)
            ok = record("associativity", {"a": a, "b": b, "c": c}, combine(combine(a, b), c), combine(a, combine(b, c)))
            ok &= record("left identity", {"a": a}, combine(identity, a), a)
            ok &= record("right identity", {"a": a}, combine(a, identity), a)
            # The identity with itself: random carries never hit its special values (a -inf
            # max, whose exp(-inf - -inf) is NaN), and a parallel scan combines padding so.
            ok &= record("identity with itself", {"a": identity}, combine(identity, identity), identity)
            assert ok

        try:
            laws_hold()
        except AssertionError:
            pass
        violations.extend(found.values())
    return violations


def assert_backends_agree(source_or_path: str | Path, **options) -> Report:
    """:func:`check_equivalence`, raising ``AssertionError`` with the report when it fails (for test suites)."""
    report = check_equivalence(source_or_path, **options)
    if not report.ok:
        raise AssertionError(str(report))
    return report


__all__ = [
    "Example",
    "Mismatch",
    "Report",
    "LawViolation",
    "random_inputs",
    "compare_backends",
    "available_backends",
    "check_equivalence",
    "check_monoid_laws",
    "assert_backends_agree",
]
