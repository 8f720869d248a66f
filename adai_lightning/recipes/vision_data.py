"""Real image data for the paper's vision recipes: CIFAR-10/100 (torchvision, optional download) and
ImageNet (an ImageFolder tree the user provides).

Missing data is an error that names the dataset, the path looked at and how to provide it. As in the
paper, CIFAR's test set is also the validation set (there is no separate validation split).
"""

from __future__ import annotations

from pathlib import Path

from adai_lightning.recipes._base import SplitDataModule

CIFAR_STATS = {  # per-channel mean and std of the training images
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class MissingDataError(FileNotFoundError):
    """The dataset is not where the recipe looks; the message says how to provide it."""


class CIFARDataModule(SplitDataModule):
    """CIFAR-10 or CIFAR-100 from ``root`` with the standard augmentation (4-pixel padded random crop,
    horizontal flip) and per-channel normalisation.

    ``download=True`` fetches the archive into ``root`` (once, on one process per node).
    """

    dataset_name = "CIFAR10"
    num_classes = 10
    augmented = True  # random crops and flips, drawn per item from (seed, epoch, index)

    def __init__(self, root: str = "data", batch_size: int = 128, download: bool = False,
                 num_workers: int = 4, shuffle_seed: int | None = None) -> None:
        super().__init__(batch_size, num_workers, shuffle_seed)
        self.root = Path(root).expanduser()
        self.download = download

    def _dataset(self, train: bool, transform=None, download: bool = False):
        import torchvision.datasets

        folder = self.root / getattr(torchvision.datasets, self.dataset_name).base_folder
        try:
            return getattr(torchvision.datasets, self.dataset_name)(
                str(self.root), train=train, transform=transform, download=download)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
            raise MissingDataError(
                f"{self.dataset_name} not found (or corrupted) under {folder}: pass --data.download true to "
                f"download it into {self.root}, or place the extracted '{folder.name}' folder of the official "
                f"python archive there (--data.root points at its parent). torchvision said: {error}"
            ) from error
        except OSError as error:  # no network while downloading
            raise MissingDataError(
                f"Could not download {self.dataset_name} into {self.root} ({error}): download the python "
                f"version of the archive on a machine with network access and extract it so that {folder} exists"
            ) from error

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._dataset(train, download=True)

    def _transforms(self, train: bool):
        from torchvision import transforms

        mean, std = CIFAR_STATS[self.dataset_name]
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train else []
        return transforms.Compose([*augment, transforms.ToTensor(), transforms.Normalize(mean, std)])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        test = self._dataset(False, self._transforms(train=False))
        self.splits = {"train": self._dataset(True, self._transforms(train=True)), "val": test, "test": test}


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 50000 training and 10000 test 32x32 colour images in 10 classes."""


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 50000 training and 10000 test 32x32 colour images in 100 classes."""

    dataset_name = "CIFAR100"
    num_classes = 100


class ImageFolderDataModule(SplitDataModule):
    """ImageNet (or any ImageFolder tree): ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

    The usual ImageNet pipeline: random-resized crops of ``crop_size`` and flips for training; resize to
    ``crop_size * 8/7`` and a centre crop for validation and test (the val split serves both).
    """

    augmented = True  # random-resized crops and flips, drawn per item from (seed, epoch, index)

    def __init__(self, root: str, batch_size: int = 256, crop_size: int = 224, num_workers: int = 8,
                 shuffle_seed: int | None = None) -> None:
        super().__init__(batch_size, num_workers, shuffle_seed)
        if crop_size < 8:
            raise ValueError(f"Invalid crop_size: {crop_size}; it must be >= 8")
        self.root = Path(root).expanduser()
        self.crop_size = crop_size

    def _folder(self, split: str, transform):
        from torchvision.datasets import ImageFolder

        path = self.root / split
        if not path.is_dir():
            raise MissingDataError(
                f"ImageNet {split} split not found at {path}: download ILSVRC2012 from https://image-net.org, "
                f"arrange it as {self.root}/train/<wnid>/*.JPEG and {self.root}/val/<wnid>/*.JPEG (one folder per "
                "class, e.g. with the valprep.sh script), and pass --data.root to its parent folder"
            )
        return ImageFolder(str(path), transform=transform)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from torchvision import transforms

        normalize = [transforms.ToTensor(), transforms.Normalize(*IMAGENET_STATS)]
        train = transforms.Compose([transforms.RandomResizedCrop(self.crop_size),
                                    transforms.RandomHorizontalFlip(), *normalize])
        evaluate = transforms.Compose([transforms.Resize(round(self.crop_size * 8 / 7)),
                                       transforms.CenterCrop(self.crop_size), *normalize])
        val = self._folder("val", evaluate)
        self.splits = {"train": self._folder("train", train), "val": val, "test": val}
