"""Training the VQ image tokenizer: L1 + L2 reconstruction, codebook and commitment losses, codebook
initialised from encoder outputs, dead codes restarted, resumable, with held-out PSNR and codebook usage.

The result is saved in Meta's format (`vqgan.ckpt` + `vqgan.yaml`), so it loads wherever Meta's does.
"""

from __future__ import annotations

import json
import math
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model.files.atomic import atomic_path
from model.tokenizers.image_preprocess import ImageError, preprocess, to_tensor
from model.tokenizers.vq_checkpoint import save_meta_vqgan
from model.tokenizers.vqgan import VQGAN
from schemas.config_base import expand_paths
from schemas.vq_config import VQConfig

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class VQTrainSettings:
    """Knobs of a VQ training run; the defaults train the tiny preset on the sample photos in about a minute."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    beta: float = 0.25  # commitment weight
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    perceptual_weight: float = 0.1
    holdout: float = 0.15  # share of images kept out of training to measure reconstruction error
    augment_scale: float = 1.5  # images are prepared at this times the resolution, then randomly cropped
    restart_every: int = 50  # steps between dead-code restarts
    save_every: int = 200
    log_every: int = 10
    seed: int = 0


@dataclass
class VQTrainResult:
    steps: int
    initial_mse: float
    final_mse: float
    initial_psnr: float
    final_psnr: float
    codebook_usage: float  # share of codes used on the held-out and training images
    n_train: int
    n_holdout: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def find_images(inputs: Iterable[str | Path]) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in folders, files, globs and WebDataset tars (their jpg/png/webp members)."""
    images = []
    for path in expand_paths([str(i) for i in inputs]):
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                        images.append((f"{path.name}/{member.name}", tar.extractfile(member).read()))  # type: ignore[union-attr]
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append((str(path), path.read_bytes()))
    if not images:
        raise FileNotFoundError(f"no images (jpg, png, webp, ...) found in {list(map(str, inputs))}")
    return images


