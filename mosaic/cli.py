"""The `mosaic` command line: a thin typer layer over library functions (tests call those).

Heavy imports (torch, transformers, datasets) happen inside commands, so `mosaic --help`
answers instantly.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(
    name="mosaic",
    help="MOSAIC: closed-loop, budget-constrained curation of alignment training data.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

DEFAULT_CONFIG = Path("configs/sandbox.yaml")


def _load(config: Path):
    from mosaic.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@app.command("schema")
def schema_cmd(out: Path = typer.Option(None, help="Write the JSON schemas here instead of stdout.")) -> None:
    """Export the JSON Schemas of MOSAIC's records (data action, failure report, ...)."""
    import json

    from mosaic.io import atomic_write_json
    from mosaic.schemas import json_schemas

    schemas = json_schemas()
    if out:
        atomic_write_json(out, schemas)
        console.print(f"wrote {len(schemas)} schemas to {out}")
    else:
        typer.echo(json.dumps(schemas, indent=2))


@app.command("config")
def config_cmd(config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML).")) -> None:
    """Validate a config and print it fully resolved (defaults and MOSAIC__ overrides applied)."""
    from mosaic.config import dump_config

    typer.echo(dump_config(_load(config)))


if __name__ == "__main__":
    app()
