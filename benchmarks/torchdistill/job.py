"""The KD job of benchmarks/compare.py, in torchdistill 1.1.5 (run in benchmarks/.venv, not kdist's).

Usage: python job.py CONFIG TEACHER.safetensors STUDENT.safetensors DATA_ROOT [--epochs N]

The models are the ones kdist trains, rebuilt here without kdist: torchvision's EfficientNet-B0 (teacher) and
SqueezeNet 1.1 (student) with 7 classes, behind the same wrapper (normalise with the train-split statistics,
bilinear upsampling of the 28 px images to 64 px), channels_last, loaded from the safetensors files compare.py
writes with kdist, so both packages start from the same weights. The train set shows each image in a random
one of its 8 flips/rotations; validation runs on the 1003 val images after every epoch. One line per epoch
("epoch K ...") goes to stdout as it ends; compare.py times the gaps between them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torchdistill.common.yaml_util import load_yaml_file
from torchdistill.core.distillation import get_distillation_box


class DermClassifier(nn.Module):
    """kdist.models.DermClassifier's computation: normalise, upsample to input_size, backbone."""

    def __init__(self, weights_file: str):
        super().__init__()
        with safe_open(weights_file, framework="pt") as handle:
            meta = json.loads(handle.metadata()["kdist"])
        self.input_size = meta["input_size"]
        self.backbone = torchvision.models.get_model(meta["arch"], weights=None, num_classes=meta["num_classes"])
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("std", torch.ones(1, 3, 1, 1))
        self.load_state_dict(load_file(weights_file))
        self.to(memory_format=torch.channels_last)

    def forward(self, images):
        x = (images - self.mean) / self.std
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.backbone(x)


class DermaMNIST(torch.utils.data.Dataset):
    """One split of dermamnist.npz as (float CHW image in [0, 1], label); train: a random dihedral view each time."""

    def __init__(self, root: str, split: str, train: bool):
        with np.load(f"{root}/dermamnist.npz") as data:
            self.images = torch.from_numpy(data[f"{split}_images"]).permute(0, 3, 1, 2).contiguous()
            self.labels = torch.from_numpy(data[f"{split}_labels"].reshape(-1).astype(np.int64))
        self.train = train

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index].float().div_(255.0)
        if self.train:
            view = int(torch.randint(8, ()))
            image = torch.rot90(image, view % 4, dims=(1, 2))
            if view >= 4:
                image = image.flip(2)
        return image, int(self.labels[index])


@torch.no_grad()
def val_accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images.contiguous(memory_format=torch.channels_last)).argmax(1) == labels).sum().item()
        total += len(labels)
    model.train()
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("config", "teacher", "student", "data_root"):
        parser.add_argument(name)
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_yaml_file(args.config)
    train_config = config["train"]
    if args.epochs:
        train_config["num_epochs"] = args.epochs
    datasets = {"train": DermaMNIST(args.data_root, "train", True), "val": DermaMNIST(args.data_root, "val", False)}
    steps = (
        len(datasets["train"]) // train_config["train_data_loader"]["kwargs"]["batch_size"] * train_config["num_epochs"]
    )
    train_config["scheduler"]["kwargs"]["total_steps"] = steps  # OneCycle over the whole run, as kdist's
    teacher, student = DermClassifier(args.teacher).eval(), DermClassifier(args.student)
    box = get_distillation_box(teacher, student, datasets, train_config, torch.device("cpu"), None, False, 1)
    print(f"torchdistill job: {sys.argv[1:]}, {torch.get_num_threads()} threads", flush=True)
    for epoch in range(box.num_epochs):
        start = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        for images, labels, supp in box.train_data_loader:
            loss = box.forward_process(images, labels, supp)
            box.post_forward_process(loss=loss)
        accuracy = val_accuracy(box.student_model, box.val_data_loader)
        box.post_epoch_process()
        print(
            f"epoch {epoch + 1}/{box.num_epochs} val acc {accuracy:.4f} loss {loss.item():.4f} "
            f"({time.perf_counter() - start:.2f} s in-process)",
            flush=True,
        )


if __name__ == "__main__":
    main()
