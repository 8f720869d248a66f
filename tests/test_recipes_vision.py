"""The paper's vision recipes on generated stand-in data in the real on-disk formats (CIFAR's pickled
python batches, an ImageFolder tree of PNGs): the YAML parses, the model and data build, training runs."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from recipe_helpers import runnable_recipe

from adai_lightning.cli import AdaiCLI
from adai_lightning.recipes.vision_data import CIFAR_STATS, CIFAR10DataModule, ImageFolderDataModule, MissingDataError
from adai_lightning.recipes.vision_models import DenseNet121Backbone, ResNetBackbone

TINY = ["--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--data.batch_size", "4", "--data.num_workers", "0"]


def write_fake_cifar(root, dataset: str, images_per_batch: int = 8) -> None:
    """CIFAR's python layout: pickled dicts of uint8 rows (3072 = 3x32x32) and labels, plus a meta file."""
    cls = getattr(torchvision.datasets, dataset)
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if dataset == "CIFAR10" else "fine_labels"
    classes = 10 if dataset == "CIFAR10" else 100
    rng = np.random.default_rng(0)
    for name, _ in cls.train_list + cls.test_list:
        batch = {"data": rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, classes, images_per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {cls.meta["key"]: [f"class{i}" for i in range(classes)]}
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps(meta))


@pytest.fixture
def skip_cifar_checksums(monkeypatch):
    """Stand-in files cannot match the official md5 sums: check that each file exists instead."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def fit_recipe(recipe, tmp_path, *args):
    cli = AdaiCLI(args=["--config", str(runnable_recipe(recipe, tmp_path)), *TINY, *args], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def test_cifar_resnet18_matches_the_standard_cifar_model():
    model = ResNetBackbone(depth=18, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the usual CIFAR ResNet-18 size
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(model.maxpool, torch.nn.Identity) and model.conv1.kernel_size == (3, 3)
    imagenet = ResNetBackbone(depth=50, num_classes=1000, small_inputs=False)
    reference = torchvision.models.resnet50()
    assert [p.shape for p in imagenet.parameters()] == [p.shape for p in reference.parameters()]
    with pytest.raises(ValueError, match="Invalid depth: 20"):
        ResNetBackbone(depth=20)


def test_cifar_densenet121_differs_from_torchvision_only_in_the_stem():
    model = DenseNet121Backbone(num_classes=100)
    reference = torchvision.models.densenet121(num_classes=100)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) - 64 * 3 * (7 * 7 - 3 * 3)
    assert isinstance(model.features.pool0, torch.nn.Identity)


def test_missing_data_errors_name_dataset_path_and_remedy(tmp_path):
    with pytest.raises(MissingDataError, match=r"CIFAR10 not found.*cifar-10-batches-py.*--data.download true"):
        CIFAR10DataModule(root=str(tmp_path)).setup()
    with pytest.raises(MissingDataError, match=rf"ImageNet val split not found at {tmp_path}.*--data.root"):
        ImageFolderDataModule(root=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="Invalid batch_size: 0"):
        CIFAR10DataModule(batch_size=0)


@pytest.mark.usefixtures("skip_cifar_checksums")
def test_cifar_data_module_reads_the_python_batches(tmp_path):
    write_fake_cifar(tmp_path, "CIFAR10")
    data = CIFAR10DataModule(root=str(tmp_path), batch_size=5, num_workers=0)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (5, 3, 32, 32) and labels.dtype == torch.long
    raw = torchvision.datasets.CIFAR10(str(tmp_path), train=False)
    image, label = data.splits["test"][3]  # the test transform only normalises
    expected = (torch.as_tensor(raw.data[3]).permute(2, 0, 1) / 255 - torch.tensor(CIFAR_STATS["CIFAR10"][0])[:, None, None])
    assert torch.allclose(image, expected / torch.tensor(CIFAR_STATS["CIFAR10"][1])[:, None, None], atol=1e-6)
    assert label == raw.targets[3]


@pytest.mark.slow
@pytest.mark.usefixtures("skip_cifar_checksums")
def test_cifar10_resnet18_recipe_trains_on_stand_in_data(tmp_path):
    write_fake_cifar(tmp_path / "data", "CIFAR10")
    cli = fit_recipe("cifar10_resnet18.yaml", tmp_path, "--data.root", str(tmp_path / "data"))
    assert cli.trainer.global_step == 2
    assert len(cli.datamodule.splits["train"]) == 5 * 8 and len(cli.datamodule.splits["test"]) == 8
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == "Adai" and optimizer.defaults["weight_decay"] == 5e-4
    assert cli.trainer.lr_scheduler_configs[0].scheduler.milestones == {80: 1, 160: 1}


@pytest.mark.slow
@pytest.mark.usefixtures("skip_cifar_checksums")
@pytest.mark.parametrize("recipe", ["cifar100_resnet34.yaml", "cifar100_densenet121.yaml"])
def test_cifar100_recipes_train_on_stand_in_data(tmp_path, recipe):
    write_fake_cifar(tmp_path / "data", "CIFAR100")
    cli = fit_recipe(recipe, tmp_path, "--data.root", str(tmp_path / "data"),
                     "--config", "recipes/optimizers/sgd.yaml")
    assert cli.trainer.global_step == 2
    assert cli.model.backbone(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
    assert type(cli.trainer.optimizers[0]).__name__ == "SGD"


def write_image_folder(root, classes=("n01", "n02"), per_class: int = 3, size: int = 40) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_image_folder_data_module_crops_and_labels(tmp_path):
    write_image_folder(tmp_path)
    data = ImageFolderDataModule(root=str(tmp_path), batch_size=4, crop_size=24, num_workers=0)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 24, 24)
    assert sorted(label for _, label in data.splits["val"]) == [0, 0, 0, 1, 1, 1]


@pytest.mark.slow
def test_imagenet_resnet50_recipe_trains_on_an_image_folder(tmp_path):
    write_image_folder(tmp_path / "imagenet")
    cli = fit_recipe("imagenet_resnet50.yaml", tmp_path, "--data.root", str(tmp_path / "imagenet"),
                     "--data.crop_size", "32", "--model.init_args.num_classes", "2")
    assert cli.trainer.global_step == 2
    assert cli.datamodule.splits["train"].classes == ["n01", "n02"]
    image, label = cli.datamodule.splits["val"][0]
    assert image.shape == (3, 32, 32) and label == 0
