"""State tracking with negative eigenvalues: a reproduction of Grazzi, Siems et al. (2024).

"Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues" (arXiv:2411.12537)
shows that a linear RNN whose transition matrices have eigenvalues in [0, 1] cannot solve
parity, and that extending the range to [-1, 1] lets DeltaNet and Mamba learn it.  This
script trains the paper's two kinds of cell, compiled by recdsl from
``examples/train/state_tracking.rec``, on two of its tasks, for both ranges:

- cells: DeltaNet (transition ``I - beta k k^T``, ``beta`` in (0, 1) or (0, 2)) and a
  diagonal linear RNN with Mamba's decay ``exp(-softplus(g))`` in (0, 1) or its
  extension ``2 exp(-softplus(g)) - 1`` in (-1, 1);
- tasks (from Deletang et al., 2023): parity of a bit string, and modular arithmetic
  without brackets (numbers mod 5 and the operators + - * with the usual precedence).

Models are trained on lengths 3 to 40 and evaluated on longer sequences; the table reports,
as the paper does, the best scaled accuracy over seeds at the longest evaluated length
(1 = always right, 0 = chance), and the figure shows accuracy against evaluation length.

    python examples/train/state_tracking.py                  # the full run (CPU, minutes)
    python examples/train/state_tracking.py --quick          # a smoke test (seconds)
    python examples/train/state_tracking.py --out-dir DIR    # where the table and figure go

Differences from the paper (to fit a CPU in minutes): one small layer, a few hundred Adam
steps, every position supervised (the running parity / the value of the expression so
far) rather than only the last, and accuracy measured on the last position.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import recdsl

CELLS_FILE = Path(__file__).resolve().parent / "state_tracking.rec"
RESULTS = Path(__file__).resolve().parent / "results"
IGNORE = -100  # label of positions that are not supervised (operators in arithmetic)


# ---- tasks -----------------------------------------------------------------------------


class Task(Enum):
    PARITY = "parity"
    MODULAR_ARITHMETIC = "modular arithmetic"

    @property
    def vocabulary(self) -> int:
        return 2 if self is Task.PARITY else MODULUS + len(OPERATORS)

    @property
    def classes(self) -> int:
        return 2 if self is Task.PARITY else MODULUS


MODULUS = 5
OPERATORS = ("+", "-", "*")  # tokens MODULUS, MODULUS + 1, MODULUS + 2


def sample(task: Task, batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[batch, length]`` and labels ``[batch, length]`` (``IGNORE`` where unsupervised).

    Parity: the label at step t is the parity of the bits up to t.  Modular arithmetic:
    tokens alternate number, operator, number, ...; the label at each number is the value,
    mod 5, of the expression up to it (``*`` binds tighter than ``+`` and ``-``).
    """
    if task is Task.PARITY:
        bits = torch.randint(0, 2, (batch, length), generator=generator)
        return bits, bits.cumsum(1) % 2
    numbers = torch.randint(0, MODULUS, (batch, (length + 1) // 2), generator=generator)
    operators = torch.randint(0, len(OPERATORS), (batch, length // 2), generator=generator)
    tokens = torch.empty(batch, length, dtype=torch.long)
    tokens[:, 0::2] = numbers
    tokens[:, 1::2] = MODULUS + operators
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    total = torch.zeros(batch, dtype=torch.long)  # sum of the finished terms
    term = numbers[:, 0].clone()  # the product being built, with its sign
    labels[:, 0] = term % MODULUS
    for i in range(1, numbers.shape[1]):
        op, number = operators[:, i - 1], numbers[:, i]
        times = op == OPERATORS.index("*")
        sign = torch.where(op == OPERATORS.index("-"), -1, 1)
        total = torch.where(times, total, total + term)
        term = torch.where(times, term * number, sign * number) % MODULUS
        labels[:, 2 * i] = (total + term) % MODULUS
    return tokens, labels


# ---- models ----------------------------------------------------------------------------


class Kind(Enum):
    DELTANET = "DeltaNet"
    DIAGONAL = "diagonal (Mamba decay)"


class Range(Enum):
    POSITIVE = "[0, 1]"
    SIGNED = "[-1, 1]"


@dataclass(frozen=True)
class Config:
    """One training run."""

    kind: Kind
    eigenvalues: Range
    task: Task
    seed: int


class Mixer(nn.Module):
    """Projections into a recdsl cell and out of it; ``heads`` DeltaNet heads or one diagonal layer."""

    def __init__(self, kind: Kind, eigenvalues: Range, width: int, heads: int, chunk_size: int):
        super().__init__()
        self.kind, self.heads = kind, heads
        if kind is Kind.DELTANET:
            head = width // heads
            beta_max = 1 if eigenvalues is Range.POSITIVE else 2
            # Training lengths are short: chunks shorter than the default 64 waste less padding.
            self.cell = recdsl.compile(CELLS_FILE, cell="DeltaNetRange", chunk_size=chunk_size, dk=head, dv=head, beta_max=beta_max)
            self.project = nn.Linear(width, 3 * width + heads)
        else:
            lowest = 0 if eigenvalues is Range.POSITIVE else -1
            self.cell = recdsl.compile(CELLS_FILE, cell="DiagonalRange", d=width, lowest=lowest)
            self.project = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        if self.kind is Kind.DELTANET:
            q, k, v, b = self.project(x).split([width, width, width, self.heads], dim=-1)
            q, k, v = (t.reshape(batch, length, self.heads, -1) for t in (q, k, v))
            y = self.cell(q=F.normalize(q, dim=-1), k=F.normalize(k, dim=-1), v=v, b=b)
        else:
            g, value = self.project(x).chunk(2, dim=-1)
            y = self.cell(g=g, x=value)
        return self.out(y.reshape(batch, length, width))


class Model(nn.Module):
    """Embedding, ``layers`` residual blocks (mixer, MLP), a classifier per position."""

    def __init__(self, kind: Kind, eigenvalues: Range, task: Task, width: int, heads: int, layers: int, chunk_size: int):
        super().__init__()
        self.embed = nn.Embedding(task.vocabulary, width)
        self.mixers = nn.ModuleList(Mixer(kind, eigenvalues, width, heads, chunk_size) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, task.classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for norm, mixer, mlp in zip(self.norms, self.mixers, self.mlps):
            x = x + mixer(norm(x))
            x = x + mlp(x)
        return self.head(x)


# ---- training and evaluation -----------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    steps: int
    batch: int
    learning_rate: float
    width: int
    heads: int
    layers: int
    chunk_size: int
    train_lengths: tuple[int, int]
    eval_lengths: tuple[int, ...]
    eval_batch: int


@dataclass(frozen=True)
class RunResult:
    config: Config
    final_loss: float
    accuracy: dict[int, float]  # evaluation length -> accuracy on the last position
    seconds: float


def scaled(accuracy: float, task: Task) -> float:
    """Accuracy rescaled so that chance is 0 and always right is 1 (the paper's measure)."""
    chance = 1 / task.classes
    return (accuracy - chance) / (1 - chance)


def evaluation_length(task: Task, length: int) -> int:
    """Arithmetic expressions have odd length (they end in a number)."""
    return length - 1 if task is Task.MODULAR_ARITHMETIC and length % 2 == 0 else length


def train(config: Config, settings: Settings, progress_bar=None) -> RunResult:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = Model(config.kind, config.eigenvalues, config.task, settings.width, settings.heads, settings.layers, settings.chunk_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate, total_steps=settings.steps, pct_start=0.1)
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    low, high = settings.train_lengths
    for step in range(settings.steps):
        length = int(torch.randint(low, high + 1, (), generator=generator))
        tokens, labels = sample(config.task, settings.batch, length, generator)
        logits = model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress_bar is not None:
            progress_bar.update(1)
            if step % 20 == 0:
                progress_bar.set_postfix(loss=f"{loss.item():.3f}")
    accuracy = {}
    evaluation = torch.Generator().manual_seed(10_000 + config.seed)
    model.eval()
    with torch.no_grad():
        for length in settings.eval_lengths:
            tokens, labels = sample(config.task, settings.eval_batch, evaluation_length(config.task, length), evaluation)
            predicted = model(tokens)[:, -1].argmax(-1)
            accuracy[length] = (predicted == labels[:, -1]).float().mean().item()
    return RunResult(config, loss.item(), accuracy, time.perf_counter() - start)


# ---- reporting -------------------------------------------------------------------------


def best_by_group(results: list[RunResult], length: int) -> dict[tuple[Kind, Range, Task], RunResult]:
    """The run with the best accuracy at ``length``, per cell, range and task."""
    best: dict[tuple[Kind, Range, Task], RunResult] = {}
    for result in results:
        key = (result.config.kind, result.config.eigenvalues, result.config.task)
        if key not in best or result.accuracy[length] > best[key].accuracy[length]:
            best[key] = result
    return best


def table(results: list[RunResult], settings: Settings) -> str:
    """A markdown table like the paper's: per cell, range and task, the best scaled accuracy over seeds at each length."""
    lengths = settings.eval_lengths
    best = {length: best_by_group(results, length) for length in lengths}
    tasks = sorted({r.config.task for r in results}, key=lambda t: list(Task).index(t))
    seeds = len({r.config.seed for r in results})
    lines = [
        f"Scaled accuracy on the last position (1 = always right, 0 = chance), best of {seeds} seed(s) at each evaluation length; "
        f"trained on lengths {settings.train_lengths[0]}-{settings.train_lengths[1]} for {settings.steps} steps.",
        "",
        "| task | cell | eigenvalues | " + " | ".join(f"T={n}" for n in lengths) + " |",
        "|---|---|---|" + "---:|" * len(lengths),
    ]
    for task in tasks:
        for kind in Kind:
            for eigenvalues in Range:
                key = (kind, eigenvalues, task)
                if key in best[lengths[0]]:
                    cells = [f"{scaled(best[n][key].accuracy[n], task):.2f}" for n in lengths]
                    lines.append(f"| {task.value} | {kind.value} | {eigenvalues.value} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_results(path: Path) -> tuple[list[RunResult], Settings]:
    """The runs and settings a previous run saved as JSON (``--from-json``)."""
    saved = json.loads(path.read_text())
    settings = dict(saved["settings"])
    settings["train_lengths"] = tuple(settings["train_lengths"])
    settings["eval_lengths"] = tuple(settings["eval_lengths"])
    results = []
    for run in saved["runs"]:
        config = run["config"]
        results.append(
            RunResult(
                Config(Kind(config["kind"]), Range(config["eigenvalues"]), Task(config["task"]), config["seed"]),
                run["final_loss"],
                {int(length): accuracy for length, accuracy in run["accuracy"].items()},
                run["seconds"],
            )
        )
    return results, Settings(**settings)


def plot(results: list[RunResult], settings: Settings, path: Path) -> None:
    """Accuracy against evaluation length, one panel per task: the best seed at each length as a line, the seeds' range shaded."""
    from recdsl.plotting import pyplot

    plt = pyplot()
    tasks = sorted({r.config.task for r in results}, key=lambda t: list(Task).index(t))
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    styles = {Range.POSITIVE: "--", Range.SIGNED: "-"}
    colors = {Kind.DELTANET: "tab:blue", Kind.DIAGONAL: "tab:orange"}
    lengths = list(settings.eval_lengths)
    for axis, task in zip(axes[0], tasks):
        for kind in Kind:
            for eigenvalues in Range:
                runs = [r for r in results if (r.config.kind, r.config.eigenvalues, r.config.task) == (kind, eigenvalues, task)]
                if not runs:
                    continue
                low = [min(r.accuracy[n] for r in runs) for n in lengths]
                high = [max(r.accuracy[n] for r in runs) for n in lengths]
                axis.fill_between(lengths, low, high, color=colors[kind], alpha=0.12)
                axis.plot(lengths, high, styles[eigenvalues], color=colors[kind], marker="o", label=f"{kind.value}, {eigenvalues.value}")
        axis.axhline(1 / task.classes, color="gray", linewidth=0.8, linestyle=":", label="chance")
        axis.axvline(settings.train_lengths[1], color="gray", linewidth=0.8, linestyle="--", label=f"longest training length ({settings.train_lengths[1]})")
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [str(n) for n in lengths])
        axis.minorticks_off()
        axis.set_ylim(0, 1.05)
        axis.set_xlabel("evaluation length")
        axis.set_ylabel("accuracy (last position)")
        axis.set_title(task.value)
        axis.legend(fontsize=8, loc="best")
    figure.suptitle("Eigenvalues in [-1, 1] unlock state tracking (Grazzi, Siems et al., 2024), compiled by recdsl", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_all(configs: list[Config], settings: Settings) -> list[RunResult]:
    """Train and evaluate every configuration, with one progress bar over all steps."""
    from recdsl.progress import progress

    results: list[RunResult] = []
    with progress(total=len(configs) * settings.steps, desc="training", unit="step") as bar:
        for config in configs:
            bar.set_description(f"{config.kind.value} {config.eigenvalues.value} {config.task.value} seed {config.seed}")
            result = train(config, settings, bar)
            results.append(result)
            accuracies = ", ".join(f"T={n}: {a:.2f}" for n, a in result.accuracy.items())
            bar.write(
                f"{config.kind.value:<24} {config.eigenvalues.value:<8} {config.task.value:<19} seed {config.seed}: "
                f"loss {result.final_loss:.3f}; accuracy {accuracies} ({result.seconds:.1f} s)"
            )
    return results


# ---- command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=[t.name.lower() for t in Task], choices=[t.name.lower() for t in Task])
    parser.add_argument("--cells", nargs="*", default=[k.name.lower() for k in Kind], choices=[k.name.lower() for k in Kind])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per run (default 300)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=16, help="model width; DeltaNet splits it into --heads heads")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=32, help="chunk length of DeltaNet's chunked backend (default 32)")
    parser.add_argument("--eval-lengths", type=int, nargs="*", default=[40, 64, 128, 256, 512])
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help=f"where the table and figure go (default {RESULTS})")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure (no matplotlib needed)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps: a smoke test")
    parser.add_argument("--from-json", type=Path, metavar="FILE", help="redraw the table and figure from a previous run's state_tracking.json, without training")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        results, settings = load_results(args.from_json)
        report(results, settings, args.out_dir, plot_figure=not args.no_plot, raw=False)
        return 0
    if args.quick:
        args.seeds, args.steps, args.batch, args.width, args.eval_lengths, args.eval_batch, args.chunk_size = 1, 3, 4, 8, [8, 16], 8, 4
    settings = Settings(
        steps=args.steps,
        batch=args.batch,
        learning_rate=args.learning_rate,
        width=args.width,
        heads=args.heads,
        layers=args.layers,
        chunk_size=args.chunk_size,
        train_lengths=(3, 40) if not args.quick else (3, 6),
        eval_lengths=tuple(args.eval_lengths),
        eval_batch=args.eval_batch,
    )
    configs = [
        Config(Kind[kind.upper()], eigenvalues, Task[task.upper()], seed)
        for task in args.tasks
        for kind in args.cells
        for eigenvalues in Range
        for seed in range(args.seeds)
    ]
    # The models are small: more threads only add synchronisation (on the shared 2-core
    # machine, two threads made a DeltaNet step 40x slower than one).
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run_all(configs, settings)
    finally:
        torch.set_num_threads(threads)
    report(results, settings, args.out_dir, plot_figure=not args.no_plot, raw=True)
    return 0


def report(results: list[RunResult], settings: Settings, out_dir: Path, plot_figure: bool, raw: bool) -> None:
    """Print the table; write it, the runs as JSON (``raw``) and the figure to ``out_dir``."""
    text = table(results, settings)
    print()
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "state_tracking.md").write_text(text)
    if raw:
        runs = [dict(asdict(r), config={k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(r.config).items()}) for r in results]
        (out_dir / "state_tracking.json").write_text(json.dumps({"settings": asdict(settings), "runs": runs}, indent=1, default=str) + "\n")
    print(f"table: {out_dir / 'state_tracking.md'}")
    if plot_figure:
        plot(results, settings, out_dir / "state_tracking.png")
        print(f"figure: {out_dir / 'state_tracking.png'}")

if __name__ == "__main__":
    sys.exit(main())
