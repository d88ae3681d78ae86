"""`kdist wandb-report`: a W&B Report comparing the teacher, the student alone and the distilled student of
one study (a W&B group), built with wandb-workspaces (the reports API v2). Offline, report.html in the run
folder is its equivalent."""

from __future__ import annotations

import click

from . import KdistError
from .options import entry_point

JOB_TYPES = ("teacher", "student", "distilled")
SUMMARY_KEYS = ["test/acc", "test/auc", "test/balanced_acc", "test/macro_f1", "test/ece", "test/sensitivity"]


def build_report(entity: str, project: str, group: str):
    """The Report object (not saved): curves of the three models overlaid, the summary table, and per model
    the confusion matrix and the qualitative table of fixed test images, side by side."""
    import wandb_workspaces.reports.v2 as wr

    def runset(job_type: str | None = None):
        filters = f"Group = '{group}'" + (f" and JobType = '{job_type}'" if job_type else "")
        return wr.Runset(entity=entity, project=project, name=job_type or group, filters=filters)

    curves = [
        wr.LinePlot(title=f"val {metric} per epoch", x="Step", y=[f"val/{metric}"], groupby="JobType")
        for metric in ("acc", "loss")
    ]
    curves.append(wr.LinePlot(title="distilled: teacher agreement on val", x="Step", y=["val/teacher_agreement"]))
    blocks = [
        wr.H1(f"kdist: teacher, student and distilled student ({group})"),
        wr.P(
            "Every checkpoint chosen on val accuracy; test evaluated once per final model. The same study's "
            "report.html in its run folder holds the same tables offline."
        ),
        wr.H2("Curves"),
        wr.PanelGrid(runsets=[runset()], panels=curves),
        wr.H2("Summary (test)"),
        wr.PanelGrid(
            runsets=[runset()],
            panels=[wr.RunComparer(diff_only=None)]
            + [wr.BarPlot(title=key, metrics=[key], groupby="JobType") for key in SUMMARY_KEYS[:2]],
        ),
        wr.H2("Confusion matrices and qualitative test images"),
    ]
    for job_type in JOB_TYPES:
        blocks.append(wr.H3(job_type))
        blocks.append(
            wr.PanelGrid(
                runsets=[runset(job_type)],
                panels=[
                    wr.WeavePanelSummaryTable(table_name="test/confusion_matrix_table"),
                    wr.WeavePanelSummaryTable(table_name="qualitative/test_samples"),
                    wr.MediaBrowser(media_keys=["qualitative/test_grid"]),
                ],
            )
        )
    return wr.Report(
        entity=entity,
        project=project,
        title=f"kdist comparison: {group}",
        description="Teacher, student alone and distilled student of one kdist study.",
        blocks=blocks,
    )


def explain_failure(exc: Exception, entity: str, project: str) -> str:
    """The real cause of a failed save, as far as the error tells: no network, or an entity/project W&B does not
    know (or this key may not write to)."""
    import wandb

    text = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    lowered = text.lower()
    host = wandb.Settings().base_url
    if any(
        word in lowered for word in ("no such host", "connection", "timed out", "timeout", "unreachable", "resolve")
    ):
        return f"could not reach the W&B server {host} ({text}); check the network or WANDB_BASE_URL"
    if any(
        word in lowered for word in ("not found", "404", "does not exist", "permission", "403", "unauthorized", "401")
    ):
        return (
            f"W&B refused entity {entity!r} / project {project!r} ({text}); check --entity/--project "
            "($WANDB_ENTITY/$WANDB_PROJECT) and that this API key may write there"
        )
    return f"could not save the report to W&B ({text})"


@click.command("wandb-report")
@click.option("--entity", envvar="WANDB_ENTITY", required=True, help="W&B entity (user or team); default $WANDB_ENTITY")
@click.option(
    "--project", envvar="WANDB_PROJECT", default="kdist", show_default=True, help="W&B project; default $WANDB_PROJECT"
)
@click.option(
    "--group", required=True, help="the study: its W&B group (trainer.wandb_group, else its run folder's name)"
)
def command(entity, project, group):
    """Build and save a W&B Report comparing teacher, student and distilled student of one study."""
    from .tracking import has_wandb_key

    if not has_wandb_key():
        raise KdistError(
            "no W&B API key (WANDB_API_KEY or `wandb login`); offline, the study's report.html in its run folder "
            "is the same comparison (upload offline runs with `wandb sync RUN/wandb/offline-run-*` first)"
        )
    report = build_report(entity, project, group)
    try:
        report.save()
    except Exception as exc:  # one line naming the cause, and where the offline report is
        raise KdistError(
            f"{explain_failure(exc, entity, project)}; offline, the study's report.html in its run folder is the "
            "same comparison"
        ) from None
    click.echo(report.url)


if __name__ == "__main__":
    entry_point(command, "python -m kdist.wandb_report")
