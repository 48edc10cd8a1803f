"""View sources: what the trainer asks a dataset for, whatever the dataset is.

A source lives on the training device and owns two generators: ``generator`` (training views; its state
goes into checkpoints) and ``eval_generator`` (re-seeded at every evaluation, so evaluation never
disturbs training randomness). Methods take index tensors into the chosen split.

- ``views(idx)`` -> ``[B, 2, C, H, W]`` float, two training views per input.
- ``eval_images(split, idx)`` -> ``[B, C, H, W]``, deterministic (no augmentation / fixed nuisances).
- ``random_images(split, idx)`` -> one random transformation of each input (test-time feature averaging).
- ``gp_inputs(idx, draws)`` -> ``(alpha, render, alpha_prime)`` for Foster et al.'s gradient penalty:
  ``alpha`` [B, P] transformation parameters (leaf, requires grad), ``render(alpha)`` the differentiable
  images, ``alpha_prime`` [draws, B, P] fresh parameters from the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spirograph import NUISANCE_RANGES, TARGET_RANGES, render_spirograph, sample_uniform, unit_targets

VIEWS = 2


@dataclass
class Task:
    kind: str  # "classification" | "regression"
    num_classes: int | None = None
    target_names: tuple[str, ...] | None = None


class SpirographSource:
    """Spirograph: targets fixed per sample (data seeds 0 = train, 1 = test); views redraw the nuisances.

    Evaluation images use one fixed nuisance draw per sample; probe targets are rescaled to [0, 1] by
    their sampling ranges (``unit_targets``)."""

    task = Task("regression", target_names=tuple(TARGET_RANGES))

    def __init__(self, train_size: int, test_size: int, device: torch.device, seed: int = 0):
        self.device = device
        self._targets, self._eval_nuisances, self.targets = {}, {}, {}
        for split, n, data_seed in (("train", train_size, 0), ("test", test_size, 1)):
            g = torch.Generator().manual_seed(data_seed)  # CPU draws: the same data on every device
            self._targets[split] = sample_uniform(TARGET_RANGES, n, g).to(device)
            self._eval_nuisances[split] = sample_uniform(NUISANCE_RANGES, n, g).to(device)
            self.targets[split] = unit_targets(self._targets[split])
        self.size = {"train": train_size, "test": test_size}
        self.generator = torch.Generator(device).manual_seed(seed)
        self.eval_generator = torch.Generator(device)

    def _nuisances(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return sample_uniform(NUISANCE_RANGES, n, generator, self.device)

    def views(self, idx: torch.Tensor) -> torch.Tensor:
        targets = self._targets["train"][idx].repeat_interleave(VIEWS, 0)
        images = render_spirograph(targets, self._nuisances(len(targets), self.generator))
        return images.view(len(idx), VIEWS, *images.shape[1:])

    def eval_images(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        return render_spirograph(self._targets[split][idx], self._eval_nuisances[split][idx])

    def random_images(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        return render_spirograph(self._targets[split][idx], self._nuisances(len(idx), self.eval_generator))

    def gp_inputs(self, idx: torch.Tensor, draws: int):
        targets = self._targets["train"][idx]
        alpha = self._nuisances(len(idx), self.generator).requires_grad_()
        alpha_prime = self._nuisances(draws * len(idx), self.generator).view(draws, len(idx), -1)
        return alpha, lambda a: render_spirograph(targets, a), alpha_prime


class ImageSource:
    """uint8 images on the device, augmented there with ``fastcl.augment.MultiViewAugment``.

    The gradient penalty differentiates through ``fastcl.augment.colour`` applied to the un-cropped
    training image, with Foster et al.'s colour distribution at strength 0.5."""

    GP_COLOUR_STRENGTH = 0.5

    def __init__(
        self,
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes: int,
        device: torch.device,
        preset: str = "simclr",
        strength: float = 1.0,
        seed: int = 0,
    ):
        from fastcl.augment import MultiViewAugment

        self.task = Task("classification", num_classes=num_classes)
        self.device = device
        self._images = {"train": train_images.to(device), "test": test_images.to(device)}
        self.targets = {"train": train_labels.to(device), "test": test_labels.to(device)}
        self.size = {split: len(labels) for split, labels in self.targets.items()}
        self.generator = torch.Generator(device).manual_seed(seed)
        self.eval_generator = torch.Generator(device)
        size = train_images.shape[-1]
        self._augment = MultiViewAugment(
            preset=preset, size=size, views=VIEWS, strength=strength, generator=self.generator
        )
        self._eval_augment = MultiViewAugment(
            preset=preset, size=size, views=1, strength=strength, generator=self.eval_generator
        )

    def views(self, idx: torch.Tensor) -> torch.Tensor:
        return self._augment(self._images["train"][idx])

    def eval_images(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        return self._augment.normalize(self._images[split][idx].float() / 255)

    def random_images(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        return self._eval_augment(self._images[split][idx])[:, 0]

    def gp_inputs(self, idx: torch.Tensor, draws: int):
        from fastcl.augment import colour, sample_colour_factors

        x01 = self._images["train"][idx].float() / 255
        n = len(idx)

        def factors(count: int) -> torch.Tensor:
            return sample_colour_factors(
                count, strength=self.GP_COLOUR_STRENGTH, generator=self.generator, device=self.device
            )

        alpha = factors(n).requires_grad_()
        alpha_prime = factors(draws * n).view(draws, n, -1)
        return alpha, lambda a: self._augment.normalize(colour(x01, a)), alpha_prime
