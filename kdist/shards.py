"""`kdist shards`: write webdataset shards from a MedMNIST file or an image folder / CSV (shard_writer.py),
or check a shard set against its manifest (shard_data.py)."""

from __future__ import annotations

import click

from .datasets import DEFAULT_FLAG
from .options import PATH, entry_point
from .shard_data import MANIFEST, verify
from .shard_writer import write_images, write_medmnist


@click.command("shards")
@click.option("--out", type=PATH, required=True, help="folder for the tar shards and manifest.json")
@click.option("--data-root", help="folder with the MedMNIST npz (default: $KDIST_DATA_ROOT)")
@click.option(
    "--flag", default=DEFAULT_FLAG, show_default=True, help="MedMNIST dataset (any 2D flag medmnist's INFO knows)"
)
@click.option("--size", type=int, default=28, show_default=True, help="MedMNIST image size: 28, 64, 128 or 224")
@click.option(
    "--images",
    type=PATH,
    help="instead of a MedMNIST file: an image folder (one sub-folder per class) or a CSV of path,label (label: "
    "the class name)",
)
@click.option("--split", default="train", show_default=True, help="with --images: the split these images form")
@click.option(
    "--resize",
    type=int,
    help="with --images: store each image scaled to this shorter side (aspect kept; default: the original bytes)",
)
@click.option("--maxcount", type=int, default=2000, show_default=True, help="samples per shard at most")
@click.option("--maxsize", type=int, default=1 << 30, show_default=True, help="bytes per shard at most")
@click.option("--verify", "verify_only", is_flag=True, help="check the shards in --out against their manifest and stop")
def command(out, data_root, flag, size, images, split, resize, maxcount, maxsize, verify_only):
    """Write webdataset shards from a MedMNIST file or an image folder / CSV, with a manifest of counts,
    class histograms and sha256 per shard (or check them with --verify)."""
    if resize is not None and (not images or resize < 8):
        raise click.UsageError("--resize N (N >= 8) applies to --images only")
    if verify_only:
        manifest = verify(out)
    elif images:
        manifest = write_images(images, out, split, maxcount, maxsize, resize)
    else:
        manifest = write_medmnist(data_root, flag, size, out, maxcount, maxsize)
    for name, entry in manifest["splits"].items():
        click.echo(
            f"{name:6s} {entry['count']:7d} samples in {len(entry['shards'])} shard(s)  classes "
            f"{entry['class_histogram']}"
        )
    click.echo(f"{'verified' if verify_only else 'written'}: {out / MANIFEST}")


if __name__ == "__main__":
    entry_point(command, "python -m kdist.shards")
