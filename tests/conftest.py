"""Shared fixtures: the repository, the sample data written once per session, the example configs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.sample_corpus import write_sample_data

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "configs"


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir() -> Iterator[Path]:
    """TMPDIR for the session and every process it starts: Beam's, torch's and the libraries' temporary folders
    (Beam leaves its `beam-temp*` folders behind) go with it at exit. Outside pytest's folder, which pytest removes
    before the atexit callbacks of what ran inside the session (Prefect's test harness cleans its folder there)."""
    path = Path(tempfile.mkdtemp(prefix="cham-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)  # registered first, so it runs after the others
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    yield path
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`cham sample-data` output (folder, manifest), written once for the whole session."""
    out = tmp_path_factory.mktemp("sample") / "data"
    return out, write_sample_data(out)


@pytest.fixture()
def example_base(tmp_path: Path, sample_data: tuple[Path, dict]) -> Path:
    """A working directory where every path the example configs name exists."""
    shutil.copytree(sample_data[0], tmp_path / "data" / "sample")
    for folder in [
        "tokenizers/text",
        "tokenizers/vq",
        "mixed/stage1",
        "mixed/heldout",
        "mixed/sft",
        "runs/pretrain/checkpoints/latest",
        "runs/sft/checkpoints/latest",
    ]:
        (tmp_path / "data" / folder).mkdir(parents=True)
    for source in ["prose", "photos", "howto", "code", "instructions"]:
        (tmp_path / "data" / "prepared" / source).mkdir(parents=True)
    for example in ("mixture", "train"):  # the mixture search's spec and the real run it launches
        shutil.copy(REPO / "docs" / "configs" / f"{example}.yaml", tmp_path / "data" / f"{example}.yaml")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_tokenizers(tmp_path_factory: pytest.TempPathFactory, sample_data: tuple[Path, dict]) -> dict[str, Path]:
    """A tiny text tokenizer trained on the sample text and a tiny VQ tokenizer whose codebook comes from the
    sample photos' encoder outputs (untrained, but with well-separated codes), both saved as the jobs load them."""
    import torch

    from model.tokenizers.image_preprocess import preprocess, to_tensor
    from model.tokenizers.text_tokenizer import expand_inputs, iter_texts, train_text_tokenizer
    from model.tokenizers.vq_checkpoint import save_meta_vqgan
    from model.tokenizers.vq_training import init_codebook_from_latents
    from model.tokenizers.vqgan import VQGAN
    from schemas.vocab import TINY
    from schemas.vq_config import VQConfig

    base = tmp_path_factory.mktemp("tokenizers")
    train_text_tokenizer(iter_texts(expand_inputs([sample_data[0] / "text"])), TINY).save(base / "text")
    torch.manual_seed(0)
    vqgan = VQGAN(VQConfig.from_preset("tiny")).eval()
    photos = sorted((REPO / "sample" / "images").glob("*.jpg"))
    pixels = to_tensor([preprocess(p, size=64).pixels for p in photos])
    init_codebook_from_latents(vqgan, pixels, torch.Generator().manual_seed(0))
    save_meta_vqgan(vqgan, base / "vq")
    return {"text": base / "text", "image": base / "vq"}


@pytest.fixture(scope="session")
def prepared_sources(tmp_path_factory: pytest.TempPathFactory, sample_data, tiny_tokenizers) -> Path:
    """Every sample source prepared (embedded runner, 64 px images): one folder per source."""
    from flows.demo import SAMPLE_SOURCES
    from pipelines.prepare_job import run_prepare
    from schemas import PrepareConfig, validate_config

    raw, out = sample_data[0], tmp_path_factory.mktemp("prepared_sources")
    config = validate_config(
        PrepareConfig,
        {
            "output_dir": str(out),
            "image_size": 64,
            "samples_per_shard": 40,
            "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
            "sources": [{"name": n, "kind": k, "format": f, "paths": [str(raw / p)]} for n, k, f, p in SAMPLE_SOURCES],
        },
    )
    run_prepare(config)
    return out


@pytest.fixture(scope="session")
def make_stage(tmp_path_factory: pytest.TempPathFactory, prepared_sources: Path):
    """Build a stage of prose and photos (1 : 1) from the prepared sample: make_stage(tokens, seq_len=128, ...)."""
    from pipelines.mix_job import run_mix
    from schemas import MixtureSpec, validate_config

    def build(tokens: int, seq_len: int = 128, sequences_per_shard: int = 64, prose_weight: float = 1.0) -> Path:
        out = tmp_path_factory.mktemp("stage")
        sources = [
            {"name": "prose", "path": str(prepared_sources / "prose"), "weight": prose_weight},
            {"name": "photos", "path": str(prepared_sources / "photos"), "weight": 1.0},
        ]
        stages = {"stage1": {"tokens": tokens, "sources": sources}}
        spec = validate_config(
            MixtureSpec,
            {"seq_len": seq_len, "tokens_per_image": 64, "max_repetitions": 16, "seed": 1, "stages": stages},
        )
        run_mix(spec, out, sequences_per_shard=sequences_per_shard)
        return out / "stage1"

    return build


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, make_stage) -> Path:
    """A tiny model pretrained 30 steps on a prose + photos stage: its out_dir (checkpoints/, metrics.jsonl)."""
    from model.training.trainer import Trainer
    from schemas import TrainConfig, validate_config

    stage = make_stage(30_000)
    out = tmp_path_factory.mktemp("tiny_run")
    config = validate_config(
        TrainConfig,
        {
            "model": {"preset": "tiny"},
            "data": str(stage),
            "out_dir": str(out),
            "seq_len": 128,
            "steps": 30,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "optimizer": {"lr": 3e-3},
            "schedule": {"kind": "warmup_exponential", "warmup_steps": 3},
            "checkpoint": {"every_steps": 30},
            "logging": {"every_steps": 30, "tensorboard": False},
        },
    )
    Trainer(config, log=lambda _: None).train()
    return out


@pytest.fixture(scope="session")
def train_and_sft_stages(tmp_path_factory: pytest.TempPathFactory, prepared_sources: Path) -> Path:
    """A folder with `stage1` (prose + photos, 20,000 tokens of 128) and `sft` (4,000 tokens) stages."""
    from pipelines.mix_job import run_mix
    from schemas import MixtureSpec, validate_config

    out = tmp_path_factory.mktemp("train_and_sft_stages")
    spec = validate_config(
        MixtureSpec,
        {
            "seq_len": 128,
            "tokens_per_image": 64,
            "max_repetitions": 16,
            "stages": {
                "stage1": {
                    "tokens": 20_000,
                    "sources": [
                        {"name": "prose", "path": str(prepared_sources / "prose"), "weight": 1},
                        {"name": "photos", "path": str(prepared_sources / "photos"), "weight": 1},
                    ],
                },
                "sft": {
                    "tokens": 4_000,
                    "sft": True,
                    "sources": [{"name": "instructions", "path": str(prepared_sources / "instructions"), "weight": 1}],
                },
            },
        },
    )
    run_mix(spec, out, sequences_per_shard=64)
    return out


@pytest.fixture(scope="session")
def damage_stage():
    """damage_stage(stage, copy): copy a stage folder and damage three sequences of its first shard in place (the
    tar stays intact: a bad .npy header, a document past the sequence's end, a token id past the vocabulary)."""
    import io
    import shutil
    import tarfile

    import numpy as np

    from model.training.stage_loader import StageLoader

    def damage(stage: Path, copy: Path) -> dict[int, str]:
        """Copy the stage and damage three sequences of its first shard in place (the tar stays intact); returns
        {sequence index: what was damaged}."""
        shutil.copytree(stage, copy)
        tar_path = sorted(copy.glob("shard-*.tar"))[0]
        vocab_size = StageLoader(copy, batch_size=1).vocab_size
        data = bytearray(tar_path.read_bytes())
        with tarfile.open(tar_path) as tar:
            infos = {info.name: info for info in tar.getmembers()}
        keys = sorted({name.partition(".")[0] for name in infos})

        def put(key: str, suffix: str, payload: bytes) -> None:
            info = infos[f"{key}.{suffix}"]
            assert len(payload) == info.size
            data[info.offset_data : info.offset_data + info.size] = payload

        def array(key: str, suffix: str) -> np.ndarray:
            info = infos[f"{key}.{suffix}"]
            return np.load(io.BytesIO(bytes(data[info.offset_data : info.offset_data + info.size])))

        def npy(a: np.ndarray) -> bytes:
            buffer = io.BytesIO()
            np.save(buffer, a)
            return buffer.getvalue()

        put(keys[1], "tokens.npy", b"garbage!" + bytes(infos[f"{keys[1]}.tokens.npy"].size - 8))
        docs = array(keys[4], "docs.npy")
        docs[1, 0] = 10_000  # a document longer than the sequence
        put(keys[4], "docs.npy", npy(docs))
        tokens = array(keys[6], "tokens.npy")
        assert np.iinfo(tokens.dtype).max >= vocab_size
        tokens[3] = vocab_size  # one id past the vocabulary
        put(keys[6], "tokens.npy", npy(tokens))
        tar_path.write_bytes(bytes(data))
        return {1: "bad npy header", 4: "document bounds", 6: "token id"}

    return damage


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 API over HTTP on 127.0.0.1 (moto's standalone server, as s3fs's own tests use), with the standard AWS
    variables pointing at it for this test session (and the processes it starts): yields the endpoint URL."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from flows.process_lifetime import tied_to_this_process

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        tied_to_this_process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A new, empty bucket on the test S3 server: its s3:// URL."""
    import uuid

    import fsspec

    name = f"test-{uuid.uuid4().hex[:16]}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"
