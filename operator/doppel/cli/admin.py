"""Admin commands: `crd` (print the CustomResourceDefinition) and `cleanup` (remove data from the shared
volume, what the operator's cleanup Jobs run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from doppel.cli.common import run_stage
from doppel.errors import BadInput


@click.command()
def crd() -> None:
    """Print the DoppelUser CustomResourceDefinition (YAML), generated from doppel.api."""
    from doppel.crd import crd_yaml

    click.echo(crd_yaml(), nl=False)


@click.command()
@click.option(
    "--data-root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Only paths under this directory may be removed.",
)
@click.option(
    "--partials-in",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Also remove what killed runs left in this directory (.NAME.*.partial, .NAME.old-*).",
)
@click.option(
    "--dangling-in",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Then remove the LoRA resolver entries in this directory whose adapter is gone.",
)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@run_stage
def cleanup(
    data_root: Path, paths: tuple[Path, ...], partials_in: tuple[Path, ...], dangling_in: tuple[Path, ...]
) -> dict[str, Any]:
    """Remove datasets or adapters from the shared volume (the operator's cleanup Jobs run this)."""
    import shutil

    root = data_root.resolve()
    leftovers = [
        entry
        for directory in partials_in
        if directory.is_dir()
        for entry in directory.iterdir()
        if entry.name.startswith(".") and (entry.name.endswith(".partial") or ".old-" in entry.name)
    ]
    for directory in dangling_in:
        if directory.resolve() == root or root not in directory.resolve().parents:
            raise BadInput(f"refusing to clean {directory}: not inside --data-root {data_root}")
    targets = [path.resolve() for path in [*paths, *leftovers]]
    paths = (*paths, *leftovers)
    for path, target in zip(paths, targets, strict=True):
        if target == root or root not in target.parents:
            raise BadInput(f"refusing to remove {path}: not inside --data-root {data_root}")
    removed = [str(t) for t in targets if t.exists()]
    for target in targets:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for directory in dangling_in:
        # Resolver entries whose adapter is gone: their linked files point nowhere.
        entries = [e for e in directory.iterdir() if e.is_dir()] if directory.is_dir() else []
        for entry in entries:
            if any(f.is_symlink() and not f.exists() for f in entry.iterdir()):
                shutil.rmtree(entry)
                removed.append(str(entry))
    return {"removed": removed}
