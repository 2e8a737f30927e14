"""The Hugging Face export end to end: transformers' own AutoProcessor and ChameleonForConditionalGeneration, run on
an exported checkpoint with text and images, give our ids, our VQ codes and our logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, ChameleonForConditionalGeneration
from typer.testing import CliRunner

from flows.cli.convert import convert
from model.lm.convert import ConversionError, convert_checkpoint, save_meta, save_ours
from model.lm.hf_export import PREPROCESSOR_FILE, image_processor_config
from model.lm.transformer import Transformer
from model.tokenizers.hf_tokenizer import IMAGE_TOKEN, tokenizer_json
from model.tokenizers.image_preprocess import to_tensor
from model.tokenizers.image_tokenizer import ImageTokenizer
from model.tokenizers.mixed_tokenizer import MixedModalTokenizer
from model.tokenizers.text_tokenizer import expand_inputs, iter_texts, load_text_tokenizer
from model.tokenizers.vq_checkpoint import load_hf_vqvae
from schemas.model_config import ModelConfig
from tests.model.lm.test_convert import randomized as randomized_weights

# Sides where Meta's rounding of the resized long side (round) and HF's (int) agree: a fair comparison of pixels.
IMAGE_SIZES = [(64, 64), (150, 100), (96, 64), (192, 192)]
PROMPT = ["A photo:", 0, "and another one,", 1, "What is in them?"]


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(convert)
    app.command("noop")(lambda: None)  # two commands, so `convert` is a subcommand as in cham
    return app


def randomized(config: ModelConfig) -> Transformer:
    """Large random weights and non-trivial norms, so a layout mistake changes the logits; seeded."""
    torch.manual_seed(0)
    return randomized_weights(config)


@pytest.fixture(scope="module")
def step(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizers: dict[str, Path]) -> Path:
    """A step folder as the trainer writes it: our weights and config, and tokenizers.json naming the tokenizers."""
    folder = tmp_path_factory.mktemp("run") / "step-00000030"
    config = ModelConfig.from_preset("tiny")
    save_ours(randomized(config).state_dict(), config, folder)
    record = {"text": str(tiny_tokenizers["text"]), "image": str(tiny_tokenizers["image"])}
    (folder / "tokenizers.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def exported(step: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cham convert STEP OUT --to hf`: the format is found from the folder, the tokenizers from its record."""
    out = tmp_path_factory.mktemp("hf") / "export"
    result = CliRunner().invoke(cli(), ["convert", str(step), str(out), "--to", "hf"])
    assert result.exit_code == 0, result.output
    assert "converted ours" in result.output
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """PNG files (no JPEG draft decoding on our side) of smooth random content at IMAGE_SIZES."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        image.save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


@pytest.mark.slow
def test_transformers_runs_the_export_on_text_and_images_as_we_do(
    exported: Path, step: Path, images: list[Path], tiny_tokenizers: dict[str, Path]
) -> None:
    files = sorted(p.name for p in exported.iterdir())
    assert files == sorted(
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            PREPROCESSOR_FILE,
            "processor_config.json",
        ]
    )
    processor = AutoProcessor.from_pretrained(exported)
    hf, info = ChameleonForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    hf = hf.eval()
    # Every tensor comes from the export: none left to transformers' random init (the VQ above all), none unused.
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    text = load_text_tokenizer(tiny_tokenizers["text"])
    image_tokenizer = ImageTokenizer.load(tiny_tokenizers["image"], fast=False)
    ours = MixedModalTokenizer(text, image_tokenizer)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    model.load_state_dict(torch.load(step / "model.pt", weights_only=True))
    vocab = text.vocab

    for pair in ([0, 1], [2, 3]):
        segments = [s if isinstance(s, str) else images[pair[s]] for s in PROMPT]
        prompt = "".join(s if isinstance(s, str) else IMAGE_TOKEN for s in segments)
        inputs = processor(text=prompt, images=[Image.open(images[i]) for i in pair], return_tensors="pt")
        # The pixels are Chameleon's: Lanczos short side, center crop, (x / 255) * 2 - 1.
        pixels = to_tensor([image_tokenizer.pixels(images[i]) for i in pair])
        torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-6, rtol=0)
        # HF's VQ gives our codes (ids = code + 4), and the prompt our ids: <s> text BOI codes EOI ... separator.
        with torch.no_grad():
            hf_codes = hf.get_image_tokens(inputs["pixel_values"])
        codes = image_tokenizer.encode([images[i] for i in pair])
        assert torch.equal(hf_codes, torch.as_tensor(vocab.codes_to_ids(codes)).to(hf_codes.dtype))
        ids = inputs["input_ids"][0].clone()
        placeholder = ids == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        assert int(placeholder.sum()) == 2 * vocab.tokens_per_image
        ids[placeholder] = hf_codes.flatten().to(ids.dtype)
        expected = [vocab.bos_id, *ours.encode_segments(segments).tolist(), vocab.sep_id]
        assert ids.tolist() == expected
        # transformers' forward from input_ids + pixel_values: our logits (HF masks image-code logits to -inf).
        with torch.no_grad():
            hf_logits = hf(**inputs).logits[0]
            our_logits = model(torch.tensor([expected]))[0]
        image_columns = torch.arange(4, 4 + vocab.n_image_codes)
        assert (hf_logits[:, image_columns] == torch.finfo(hf_logits.dtype).min).all()
        keep = torch.ones(vocab.size, dtype=torch.bool)
        keep[image_columns] = False
        torch.testing.assert_close(hf_logits[:, keep], our_logits[:, keep], atol=1e-4, rtol=1e-4)
        assert hf_logits[-1, keep].argmax() == our_logits[-1, keep].argmax()

    # Our own readers take the export back: the same VQ (codes) and weights.
    reread = ImageTokenizer(load_hf_vqvae(exported), fast=False)
    assert np.array_equal(reread.encode(images), image_tokenizer.encode(images))


def test_exported_tokenizer_gives_our_ids_and_text_back(
    exported: Path, tiny_tokenizers: dict[str, Path], sample_data: tuple[Path, dict]
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = load_text_tokenizer(tiny_tokenizers["text"])
    vocab = text.vocab
    texts = list(iter_texts(expand_inputs([sample_data[0] / "text"])))[:100]
    texts += ["  two leading spaces,\ttabs\nand lines", "digits 1234567890", "ünïcödé 漢字 🙂 \u00a0nbsp", ""]
    for sample in texts:
        ids = tokenizer(sample)["input_ids"]
        assert ids == [vocab.bos_id, *text.encode(sample)], sample[:80]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text.decode(ids[1:]) == sample
    # Named tokens: Meta's names at our ids, HF's <image> right after the separator.
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 2, 1)
    assert tokenizer.sep_token_id == vocab.sep_id
    assert tokenizer.convert_tokens_to_ids(["<racm3:break>", "<eoss>", IMAGE_TOKEN]) == [
        vocab.boi_id,
        vocab.eoi_id,
        vocab.sep_id + 1,
    ]
    assert tokenizer.convert_ids_to_tokens([4, 4 + 53]) == ["IMGIMGAZ", "IMGIMGFDZ"]
    assert len(tokenizer) == vocab.size
    config = json.loads((exported / "config.json").read_text())
    assert config["vq_config"]["resolution"] == 64 and config["vq_config"]["num_embeddings"] == 256
    assert json.loads((exported / "processor_config.json").read_text())["image_seq_length"] == 64
    assert json.loads((exported / PREPROCESSOR_FILE).read_text()) == image_processor_config(64)


def test_export_refuses_what_hf_cannot_hold_naming_it(step: Path, tmp_path: Path, tiny_tokenizers) -> None:
    # Meta weights name no tokenizers: an HF export without them would give meaningless image codes.
    config = ModelConfig.from_preset("tiny")
    save_meta(randomized(config).state_dict(), config, tmp_path / "meta")
    result = CliRunner().invoke(cli(), ["convert", str(tmp_path / "meta"), str(tmp_path / "out"), "--to", "hf"])
    assert result.exit_code == 1
    assert "pass --text-tokenizer and --image-tokenizer" in result.output
    assert not (tmp_path / "out").exists()
    args = ["--text-tokenizer", str(tiny_tokenizers["text"]), "--image-tokenizer", str(tiny_tokenizers["image"])]
    result = CliRunner().invoke(cli(), ["convert", str(tmp_path / "meta"), str(tmp_path / "out"), "--to", "hf", *args])
    assert result.exit_code == 0, result.output
    assert "converted meta" in result.output and (tmp_path / "out" / "tokenizer.json").is_file()
    # A model whose vocabulary is not the tokenizer's.
    small = ModelConfig.from_preset("tiny", vocab_size=4096)
    save_ours(Transformer(small).state_dict(), small, tmp_path / "big")
    with pytest.raises(ConversionError, match="the model has 4096 ids but the text tokenizer's vocabulary 2048"):
        convert_checkpoint(
            tmp_path / "big",
            tmp_path / "o2",
            None,
            "hf",
            text_tokenizer=tiny_tokenizers["text"],
            image_tokenizer=tiny_tokenizers["image"],
        )
    with pytest.raises(ConversionError, match="tokenizers are written only by --to hf"):
        convert_checkpoint(step, tmp_path / "o3", None, "meta", text_tokenizer=tiny_tokenizers["text"])


def test_tokenizer_without_room_for_the_image_placeholder_is_refused(tiny_tokenizers) -> None:
    from model.tokenizers.hf_tokenizer import HFTokenizerError
    from model.tokenizers.text_tokenizer import SentencePieceTokenizer
    from schemas.vocab import TINY

    text = load_text_tokenizer(tiny_tokenizers["text"])
    assert isinstance(text, SentencePieceTokenizer)
    # The separator as the last reserved id: no id after it for <image>.
    layout = TINY.model_copy(update={"sep_offset": TINY.n_reserved - 1})
    cramped = SentencePieceTokenizer(text.model_proto, layout)
    with pytest.raises(HFTokenizerError, match="no reserved id after the prompt separator"):
        tokenizer_json(cramped)


def test_meta_style_tokenizer_exports_with_its_own_ids(tmp_path: Path, sample_data: tuple[Path, dict]) -> None:
    # A run tokenized with Meta's text_tokenizer.json (a tokenizers BPE): its pipeline kept, <image> named as HF does.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from model.tokenizers.hf_tokenizer import write_hf_tokenizer
    from model.tokenizers.vocabulary import image_token_name
    from schemas.vocab import reserved_token

    specials = ["<s>", "<pad>", "</s>", "<unk>", *(image_token_name(c) for c in range(256)), "<eoss>", "<racm3:break>"]
    specials += [reserved_token(i) for i in range(262, 278)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = list(iter_texts(expand_inputs([sample_data[0] / "text"])))[:50]
    tok.train_from_iterator(texts, trainer)
    tok.save(str(tmp_path / "text_tokenizer.json"))
    meta = load_text_tokenizer(tmp_path / "text_tokenizer.json")
    write_hf_tokenizer(meta, tmp_path / "hf", 512)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for sample in [*texts, "  spaces\tand ünïcödé 🙂"]:
        ids = tokenizer(sample)["input_ids"]
        assert ids == [0, *meta.encode(sample)], sample[:80]
        assert tokenizer.decode(ids, skip_special_tokens=True) == sample
    assert tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, "<racm3:break>"]) == [263, 261]
    assert tokenizer.sep_token == "<reserved00258>" and tokenizer.sep_token_id == 262


def test_transformers_truncates_the_resized_long_side_where_meta_rounds(
    exported: Path, tmp_path: Path, tiny_tokenizers: dict[str, Path]
) -> None:
    # The one preprocessing difference docs/training.md names for plain RGB files: 70 x 50 at 64 px is resized to
    # 90 x 64 by Meta's rounding (ours) and to 89 x 64 by transformers, so the center crops are a pixel apart.
    rng = np.random.default_rng(1)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    ours = ImageTokenizer.load(tiny_tokenizers["image"], fast=False).pixels(path)
    meta = Image.open(path).resize((90, 64), Image.Resampling.LANCZOS).crop((13, 0, 77, 64))
    truncated = Image.open(path).resize((89, 64), Image.Resampling.LANCZOS).crop((12, 0, 76, 64))
    assert np.array_equal(ours, np.asarray(meta))
    theirs = AutoProcessor.from_pretrained(exported).image_processor(Image.open(path), return_tensors="pt")
    torch.testing.assert_close(theirs["pixel_values"], to_tensor(np.asarray(truncated)), atol=1e-6, rtol=0)
    assert not np.array_equal(ours, np.asarray(truncated))
