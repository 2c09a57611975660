"""The ``spectra`` command: thin typer commands that parse options, call one library function, print a summary."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from spectra.errors import SpectraError

app = typer.Typer(
    help="Spectral diagnosis of sequential knowledge editing, with REVIVE built in. "
    "Every command defaults to the embedded tiny-world model (--model tiny) and runs offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(command: F) -> F:
    """Print a SpectraError as its one-paragraph message (no traceback) and exit with status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpectraError as err:
            Console(stderr=True).print(f"[bold red]error:[/] {err}")
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@friendly_errors
def models() -> None:
    """List the model aliases, what they resolve to, and whether each is available locally."""
    from spectra.models import ALIASES, locally_available

    table = Table("alias", "resolves to", "available locally", "from")
    for alias in ALIASES:
        available, where = locally_available(alias)
        table.add_row(alias, ALIASES[alias], "yes" if available else "no", where if available else "-")
    console.print(table)
    console.print("Any local directory saved with save_pretrained or a cached hub id also works as --model.")


@app.command("train-tiny")
@friendly_errors
def train_tiny(
    out: Path = typer.Option(None, help="Directory to write the model and world files into "
                             "[default: the package's embedded assets/tiny]."),
    steps: int = typer.Option(3500, help="Optimizer steps (batch 64)."),
    seed: int = typer.Option(0, help="Seed of initialisation and data order."),
) -> None:
    """Regenerate the tiny world and retrain the embedded model (about 20-30 min on 2 CPU cores)."""
    from spectra.models.loading import tiny_model_dir
    from spectra.models.tiny import TinyTrainConfig, build_and_save

    target = out or tiny_model_dir()
    report = build_and_save(TinyTrainConfig(steps=steps, seed=seed), target)
    console.print(f"trained in {report['train_seconds']} s; recall of training facts "
                  f"{report['recall_trained_phrasing']:.1%}, held-out phrasing {report['recall_heldout_phrasing']:.1%}")
    console.print(f"written to {target}")


def main() -> None:
    """Console-script entry point."""
    app()
