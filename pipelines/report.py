"""`factory report`: each model's accuracy on the test data of every site that holds it.

Evaluation happens where the test data lives, so the table is assembled from the
metrics each site recorded on its own registered versions; a cell stays empty
where that site may not hold the model. Robust accuracy (FGSM/PGD at the budgets of
conf/protection.yaml, `pipelines.protection.robustness`) is the figure the training site
measured on its own test set (metadata.json `robustness`), and per receiving site the figure it
measured on its own before adopting the model (version tags `factory.robustness.*`). A data
owner's membership-inference audit of a model holding its records (AUC, TPR at 1 % FPR, advantage;
`pipelines.protection.membership`) comes from the owner's version tags `factory.membership.*`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from pipelines.config import SITES, load_config
from pipelines.workspace import SitePaths, WorkspaceError, factory_home


def metric_keys() -> tuple[str, ...]:
    """The test sets' metric keys (conf/stages.yaml `inputs`), in the order the stages name them."""
    return load_config().stages.inputs.metric_keys()


def _held(paths: SitePaths, model: str):
    """The latest `model` (M1..M8) a site holds, or None."""
    from pipelines.learning.registry import ModelNotFound, resolve_model

    if not paths.mlflow_dir.exists():
        return None
    try:
        return resolve_model(paths, model)
    except ModelNotFound:
        return None


def _metrics_at(paths: SitePaths, model: str) -> dict[str, float]:
    if (ref := _held(paths, model)) is None:
        return {}
    keys = metric_keys()
    return {k.removeprefix("factory.metric."): float(v) for k, v in ref.tags.items()
            if k.startswith("factory.metric.") and k.removeprefix("factory.metric.") in keys}


def robustness_keys() -> tuple[str, ...]:
    """The attacked budgets of conf/protection.yaml, in order (fgsm@<eps>..., pgd@<eps>...)."""
    from pipelines.protection.robustness import budget_key, budgets

    conf = budgets()
    return tuple([budget_key("fgsm", e) for e in conf["fgsm_eps"]] + [budget_key("pgd", e) for e in conf["pgd_eps"]])


def _robustness_at(paths: SitePaths, model: str, *, trained_here: bool) -> dict[str, float]:
    """Robust accuracy of the latest `model` a site holds: measured at evaluation where it was
    trained, at intake where it was received; {} when not measured."""
    from pipelines.protection.robustness import mlflow_name

    if (ref := _held(paths, model)) is None:
        return {}
    if trained_here and ref.metadata.get("site") == paths.site:
        measured = ref.metadata.get("robustness") or {}
        return {k: float(v) for k, v in (measured.get("accuracy") or {}).items()
                if k in robustness_keys()} if measured.get("evaluated") else {}
    return {key: float(ref.tags[f"factory.{mlflow_name(key)}"]) for key in robustness_keys()
            if f"factory.{mlflow_name(key)}" in ref.tags}


def _membership_at(paths: SitePaths, model: str) -> dict[str, float]:
    """The site's membership-inference audit of the latest `model` it holds, as a data owner
    (version tags `factory.membership.*`, pipelines.protection.membership); {} when it audited none."""
    from pipelines.protection.membership import TAG_PREFIX

    if (ref := _held(paths, model)) is None or ref.tags.get(f"{TAG_PREFIX}audited") != "true":
        return {}
    return {key: float(ref.tags[f"{TAG_PREFIX}{key}"]) for key in ("auc", "tpr_at_1pct_fpr", "advantage", "members")
            if f"{TAG_PREFIX}{key}" in ref.tags}


def build_report(home: Path | None = None) -> dict[str, Any]:
    home = home or factory_home()
    SitePaths.of("supplier", home).require()
    stages = []
    for stage in load_config().stages.order:  # a stage's model and the site that produced it
        if stage.model is None:
            continue
        metrics: dict[str, float] = {}
        for holder in SITES:
            metrics.update(_metrics_at(SitePaths.of(holder, home), stage.model))
        if metrics:
            robustness = {holder: figures for holder in SITES
                          if (figures := _robustness_at(SitePaths.of(holder, home), stage.model,
                                                        trained_here=holder == stage.site))}
            membership = {holder: figures for holder in SITES
                          if (figures := _membership_at(SitePaths.of(holder, home), stage.model))}
            stages.append({"stage": stage.stage, "model": stage.model, "site": stage.site, "metrics": metrics,
                           **({"robustness": robustness} if robustness else {}),
                           **({"membership": membership} if membership else {})})
    return {"stages": stages}


