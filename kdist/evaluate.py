"""`kdist evaluate W.safetensors [W2 ...]`: metrics of saved weights (several: their ensemble), as JSON.

Also a module for the launcher: `accelerate launch -m kdist.evaluate ...`; every process scores its shard
of the split and `gather_for_metrics` joins them, so N processes print what one prints.
"""

from __future__ import annotations

import json

import click

from . import KdistError
from .options import PATH, entry_point, views_option


def evaluate_weights(
    weights: list, data_root: str | None, split: str, views: str, cpu: bool = False, shards=None
) -> dict:
    """Headline metrics of saved weights; the data size comes from the weights' metadata. `shards`: the shard
    folder to read val/test from (`auto`: the data file's cached shards), or None / "none": the npz."""
    from medmnist import INFO

    from .config import DataConfig, TrainerConfig
    from .metrics import classification_metrics
    from .models import data_size_of, load_teacher, read_metadata
    from .processes import make_accelerator
    from .scoring import split_probs
    from .study_data import open_data

    sizes = {data_size_of(read_metadata(path)) for path in weights}
    if len(sizes) > 1:
        raise KdistError(
            f"these weights were trained on different image sizes {sorted(sizes)}; evaluate them separately"
        )
    model = load_teacher(list(weights))
    shards = None if str(shards).lower() == "none" else shards
    if model.dataset.name not in INFO and shards in (None, "auto"):
        raise KdistError(
            f"{weights[0]} was trained on {model.dataset.name}, not a MedMNIST set; pass --shards FOLDER, the shards "
            "of its data"
        )
    accelerator = make_accelerator(TrainerConfig(cpu=cpu))
    size = sizes.pop()
    names = ("val", "test") if split == "both" else (split,)
    flag = model.dataset.name if model.dataset.name in INFO else DataConfig.flag
    data = DataConfig(flag=flag, root=data_root, size=size, shards=str(shards) if shards else None)
    opened = open_data(data, accelerator, names)
    if opened.spec.classes != model.dataset.classes:
        raise KdistError(
            f"{weights[0]} predicts the classes of {model.dataset.name}, the data holds those of {opened.spec.name}; "
            "evaluate on the data it was trained on"
        )
    splits = opened.splits
    out = {
        "weights": [str(path) for path in weights] if len(weights) > 1 else str(weights[0]),
        "arch": model.arch,
        "views": views,
    }
    model.to(accelerator.device)
    for name in names:
        images, labels = splits[name]
        probs = split_probs(accelerator, model, images, labels, views)
        metrics = classification_metrics(probs, labels.numpy(), model.dataset.classes)
        out[name] = {key: value for key, value in metrics.items() if key != "per_class"}
    out["num_processes"] = accelerator.num_processes
    return out if accelerator.is_main_process else {}


@click.command("evaluate")
@click.argument("weights", type=PATH, nargs=-1, required=True)
@click.option("--data-root", help="folder with the weights' MedMNIST npz (default: $KDIST_DATA_ROOT)")
@click.option("--split", type=click.Choice(["val", "test", "both"]), default="both", show_default=True)
@click.option("--cpu", is_flag=True, help="run on the CPU even where CUDA is present")
@click.option(
    "--shards",
    metavar="auto|FOLDER|none",
    default="auto",
    show_default=True,
    help="read val/test from webdataset shards: the data file's (auto), a folder from `kdist shards`, or none (the "
    "npz in memory)",
)
@views_option
def command(weights, data_root, split, cpu, shards, views):
    """Evaluate saved weights (a .safetensors written by kdist; several: their ensemble, mean logits)."""
    result = evaluate_weights(weights, data_root, split, views, cpu, shards)
    if result:
        click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    entry_point(command, "python -m kdist.evaluate")
