"""`kdist train teacher|student`: one model on labels alone.

Also a module for the launcher: `accelerate launch -m kdist.train teacher ...` (`python -m kdist.train` on
one process), with the same options.
"""

from __future__ import annotations

import click

from .options import PATH, entry_point, open_study, resume_option, study_options, summary, val_only_option


@click.command("train")
@click.argument("role", type=click.Choice(["teacher", "student"]))
@click.option("--weights", type=PATH, help="local safetensors state dict to start from")
@val_only_option
@resume_option
@study_options
def command(role, **opts):
    """Train the teacher or the student alone on labels; keep its best-on-val weights."""
    from .pipeline import train_stage

    study = open_study(opts, "train", role)
    train_stage(study, role)
    if study.is_main:
        click.echo(summary(study.out / "results.json"))


if __name__ == "__main__":
    entry_point(command, "python -m kdist.train")