def write_chart(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [row["model"] for row in report["stages"]]
    for key in metric_keys():
        points = [(i, row["metrics"][key]) for i, row in enumerate(report["stages"]) if key in row["metrics"]]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per stage, evaluated where each test set lives")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_report(home: Path, report: dict[str, Any], chart: Path) -> None:
    import mlflow

    from pipelines.learning.registry import experiment_id
    from pipelines.protection.robustness import mlflow_name

    paths = SitePaths.of("supplier", home)
    mlflow.set_tracking_uri(paths.mlflow_uri)
    with mlflow.start_run(experiment_id=experiment_id(paths, "factory-report"), run_name="stage-report"):
        mlflow.log_dict(report, "report.json")
        mlflow.log_artifact(str(chart))
        for row in report["stages"]:
            mlflow.log_metrics({f"{row['model']}.{k}": v for k, v in row["metrics"].items()})
            mlflow.log_metrics({f"{row['model']}.{site}.{mlflow_name(k)}": v
                                for site, figures in row.get("robustness", {}).items() for k, v in figures.items()})


def render_table(report: dict[str, Any]) -> Table:
    table = Table(title="Sovereign AI Factory — accuracy per stage")
    keys = metric_keys()
    for column in ("stage", "model", "trained at", *keys):
        table.add_column(column, justify="right" if column in keys else "left")
    for row in report["stages"]:
        table.add_row(str(row["stage"]), row["model"], row["site"],
                      *[f"{row['metrics'][k]:.4f}" if k in row["metrics"] else "" for k in keys])
    return table


def render_robustness(report: dict[str, Any]) -> Table | None:
    """Robust accuracy per stage model and the site that measured it on its own test set (None when
    nothing was measured)."""
    rows = [(row, site, figures) for row in report["stages"] for site, figures in row.get("robustness", {}).items()]
    if not rows:
        return None
    keys = robustness_keys()
    table = Table(title="Robust accuracy (FGSM / PGD, L-inf budgets as fractions of the input range)")
    for column in ("stage", "model", "measured at", *keys):
        table.add_column(column, justify="right" if column in keys else "left")
    for row, site, figures in rows:
        table.add_row(str(row["stage"]), row["model"], site,
                      *[f"{figures[k]:.4f}" if k in figures else "" for k in keys])
    return table


def render_membership(report: dict[str, Any]) -> Table | None:
    """Membership-inference audits per stage model and the data owner that ran it on its own records
    (None when none was run)."""
    rows = [(row, site, figures) for row in report["stages"] for site, figures in row.get("membership", {}).items()]
    if not rows:
        return None
    table = Table(title="Membership-inference audits by data owners (loss-threshold attack, own records)")
    for column in ("stage", "model", "audited at", "AUC", "TPR at 1% FPR", "advantage", "members"):
        table.add_column(column, justify="left" if column in ("stage", "model", "audited at") else "right")
    for row, site, figures in rows:
        table.add_row(str(row["stage"]), row["model"], site,
                      *[f"{figures[k]:.3f}" if k in figures else "" for k in ("auc", "tpr_at_1pct_fpr", "advantage")],
                      f"{figures['members']:.0f}" if "members" in figures else "")
    return table


def print_summary(home: Path) -> None:
    report = build_report(home)
    Console().print(render_table(report))
    if (robustness := render_robustness(report)) is not None:
        Console().print(robustness)
    if (membership := render_membership(report)) is not None:
        Console().print(membership)


@click.command("report")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def report_command(as_json: bool) -> None:
    """Print the stage table; also write a PNG chart and log both to the supplier's MLflow."""
    home = factory_home()
    try:
        report = build_report(home)
    except WorkspaceError as error:
        click.echo(str(error), err=True)
        sys.exit(1)
    chart = write_chart(report, home / "reports" / "stages.png")
    log_report(home, report, chart)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        Console().print(render_table(report))
        if (robustness := render_robustness(report)) is not None:
            Console().print(robustness)
        click.echo(f"chart: {chart}")
