"""`kdist distill --teacher T.safetensors`: the student distilled from a frozen, trained teacher.

Also a module for the launcher: `accelerate launch -m kdist.distill ...` (`python -m kdist.distill` on
one process), with the same options. The teacher runs online beside the student on every process
(the default on GPUs) or through its exact logit cache (the default on CPUs); see engine.py.
"""

from __future__ import annotations

import click

from .options import PATH, entry_point, open_study, resume_option, study_options, summary, val_only_option


@click.command("distill")
@click.option(
    "--teacher",
    "teachers",
    type=PATH,
    required=True,
    multiple=True,
    help="teacher weights (.safetensors written by kdist); repeat it to distill an ensemble's mean logits",
)
@click.option("--weights", type=PATH, help="local safetensors state dict to start the student from")
@val_only_option
@resume_option
@study_options
def command(teachers, **opts):
    """Distill the student from trained teacher weights; the teacher is evaluated beside it."""
    from .models import load_teacher
    from .options import planned_config
    from .pipeline import distill_stage
    from .results import record_model, recorded
    from .study_data import planned_dataset

    # The teachers are read before the run folder is touched: a missing or wrong file changes nothing. One file
    # must hold the configured teacher (teacher_model.arch; --set it for another), trained on the data's classes.
    cfg = planned_config(opts, "student")
    teacher = load_teacher(list(teachers), cfg.teacher_model.arch, planned_dataset(cfg.data))
    study = open_study(opts, "distill", "student")
    distill_stage(study, teacher)
    if not recorded(study, "teacher"):
        record_model(study, "teacher", teacher)  # the teacher (or ensemble) beside its student in results.json
    if study.is_main:
        click.echo(summary(study.out / "results.json"))


if __name__ == "__main__":
    entry_point(command, "python -m kdist.distill")
