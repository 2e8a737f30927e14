"""A read task prepared in pieces (read_parts, ReadAndPrepare) gives exactly what it gives whole."""

from __future__ import annotations

from pathlib import Path

from pipelines.prepare_job import ReadAndPrepare, plan_read_tasks, read_parts, settings_for
from schemas import PrepareConfig, validate_config


def config_for(raw: Path, tokenizers: dict[str, Path], runner: dict, **extra) -> PrepareConfig:
    return validate_config(
        PrepareConfig,
        {
            "output_dir": "/tmp/unused",
            "image_size": 64,
            "runner": runner,
            "tokenizers": {k: str(v) for k, v in tokenizers.items()},
            "sources": [
                {"name": "photos", "kind": "image_text", "format": "webdataset", "paths": [str(raw / "image_text")]},
                {"name": "howto", "kind": "interleaved", "format": "parquet", "paths": [str(raw / "interleaved")]},
            ],
            **extra,
        },
    )


def tar_with_rejects(folder: Path) -> Path:
    """A webdataset tar whose records alternate between good ones and ones rejected when read or prepared."""
    import webdataset as wds

    jpeg = next(Path(__file__).resolve().parents[2].glob("sample/images/*.jpg")).read_bytes()
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for n in range(11):
            record = {"__key__": f"{n:04d}", "jpg": jpeg, "txt": f"photo number {n}"}
            if n % 3 == 1:
                record["jpg"] = b"not a jpeg"
            elif n % 5 == 4:
                del record["jpg"]
            sink.write(record)
    return folder


def outputs(fn: ReadAndPrepare, element: tuple) -> list[tuple]:
    """(OK/REJECT, record key or reject id, its images' bytes) of one element, comparable across pieces."""
    out = []
    for tag, value in fn.process(element):
        if hasattr(value, "key"):
            out.append((tag, value.key, tuple(p.tobytes() for p in value.images), repr(value.without_pixels())))
        else:
            out.append((tag, repr(value)))
    return out


def test_pieces_together_give_the_whole_task(sample_data, tiny_tokenizers, tmp_path: Path) -> None:
    config = config_for(sample_data[0], tiny_tokenizers, {"kind": "local", "workers": 2})
    broken = tar_with_rejects(tmp_path / "broken")
    config.sources.append(config.sources[0].model_copy(update={"name": "broken", "paths": [str(broken)]}))
    seen = set()
    for source in config.sources:
        fn = ReadAndPrepare(source, settings_for(config, source))
        fn.setup()
        for shard_id, task in enumerate(plan_read_tasks(source, records_per_task=40)):
            whole = outputs(fn, (shard_id, task, 0, 1))
            assert any(o[0] == "ok" for o in whole)
            seen.update(o[0] for o in whole)
            pieces = [o for part in range(3) for o in outputs(fn, (shard_id, task, part, 3))]
            assert sorted(pieces) == sorted(whole)  # same records, same keys (indices), same rejects
            assert len(pieces) == len(whole)
        fn.teardown()
    assert seen == {"ok", "reject"}  # the sample data has rejects too: they stay with their piece


def test_read_parts_spread_few_tasks_over_the_workers(sample_data, tiny_tokenizers, tmp_path: Path) -> None:
    local2 = config_for(sample_data[0], tiny_tokenizers, {"kind": "local", "workers": 2})
    assert read_parts(local2, 15) == 3  # 45 pieces: 23 against 22 instead of 8 tasks against 7
    assert read_parts(local2, 1) == 8  # at most 8 pieces
    assert read_parts(local2, 32) == 1 and read_parts(local2, 1000) == 1  # many tasks: whole
    assert read_parts(local2, 0) == 1
    one = config_for(sample_data[0], tiny_tokenizers, {"kind": "local", "workers": 1})
    assert read_parts(one, 3) == 1
    assert read_parts(config_for(sample_data[0], tiny_tokenizers, {"kind": "embedded"}), 3) == 1
    downloads = config_for(
        sample_data[0],
        tiny_tokenizers,
        {"kind": "local", "workers": 2},
        download={"cache_dir": str(tmp_path / "cache")},
    )
    assert read_parts(downloads, 3) == 1  # a piece would fetch its task's images again