def split_holdout(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """Indices (train, held out): every k-th image held out, at least one of each when n >= 2."""
    if n < 2:
        return list(range(n)), list(range(n))
    k = max(2, round(1 / holdout)) if holdout > 0 else n + 1
    held = [i for i in range(n) if i % k == k - 1] or [n - 1]
    return [i for i in range(n) if i not in held], held


def random_crops(pool: Tensor, size: int, batch: int, generator: torch.Generator) -> Tensor:
    """A batch of random `size` crops with random horizontal flips from a pool [N, 3, S, S] (S >= size)."""
    n, _, s, _ = pool.shape
    idx = torch.randint(n, (batch,), generator=generator)
    ys = torch.randint(s - size + 1, (batch,), generator=generator)
    xs = torch.randint(s - size + 1, (batch,), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    crops = [
        pool[i, :, y : y + size, x : x + size] for i, y, x in zip(idx.tolist(), ys.tolist(), xs.tolist(), strict=True)
    ]
    out = torch.stack(crops)
    out[flips] = out[flips].flip(-1)
    return out


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of pixels in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def reconstruction_mse(model: VQGAN, pixels: Tensor, batch: int = 32) -> tuple[float, Tensor]:
    """Mean squared error of reconstructions of `pixels` (in [-1, 1]) and the codes used."""
    model.eval()
    errors, codes = [], []
    for part in pixels.split(batch):
        out = model(part)
        errors.append(F.mse_loss(out.reconstruction.clamp(-1, 1), part, reduction="sum").item())
        codes.append(out.codes.flatten())
    return sum(errors) / pixels.numel(), torch.cat(codes)


@torch.no_grad()
def init_codebook_from_latents(model: VQGAN, pixels: Tensor, generator: torch.Generator) -> None:
    """Codebook rows set to encoder outputs at random positions (plus a little noise), so every code starts live."""
    latents = torch.cat([model.latents(part) for part in pixels.split(32)])
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    n_embed = model.quantize.n_embed
    pick = torch.randperm(flat.shape[0], generator=generator)[:n_embed]
    if pick.numel() < n_embed:
        pick = torch.randint(flat.shape[0], (n_embed,), generator=generator)
    noise = torch.randn(n_embed, flat.shape[1], generator=generator) * flat.std() * 0.01
    model.quantize.embedding.weight.copy_(flat[pick] + noise)


@torch.no_grad()
def restart_dead_codes(model: VQGAN, usage: Tensor, latents: Tensor, generator: torch.Generator) -> int:
    """Codes unused since the last restart take random current encoder outputs; returns how many."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel():
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        pick = torch.randint(flat.shape[0], (dead.numel(),), generator=generator)
        noise = torch.randn(dead.numel(), flat.shape[1], generator=generator) * flat.std() * 0.01
        model.quantize.embedding.weight[dead] = flat[pick] + noise
    return int(dead.numel())


def load_perceptual_model(path: str | Path) -> Callable[[Tensor], list[Tensor]]:
    """A user-supplied feature network (images in [-1, 1] -> list of feature maps, e.g. LPIPS's VGG).

    `.pt2` files come from `torch.export.save` (batch dimension exported as dynamic); others are TorchScript.
    """
    path = Path(path)
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()
    else:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def perceptual_distance(features: Callable[[Tensor], list[Tensor]], a: Tensor, b: Tensor) -> Tensor:
    """Mean squared distance between channel-normalized feature maps of a and b (LPIPS without learned weights)."""
    total = a.new_zeros(())
    fa, fb = features(a), features(b)
    for x, y in zip(fa, fb, strict=True):
        x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
        y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
        total = total + (x - y).pow(2).sum(1).mean()
    return total


class VQTrainer:
    """Trains a VQGAN on a set of images; `run` resumes from `out/train_state.pt` when it exists."""

    def __init__(
        self,
        config: VQConfig,
        images: list[tuple[str, bytes]],
        out: str | Path,
        settings: VQTrainSettings | None = None,
        perceptual: Callable[[Tensor], list[Tensor]] | None = None,
    ):
        self.config = config
        self.settings = settings or VQTrainSettings()
        self.out = Path(out)
        self.perceptual = perceptual
        s, size = self.settings, config.resolution
        torch.manual_seed(s.seed)
        self.generator = torch.Generator().manual_seed(s.seed)
        # The split is over usable images, so an unusable one never leaves the held-out set empty.
        usable, at_size, self.skipped = [], [], []
        for name, data in images:
            try:
                at_size.append(preprocess(data, size=size, mode="crop").pixels)
                usable.append((name, data))
            except ImageError as err:
                self.skipped.append(f"{name}: {err.reason}")
        if len(usable) < 2:
            skipped = "; ".join(self.skipped[:3]) + (
                f"; ... {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            )
            raise ValueError(
                f"not enough usable images to train on: {len(usable)} of {len(images)} (one to train on "
                f"and one to hold out are needed){'; skipped ' + skipped if skipped else ''}"
            )
        train_idx, held_idx = split_holdout(len(usable), s.holdout)
        big, pool, kept = round(size * s.augment_scale), [], []
        for i in train_idx:  # the larger crop pool; an image can fail at this size only (too long a side)
            try:
                pool.append(preprocess(usable[i][1], size=big, mode="crop").pixels)
                kept.append(i)
            except ImageError as err:
                self.skipped.append(f"{usable[i][0]}: {err.reason} at {big} px")
        if not kept:
            raise ValueError(f"no training image is usable at the augmentation size {big} px: {self.skipped[-1]}")
        self.pool = to_tensor(pool)
        self.holdout = to_tensor([at_size[i] for i in held_idx])
        self.train_eval = to_tensor([at_size[i] for i in kept])
        self.names = {"train": [usable[i][0] for i in kept], "holdout": [usable[i][0] for i in held_idx]}
        self.model = VQGAN(config)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s.lr, betas=(0.5, 0.9))
        self.step = 0
        self.usage = torch.zeros(config.n_embed, dtype=torch.long)
        self.initial_mse: float | None = None
        self.history: list[dict[str, float]] = []

    # --- state ------------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "usage": self.usage,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "initial_mse": self.initial_mse,
            "history": json.dumps(self.history),
            "config": json.dumps(self.config.model_dump(mode="json")),
        }

    def save_state(self) -> Path:
        """Everything needed to resume, written atomically."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / STATE_FILE
        with atomic_path(path) as tmp:
            torch.save(self._state(), tmp)
        return path

    def try_resume(self) -> bool:
        """Load `train_state.pt` if present (weights_only); a different model config is refused."""
        path = self.out / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        if json.loads(state["config"]) != self.config.model_dump(mode="json"):
            raise ValueError(f"{path} was written for a different VQ config; use another --out or delete it")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.usage = state["usage"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.initial_mse = state["initial_mse"]
        self.history = json.loads(state["history"])
        return True

    # --- training ---------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        s = self.settings
        self.model.train()
        batch = random_crops(self.pool, self.config.resolution, s.batch_size, self.generator)
        out = self.model(batch)
        recon = out.reconstruction
        l1 = F.l1_loss(recon, batch)
        l2 = F.mse_loss(recon, batch)
        loss = s.l1_weight * l1 + s.l2_weight * l2 + out.codebook_loss + s.beta * out.commitment_loss
        if self.perceptual is not None and s.perceptual_weight > 0:
            loss = loss + s.perceptual_weight * perceptual_distance(self.perceptual, recon, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.usage += torch.bincount(out.codes.flatten(), minlength=self.config.n_embed)
        self.step += 1
        # Usage of the window since the last restart, measured before a restart resets it.
        usage = float((self.usage > 0).float().mean())
        if self.step % s.restart_every == 0:
            with torch.no_grad():
                restart_dead_codes(self.model, self.usage, self.model.latents(batch), self.generator)
            self.usage.zero_()
        return {
            "step": self.step,
            "loss": loss.item(),
            "l1": l1.item(),
            "psnr": psnr_from_mse(l2.item()),
            "codebook_usage": usage,
        }

    def run(self, resume: bool = True, progress: Callable[[dict[str, float]], None] | None = None) -> VQTrainResult:
        """Train to `settings.steps`, checkpointing as it goes; save the tokenizer in Meta's format at the end."""
        started = time.perf_counter()
        if not (resume and self.try_resume()):
            self.initial_mse = reconstruction_mse(self.model, self.holdout)[0]
            init_codebook_from_latents(
                self.model, self.pool[:, :, : self.config.resolution, : self.config.resolution], self.generator
            )
        s = self.settings
        while self.step < s.steps:
            metrics = self.train_step()
            if self.step % s.log_every == 0 or self.step == s.steps:
                self.history.append(metrics)
                if progress:
                    progress(metrics)
            if self.step % s.save_every == 0:
                self.save_state()
        self.save_state()
        save_meta_vqgan(self.model, self.out)
        final_mse, held_codes = reconstruction_mse(self.model, self.holdout)
        _, train_codes = reconstruction_mse(self.model, self.train_eval)
        used = torch.unique(torch.cat([held_codes, train_codes])).numel() / self.config.n_embed
        assert self.initial_mse is not None
        result = VQTrainResult(
            steps=self.step,
            initial_mse=self.initial_mse,
            final_mse=final_mse,
            initial_psnr=psnr_from_mse(self.initial_mse),
            final_psnr=psnr_from_mse(final_mse),
            codebook_usage=used,
            n_train=len(self.names["train"]),
            n_holdout=len(self.names["holdout"]),
            seconds=time.perf_counter() - started,
            history=self.history,
        )
        (self.out / METRICS_FILE).write_text(json.dumps(asdict(result) | {"images": self.names}, indent=2))
        return result
