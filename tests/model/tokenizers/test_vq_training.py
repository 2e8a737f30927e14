"""VQ tokenizer training on the sample photos: halves held-out error, uses most of the codebook, resumes exactly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.tokenizers.image_preprocess import to_tensor
from model.tokenizers.vq_checkpoint import load_meta_vqgan
from model.tokenizers.vq_training import (
    VQTrainer,
    VQTrainSettings,
    find_images,
    init_codebook_from_latents,
    load_perceptual_model,
    perceptual_distance,
    random_crops,
    restart_dead_codes,
    split_holdout,
)
from model.tokenizers.vqgan import VQGAN
from schemas.vq_config import VQConfig
from tests.conftest import REPO

PHOTOS = REPO / "sample" / "images"
TINY = VQConfig.from_preset("tiny")
FAST = VQTrainSettings(steps=10, batch_size=4, log_every=5, save_every=5, restart_every=5)


@pytest.fixture(scope="module")
def images() -> list[tuple[str, bytes]]:
    return find_images([PHOTOS])


def test_find_images_in_folders_and_tars(images, sample_data) -> None:
    assert len(images) == 24 and all(data[:2] == b"\xff\xd8" for _, data in images)
    from_tars = find_images([sample_data[0] / "image_text"])
    assert len(from_tars) == 24 and from_tars[0][0] == "00000.tar/000000000.jpg"
    with pytest.raises(FileNotFoundError):
        find_images([PHOTOS / "*.gif"])


def test_holdout_split_and_crops() -> None:
    train, held = split_holdout(24, 0.15)
    assert held == [6, 13, 20] and sorted(train + held) == list(range(24))
    pool = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    crops = random_crops(pool, 4, 16, torch.Generator().manual_seed(0))
    assert crops.shape == (16, 3, 4, 4)
    flat = pool.flatten().tolist()
    assert all(v in flat for v in crops.flatten().tolist())  # every value comes from the pool


def test_codebook_init_and_dead_code_restart(images) -> None:
    torch.manual_seed(0)
    model = VQGAN(TINY)
    from model.tokenizers.image_preprocess import preprocess

    pixels = to_tensor([preprocess(data, size=64).pixels for _, data in images[:8]])
    init_codebook_from_latents(model, pixels, torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = model.latents(pixels).permute(0, 2, 3, 1).reshape(-1, TINY.embed_dim)
        nearest = torch.cdist(model.quantize.embedding.weight, latents).min(1).values
    assert nearest.max() < 0.05 * latents.std() * TINY.embed_dim**0.5  # every code sits on an encoder output
    usage = torch.zeros(TINY.n_embed, dtype=torch.long)
    usage[:200] = 1
    before = model.quantize.embedding.weight.detach().clone()
    with torch.no_grad():
        n = restart_dead_codes(model, usage, model.latents(pixels), torch.Generator().manual_seed(1))
    after = model.quantize.embedding.weight.detach()
    assert n == 56
    assert torch.equal(after[:200], before[:200]) and not torch.equal(after[200:], before[200:])


def test_train_step_loss_is_l1_l2_codebook_and_quarter_commitment(images, tmp_path: Path) -> None:
    import torch.nn.functional as F

    trainer = VQTrainer(TINY, images, tmp_path, replace(FAST, restart_every=1000))
    assert trainer.settings.beta == 0.25 and TINY.dropout == 0
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    crops = torch.Generator().set_state(trainer.generator.get_state())
    metrics = trainer.train_step()
    # The same batch through the weights before the step, loss terms recomputed by hand.
    reference = VQGAN(TINY)
    reference.load_state_dict(before)
    reference.train()
    batch = random_crops(trainer.pool, TINY.resolution, FAST.batch_size, crops)
    out = reference(batch)
    l1, l2 = F.l1_loss(out.reconstruction, batch), F.mse_loss(out.reconstruction, batch)
    expected = l1 + l2 + out.codebook_loss + 0.25 * out.commitment_loss
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["l1"] == pytest.approx(l1.item(), rel=1e-5)
    # The codebook term and the commitment term have equal values; the codebook's gradient tells them apart:
    # only the codebook term reaches the codebook, at weight 1.
    out.codebook_loss.backward()
    got = trainer.model.quantize.embedding.weight.grad
    assert torch.allclose(got, reference.quantize.embedding.weight.grad, rtol=1e-4, atol=1e-9)
    assert got.abs().sum() > 0


@pytest.mark.slow
def test_training_halves_heldout_error_and_saves_metas_format(images, tmp_path: Path) -> None:
    settings = VQTrainSettings(steps=120, batch_size=8, log_every=20, save_every=60)
    result = VQTrainer(TINY, images, tmp_path, settings).run()
    assert result.final_mse <= result.initial_mse / 2
    assert result.final_psnr > result.initial_psnr + 3
    assert result.codebook_usage >= 0.5  # most of the codebook is used
    assert (result.n_train, result.n_holdout) == (21, 3)
    assert [h["step"] for h in result.history] == [20, 40, 60, 80, 100, 120]
    model = load_meta_vqgan(tmp_path / "vqgan.ckpt")
    assert model.config.model_dump(exclude={"preset"}) == TINY.model_dump(exclude={"preset"})
    assert (tmp_path / "metrics.json").is_file()


def test_resume_continues_exactly(images, tmp_path: Path) -> None:
    straight = VQTrainer(TINY, images, tmp_path / "a", FAST)
    straight.run()
    first = VQTrainer(TINY, images, tmp_path / "b", replace(FAST, steps=5))
    first.run()
    resumed = VQTrainer(TINY, images, tmp_path / "b", FAST)
    assert resumed.try_resume() and resumed.step == 5
    resumed.run()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert [h["step"] for h in resumed.history] == [5, 10]


def test_resume_refuses_another_config(images, tmp_path: Path) -> None:
    VQTrainer(TINY, images, tmp_path, replace(FAST, steps=1)).save_state()
    other = VQConfig.from_preset("tiny", n_embed=128)
    with pytest.raises(ValueError, match="different VQ config"):
        VQTrainer(other, images, tmp_path, FAST).try_resume()


def test_optional_perceptual_loss_from_user_weights(images, tmp_path: Path) -> None:
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = features

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [self.net(x)]

    example = (torch.rand(2, 3, 64, 64),)
    exported = torch.export.export(Features(), example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(exported, tmp_path / "features.pt2")
    perceptual = load_perceptual_model(tmp_path / "features.pt2")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert perceptual_distance(perceptual, x, x).item() == 0.0
    assert perceptual_distance(perceptual, x, -x).item() > 0.0
    trainer = VQTrainer(TINY, images, tmp_path / "run", replace(FAST, steps=2), perceptual=perceptual)
    assert trainer.run().steps == 2


def test_unusable_images_are_skipped_before_the_holdout_split(images, tmp_path: Path) -> None:
    # Index 6 is where split_holdout takes its only held-out image of 8: an unusable one there used to leave the
    # held-out set empty and stop training.
    mixed = [*images[:6], ("broken.jpg", b"\xff\xd8 not a jpeg"), *images[6:8]]
    trainer = VQTrainer(TINY, mixed, tmp_path, replace(FAST, steps=1))
    assert trainer.skipped == ["broken.jpg: image_not_an_image"]
    usable = [name for name, _ in mixed if name != "broken.jpg"]
    assert trainer.names == {"train": usable[:6] + usable[7:], "holdout": [usable[6]]}
    assert len(trainer.pool) == 7 and len(trainer.holdout) == 1


def test_an_image_too_long_for_the_crop_pool_is_skipped_and_named(images, tmp_path: Path) -> None:
    import io

    from PIL import Image

    # 320,000 x 32: fits at 64 px (640,000 x 64 resized) but not at the 96 px crop pool (960,000 x 96 > 64M pixels).
    buffer = io.BytesIO()
    Image.new("RGB", (320_000, 32), (200, 100, 50)).save(buffer, "PNG")
    sliver = ("sliver.png", buffer.getvalue())
    trainer = VQTrainer(TINY, [sliver, *images[:7]], tmp_path, replace(FAST, steps=1))
    assert trainer.skipped == ["sliver.png: image_too_large at 96 px"]
    assert "sliver.png" not in trainer.names["train"] + trainer.names["holdout"]
    assert len(trainer.pool) == len(trainer.train_eval) == len(trainer.names["train"]) == 6
