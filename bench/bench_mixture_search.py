"""Mixture search (issue 21): do the fits of a proxy swarm predict mixtures they never saw, and does the proposal beat
a grid of equal compute? One run, everything side by side.

The corpus is built here from what ships with CPython and the sample photos, four sources that differ for real:
`prose` (the language reference of pydoc_data.topics), `docs` (the standard library's docstrings, as text), `code`
(standard-library functions with their docstrings cut out) and `photos` (the sample photos, cropped and flipped into
many captioned images). Each is split by topic, module or photo into train and held-out documents (disjoint), all
prepared with tiny tokenizers trained here. One held-out stage mixes the four held-out parts in equal tokens; the
objectives are its per-source losses (`val.source.<name>`), weight 1 each.

Then, with one out_dir:
1. the search: `size` fit mixtures drawn around equal weights, `test_size` test mixtures kept out of the fits, the base
   mixture with `noise_seeds` more seeds (the run-to-run noise at the base), `replicate_tests` of the test mixtures
   with a second seed (with the base's seeds, the noise pooled over the simplex), the proposal and its confirmation;
2. a second config whose `swarm.mixtures` is a lattice over the simplex with at most `size` points (equal compute),
   its runs cached beside the first's;
3. every fit kind refitted on the fit runs and scored on the test runs, per objective and for the weighted sum
   (the search itself tests only the kind it chose).
Printed: the noise (at the base, and pooled), Spearman of predicted vs actual on the test mixtures with the ceiling a
perfect predictor would reach through either noise, and the proposal's measured weighted loss against the grid's best
point, the best swarm member and the base mixture, in noise units.

    PYTHONPATH=. .venv/bin/python bench/bench_mixture_search.py [--quick] [--work DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("prose", "docs", "code", "photos")
TEXT_SOURCES = SOURCES[:3]
HELDOUT_EVERY = 8  # about one topic, module or photo in 8 goes to the held-out part (chosen by a hash of its name)
CHUNK_CHARS = 1500  # documents are cut at blank lines into chunks of at most this many characters
MIN_CHARS = 200
PHOTO_SIDE = 128  # augmented photos are stored this size (prepared at 64 px)
SEQ_LEN = 256


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big the corpus and the search are."""

    chars_per_source: int  # text characters per text source (train and held-out together)
    photo_variants: int  # crops and flips of each photo
    model: str
    tokens: int  # training tokens of every proxy run
    batch: int
    lr: float
    size: int  # fit mixtures
    test_size: int
    seeds: int  # runs of every mixture (their mean is what the fits see); size x seeds <= 48 proxy runs
    noise_seeds: int
    replicate_tests: int  # test mixtures run with a second seed: the noise pooled over the simplex
    candidates: int
    fit_kinds: tuple[str, ...] | None = None  # the search's fits.kinds; None: the config's default
    parallel: int = 2  # proxy runs at once (not part of a run's key: any value reuses the cached runs)


FULL = Sizes(
    chars_per_source=450_000,
    photo_variants=24,
    model="tiny",  # 195 steps of 2,048 tokens in about 13 CPU seconds; proxy-1m takes 3x as long
    tokens=400_000,
    batch=8,
    lr=1e-2,  # the exponential schedule averages 0.2 x the peak: a short run needs a high one
    size=48,
    test_size=16,
    seeds=1,  # 24 mixtures x 2 seeds (equal compute) ranked worse: docs/performance.md, "Mixture search"
    noise_seeds=5,
    # every test mixture: with the base's 5 noise seeds, 21 degrees of freedom for the pooled noise (8 would give 13)
    replicate_tests=16,
    candidates=50_000,
)
QUICK = Sizes(
    chars_per_source=40_000,
    photo_variants=4,
    model="tiny",
    tokens=8 * 4 * SEQ_LEN,
    batch=4,
    lr=1e-2,
    size=8,
    test_size=4,
    seeds=1,
    noise_seeds=2,
    replicate_tests=3,  # the fewest a Spearman against the replicates is computed from
    candidates=2_000,
)


def _held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def _chunks(text: str) -> list[str]:
    """`text` cut at blank lines into chunks of at most CHUNK_CHARS (a longer paragraph stays whole), short ones
    dropped."""
    out, chunk = [], []
    for para in text.split("\n\n"):
        if chunk and sum(len(p) + 2 for p in chunk) + len(para) > CHUNK_CHARS:
            out.append("\n\n".join(chunk))
            chunk = []
        chunk.append(para)
    if chunk:
        out.append("\n\n".join(chunk))
    return [c.strip() + "\n" for c in out if len(c.strip()) >= MIN_CHARS]


def _stdlib_modules() -> list[tuple[str, str, ast.Module]]:
    """(name, source, tree) of the standard library's top-level modules, sorted by name."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(lib.glob("*.py")):
        if path.stem.startswith("_") or path.stem in ("this", "antigravity"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            out.append((path.stem, source, ast.parse(source)))
        except (SyntaxError, UnicodeDecodeError):
            continue
    return out


def prose_docs() -> list[tuple[str, str]]:
    """(group, text): the language reference as `help()` shows it, one group per topic."""
    from pydoc_data.topics import topics

    return [(topic, chunk) for topic in sorted(topics) for chunk in _chunks(topics[topic])]


def _public_defs(tree: ast.Module) -> list[ast.FunctionDef | ast.ClassDef]:
    return [
        node for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_")
    ]


def docstring_docs(modules: list[tuple[str, str, ast.Module]]) -> list[tuple[str, str]]:
    """(module, text): each module's docstring and its public functions' and classes' docstrings, as plain text."""
    out = []
    for name, _, tree in modules:
        parts = [ast.get_docstring(tree) or ""]
        for node in _public_defs(tree):
            nested = node.body if isinstance(node, ast.ClassDef) else []
            for item in [node, *nested]:
                if isinstance(item, ast.FunctionDef | ast.ClassDef) and (doc := ast.get_docstring(item)):
                    parts.append(f"{item.name}: {doc}")
        out += [(name, chunk) for chunk in _chunks("\n\n".join(p for p in parts if p))]
    return out


def code_docs(modules: list[tuple[str, str, ast.Module]]) -> list[tuple[str, str]]:
    """(module, text): public top-level functions and classes as written, their docstrings cut out (they are the
    `docs` source)."""
    out = []
    for name, source, tree in modules:
        lines = source.splitlines(keepends=True)
        for node in _public_defs(tree):
            cut = set()
            for item in ast.walk(node):
                if isinstance(item, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef) and ast.get_docstring(item):
                    first = item.body[0]
                    cut.update(range(first.lineno - 1, first.end_lineno))
            start = node.lineno - 1 - len(node.decorator_list)
            text = "".join(line for i, line in enumerate(lines[start : node.end_lineno], start) if i not in cut)
            if MIN_CHARS <= len(text) <= 4 * CHUNK_CHARS:
                out.append((name, text))
    return out


def _take(docs: list[tuple[str, str]], chars: int, seed: int) -> list[tuple[str, str]]:
    """A random subset of about `chars` characters, in its original order."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    kept, total = [], 0
    for i in order:
        if total >= chars:
            break
        kept.append(i)
        total += len(docs[i][1])
    return [docs[i] for i in sorted(kept)]


def photo_variants(image_bytes: bytes, n: int, seed: int) -> list[bytes]:
    """`n` JPEGs of one photo: random square crops (55-100% of the short side), half of them mirrored."""
    from PIL import Image, ImageOps

    rng = random.Random(seed)
    with Image.open(io.BytesIO(image_bytes)) as opened:
        image = opened.convert("RGB")
    out = []
    for i in range(n):
        side = int(min(image.size) * rng.uniform(0.55, 1.0))
        x, y = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
        crop = image.crop((x, y, x + side, y + side)).resize((PHOTO_SIDE, PHOTO_SIDE), Image.LANCZOS)
        if i % 2:
            crop = ImageOps.mirror(crop)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_corpus(raw: Path, sizes: Sizes) -> dict[str, dict[str, int]]:
    """The four sources' train and held-out inputs under raw/{train,heldout}/<source>/; returns document counts."""
    from pipelines.sample_corpus import SampleCorpus, write_image_text

    modules = _stdlib_modules()
    texts = {"prose": prose_docs(), "docs": docstring_docs(modules), "code": code_docs(modules)}
    counts: dict[str, dict[str, int]] = {"train": {}, "heldout": {}}
    for i, (source, docs) in enumerate(texts.items()):
        docs = _take(docs, sizes.chars_per_source, seed=i)
        for part in ("train", "heldout"):
            chosen = [(g, t) for g, t in docs if _held_out(g) == (part == "heldout")]
            folder = raw / part / source
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / "docs.jsonl").open("w", encoding="utf-8") as f:
                for n, (group, text) in enumerate(chosen):
                    f.write(json.dumps({"id": f"{source}-{group}-{n}", "text": text}) + "\n")
            counts[part][source] = len(chosen)
    corpus = SampleCorpus.load()
    for part in ("train", "heldout"):
        photos = [im for im in corpus.images if _held_out(im["file"]) == (part == "heldout")]
        images, image_bytes = [], {}
        for p, photo in enumerate(photos):
            for v, data in enumerate(photo_variants(corpus.image_bytes[photo["file"]], sizes.photo_variants, seed=p)):
                name = f"{Path(photo['file']).stem}-{v:03d}.jpg"
                images.append({**photo, "file": name, "width": PHOTO_SIDE, "height": PHOTO_SIDE})
                image_bytes[name] = data
        subset = dataclasses.replace(corpus, images=images, image_bytes=image_bytes, interleaved=[], sft=[])
        write_image_text(subset, raw / part / "photos")
        counts[part]["photos"] = len(images)
    return counts


def make_tokenizers(raw: Path, out: Path) -> dict[str, Path]:
    """A tiny text tokenizer trained on the train text, and a tiny VQ whose codebook comes from the train photos'
    encoder outputs (untrained, but every code live and well separated), as tests/conftest.py makes them."""
    import torch
    import webdataset as wds

    from model.tokenizers.image_preprocess import preprocess, to_tensor
    from model.tokenizers.text_tokenizer import iter_texts, train_text_tokenizer
    from model.tokenizers.vq_checkpoint import save_meta_vqgan
    from model.tokenizers.vq_training import init_codebook_from_latents
    from model.tokenizers.vqgan import VQGAN
    from schemas.vocab import TINY
    from schemas.vq_config import VQConfig

    files = [raw / "train" / s / "docs.jsonl" for s in TEXT_SOURCES]
    train_text_tokenizer(iter_texts(files), TINY).save(out / "text")
    torch.manual_seed(0)
    vqgan = VQGAN(VQConfig.from_preset("tiny")).eval()
    tars = sorted(str(p) for p in (raw / "train" / "photos").glob("*.tar"))
    jpegs = [sample["jpg"] for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False)]
    pixels = to_tensor([preprocess(j, size=64).pixels for j in jpegs])
    init_codebook_from_latents(vqgan, pixels, torch.Generator().manual_seed(0))
    save_meta_vqgan(vqgan, out / "vq")
    return {"text": out / "text", "image": out / "vq"}


def prepare(raw: Path, out: Path, tokenizers: dict[str, Path]) -> dict[str, int]:
    """Both parts of every source prepared in one job (`<source>` and `<source>-heldout`); returns tokens per
    prepared source."""
    from pipelines.prepare_job import run_prepare
    from schemas import PrepareConfig, validate_config

    sources = []
    for part, suffix in (("train", ""), ("heldout", "-heldout")):
        for s in TEXT_SOURCES:
            sources.append({"name": s + suffix, "kind": "text", "format": "jsonl", "paths": [str(raw / part / s)]})
        sources.append(
            {
                "name": "photos" + suffix,
                "kind": "image_text",
                "format": "webdataset",
                "paths": [str(raw / part / "photos" / "*.tar")],
            }
        )
    config = validate_config(
        PrepareConfig,
        {
            "output_dir": str(out),
            "image_size": 64,
            "samples_per_shard": 400,
            "detect_faces": False,
            "tokenizers": {k: str(v) for k, v in tokenizers.items()},
            "sources": sources,
        },
    )
    result = run_prepare(config)
    return {
        name: int(sum(shard.get("tokens", 0) for shard in manifest["shards"]))
        for name, manifest in result["manifests"].items()
    }


def heldout_stage(prepared: Path, out: Path, tokens: dict[str, int]) -> Path:
    """The held-out stage: the four held-out parts in equal tokens (nearly all of the smallest, none repeated), each
    source under its train name (so a run's `val.source.code` is its loss on held-out code)."""
    from pipelines.mix_job import run_mix
    from schemas import MixtureSpec, validate_config

    spec = validate_config(
        MixtureSpec,
        {
            "seq_len": SEQ_LEN,
            "tokens_per_image": 64,
            "max_repetitions": 1,
            "seed": 7,
            "stages": {
                "heldout": {
                    "tokens": int(0.9 * len(SOURCES) * min(tokens[f"{s}-heldout"] for s in SOURCES)),
                    "sources": [{"name": s, "path": str(prepared / f"{s}-heldout"), "weight": 1} for s in SOURCES],
                }
            },
        },
    )
    run_mix(spec, out, sequences_per_shard=256)
    return out / "heldout"


def search_config(work: Path, prepared: Path, heldout: Path, sizes: Sizes, **swarm: Any) -> Path:
    """A search config over the four train sources (equal base weights), objectives the per-source held-out
    losses; `swarm` overrides the swarm settings. Repetition caps are loose: no constraint binds, as on the grid."""
    import yaml

    spec = {
        "seq_len": SEQ_LEN,
        "tokens_per_image": 64,
        "max_repetitions": 64,
        "seed": 1,
        "stages": {
            "stage1": {
                "tokens": sizes.tokens,
                "sources": [{"name": s, "path": str(prepared / s), "weight": 1} for s in SOURCES],
            }
        },
    }
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    config = {
        "spec": str(work / "spec.yaml"),
        "out_dir": str(work / "search"),
        "heldout": {"val": str(heldout)},
        "objective": {f"val.source.{s}": 1.0 for s in SOURCES},
        "proxy": {
            "model": {"preset": sizes.model},
            "tokens": sizes.tokens,
            "global_batch_size": sizes.batch,
            "micro_batch_size": sizes.batch,
            "lr": sizes.lr,
            "warmup_steps": 10,
            "eval_batch_size": 32,
        },
        "swarm": {
            "size": sizes.size,
            "test_size": sizes.test_size,
            "concentration": 1.0,
            "seeds": sizes.seeds,
            "noise_seeds": sizes.noise_seeds,
            "replicate_tests": sizes.replicate_tests,
            "seed": 0,
            "parallel": sizes.parallel,
            **swarm,
        },
        # the report scores every kind on the test mixtures whichever the search chooses from
        "fits": {"folds": 5, **({"kinds": list(sizes.fit_kinds)} if sizes.fit_kinds else {})},
        "proposal": {"candidates": sizes.candidates, "top_k": 100, "confirm": True},
    }
    name = "grid.yaml" if swarm else "search.yaml"
    (work / name).write_text(yaml.safe_dump(config))
    return work / name


def build(work: Path, sizes: Sizes) -> dict[str, Any]:
    """Corpus, tokenizers, prepared sources and the held-out stage under `work`; reused when already there."""
    done = work / "built.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    counts = write_corpus(work / "raw", sizes)
    tokenizers = make_tokenizers(work / "raw", work / "tokenizers")
    tokens = prepare(work / "raw", work / "prepared", tokenizers)
    heldout = heldout_stage(work / "prepared", work / "mixed", tokens)
    built = {"documents": counts, "tokens": tokens, "heldout": str(heldout), "build_s": time.perf_counter() - t0}
    done.write_text(json.dumps(built, indent=1))
    return built


def lattice(sources: tuple[str, ...] | list[str], steps: int) -> list[dict[str, float]]:
    """Every mixture whose shares are multiples of 1 / steps: C(steps + K - 1, K - 1) points over K sources."""
    points = []
    for cuts in itertools.combinations(range(steps + len(sources) - 1), len(sources) - 1):
        # stars and bars: the gaps between the cuts are the sources' counts of 1 / steps
        edges = [-1, *cuts, steps + len(sources) - 1]
        counts = [edges[i + 1] - edges[i] - 1 for i in range(len(sources))]
        points.append({s: c / steps for s, c in zip(sources, counts, strict=True)})
    return points


def grid_steps(n_sources: int, most: int) -> int:
    """The finest lattice over n_sources with at most `most` points (equal compute with `most` swarm runs)."""
    steps = 1
    while math.comb(steps + 1 + n_sources - 1, n_sources - 1) <= most:
        steps += 1
    return steps


def score_fits(
    outcome: dict[str, Any],
    objectives: list[str],
    kinds: list[str],
    seed: int,
    noise: dict[str, dict[str, float]],
) -> list[dict[str, Any]]:
    """Every fit kind refitted on the search's fit mixtures and scored on its test mixtures (losses averaged over
    each mixture's seeds, as the search fits them), per objective and for the weighted sum (the sum of a kind's
    predictions against the measured sum); `attainable <what>` is the Spearman a perfect predictor would reach
    against these test runs given `noise[what]` (each objective's noise of a mixture: `base`, measured at the base
    mixture, and `pooled`, over every mixture with two or more seeds). `spearman replicate`: the same predictions
    against the replicated test mixtures' second seed, runs no fit has seen the seed of (a fit can learn a seed's
    effect on its own seed's test runs; this figure cannot be inflated by that)."""
    import numpy as np
    from scipy.stats import spearmanr

    from model.mixture_search import fits

    sources = outcome["sources"]
    rows = outcome["mixtures"]
    train = [r for r in rows if r["role"] in ("given", "fit", "base")]
    test = [r for r in rows if r["role"] == "test"]
    replicates = [r for r in outcome["runs"] if r["role"] == "replicate"]

    def shares(runs: list[dict]) -> np.ndarray:
        return np.array([[r[f"share {s}"] for s in sources] for r in runs])

    report = []

    def against_replicates(predicted: np.ndarray, name: str) -> dict[str, float | None]:
        if len(replicates) < 3:
            return {}
        actual = [r[name] for r in replicates]
        return {"spearman replicate": round(float(spearmanr(actual, predicted).statistic), 3)}

    for kind in kinds:
        summed, summed_rep = np.zeros(len(test)), np.zeros(len(replicates))
        for name in objectives:
            model = fits.fit(kind, shares(train), [r[name] for r in train], seed=seed)
            quality = fits.evaluate(model, shares(test), [r[name] for r in test])
            summed += np.array(quality.predicted)
            figures = _quality_figures(quality.as_dict())
            on_replicates = model.predict(shares(replicates))[0] if replicates else np.zeros(0)
            summed_rep += on_replicates
            report.append(
                {
                    "kind": kind,
                    "objective": name,
                    **figures,
                    **against_replicates(on_replicates, name),
                    **_attainable(noise, name, quality.actual),
                }
            )
        actual = np.array([r["weighted"] for r in test])
        rho = float(spearmanr(actual, summed).statistic)
        rmse = float(np.sqrt(np.mean((summed - actual) ** 2)))
        report.append(
            {
                "kind": kind,
                "objective": "weighted",
                "spearman": round(rho, 3),
                "rmse": round(rmse, 4),
                **against_replicates(summed_rep, "weighted"),
                **_attainable(noise, "weighted", actual),
            }
        )
    return report


def _attainable(noise: dict[str, dict[str, float]], name: str, actual: Any) -> dict[str, float | None]:
    from model.mixture_search import fits

    return {f"attainable {what}": _round(fits.attainable_spearman(n.get(name), actual)) for what, n in noise.items()}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _quality_figures(quality: dict[str, Any]) -> dict[str, Any]:
    keep = ("spearman", "rmse", "mean_rmse", "skill", "within_2std")
    return {k: round(quality[k], 4) if quality[k] is not None else None for k in keep}


def run_grid(
    work: Path, prepared: Path, heldout: Path, sizes: Sizes, counts: dict[str, int]
) -> tuple[list[dict[str, Any]], int]:
    """The lattice's runs, as `swarm.mixtures` of a second config with the search's out_dir (runs it shares, such
    as the base mixture, are reused); returns (one row per point: shares and weighted loss, lattice steps)."""
    from flows.mixture_proposal import mixtures_of
    from flows.mixture_swarm import plan_runs, run_swarm, search_space
    from schemas import MixtureSearchConfig, load_config

    steps = grid_steps(len(SOURCES), sizes.size)
    points = lattice(SOURCES, steps)
    path = search_config(
        work, prepared, heldout, sizes, size=0, test_size=0, noise_seeds=0, replicate_tests=0, mixtures=points
    )
    config = load_config(MixtureSearchConfig, path)
    space = search_space(config)
    runs = [r for r in plan_runs(config, space) if r.role == "given"]
    results = run_swarm(config, space, runs, progress=_progress("grid", counts))
    rows = [
        {"shares": m.shares, "weighted": m.weighted(config.objective)}
        for m in mixtures_of(runs, results, list(config.objective))
    ]
    return rows, steps


def _progress(what: str, counts: dict[str, int]):
    """A progress callback that prints each run and counts the runs made and reused."""

    def show(done: int, total: int, run, reused: bool) -> None:
        counts["reused" if reused else "ran"] += 1
        print(f"  {what} {done}/{total} {run.role:8s} {'reused' if reused else 'ran'}", flush=True)

    return show


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the proxy processes)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(work: Path, sizes: Sizes) -> dict[str, Any]:
    """Build, search, grid, score: the report."""
    from flows.mixture_proposal import search
    from flows.mixture_swarm import pooled_run_noise
    from model.mixture_search.fits import FIT_KINDS
    from schemas import MixtureSearchConfig, load_config

    t0, cpu0 = time.perf_counter(), _cpu_s()
    built = build(work, sizes)
    prepared, heldout = work / "prepared", Path(built["heldout"])
    config = load_config(MixtureSearchConfig, search_config(work, prepared, heldout, sizes))
    t1, cpu1 = time.perf_counter(), _cpu_s()
    counts = {"ran": 0, "reused": 0}
    outcome = search(config, progress=_progress("search", counts), log=lambda line: print(line, flush=True))
    t2, cpu2 = time.perf_counter(), _cpu_s()
    grid, steps = run_grid(work, prepared, heldout, sizes, counts)
    t3, cpu3 = time.perf_counter(), _cpu_s()

    objectives = list(config.objective)
    # one run's noise pooled over the base's seeds and the replicated test mixtures' pairs
    pooled = pooled_run_noise(outcome["runs"], outcome["sources"], [*objectives, "weighted"])
    # of a mixture's mean over its seeds
    mixture_noise = {
        what: {k: v / sizes.seeds**0.5 for k, v in measured.items() if v is not None}
        for what, measured in (("base", outcome["noise"]), ("pooled", pooled["noise"]))
    }
    noise = mixture_noise["base"].get("weighted")
    pooled_noise = mixture_noise["pooled"].get("weighted")
    fit_values = [r["weighted"] for r in outcome["mixtures"] if r["role"] in ("fit", "test")]
    confirmation = outcome["confirmation"]
    best_grid = min(grid, key=lambda row: row["weighted"])
    measured = confirmation["weighted"]

    def in_noise(value: float, noise: float | None) -> float | None:
        return round(value / noise, 2) if noise else None

    compare = {
        name: {
            "weighted": other,
            "proposal_minus": measured - other,
            "in_noise_units": in_noise(measured - other, noise),
            "in_pooled_noise_units": in_noise(measured - other, pooled_noise),
        }
        for name, other in (
            ("grid_best", best_grid["weighted"]),
            ("swarm_best", confirmation["best_swarm_weighted"]),
            ("base", confirmation["base_weighted"]),
        )
    }
    return {
        "sizes": dataclasses.asdict(sizes),
        "documents": built["documents"],
        "tokens": built["tokens"],
        "steps": outcome["steps"],
        "runs": {
            "search": len(outcome["runs"]) + sizes.seeds,  # and the confirmation
            "grid_points": len(grid),
            "lattice_steps": steps,
            **counts,
        },
        "build_s_when_built": round(built["build_s"], 1),
        "cpu_s_per_run_made": round((cpu3 - cpu1) / counts["ran"], 1) if counts["ran"] else None,
        "time_s": {"build": round(t1 - t0, 1), "search": round(t2 - t1, 1), "grid": round(t3 - t2, 1)},
        "cpu_s": {"build": round(cpu1 - cpu0, 1), "search": round(cpu2 - cpu1, 1), "grid": round(cpu3 - cpu2, 1)},
        "noise": outcome["noise"],
        "noise_pooled": pooled["noise"],
        "noise_pooled_over": {"mixtures": pooled["groups"], "dof": pooled["dof"]},
        "noise_of_a_mixture": mixture_noise,
        "swarm_spread": float(_std(fit_values)),
        "chosen": {r["objective"]: r["kind"] for r in outcome["cross_validation"] if r.get("chosen")},
        "search_test": [
            {"objective": t["objective"], "kind": t["kind"], **_quality_figures(t)} for t in outcome["test"]
        ],
        "test_by_kind": score_fits(outcome, objectives, list(FIT_KINDS), config.swarm.seed, mixture_noise),
        "proposal": {
            "shares": outcome["proposal"]["shares"],
            "predicted_weighted": confirmation["predicted_weighted"],
            "measured_weighted": measured,
            "measured": confirmation["objectives"],
        },
        "grid_best": best_grid,
        "swarm_best_shares": confirmation["best_swarm_shares"],
        "compare": compare,
    }


def _std(values: list[float]) -> float:
    import numpy as np

    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def print_report(report: dict[str, Any]) -> None:
    """The figures, as a few readable lines."""
    print(
        f"\nproxy runs: {report['runs']}, {report['steps']} steps each; time {report['time_s']}, CPU {report['cpu_s']}"
    )
    print(f"CPU seconds per proxy run made: {report['cpu_s_per_run_made']}")
    over = report["noise_pooled_over"]
    for what, noise in (
        ("noise at the base (std of the base mixture over seeds)", report["noise"]),
        (f"noise pooled ({over['mixtures']} mixtures with 2+ seeds, {over['dof']} dof)", report["noise_pooled"]),
    ):
        print(f"{what}: " + ", ".join(f"{k} {v:.4f}" for k, v in noise.items() if v))
    seeds = report["sizes"]["seeds"]
    for what, noise in report["noise_of_a_mixture"].items():
        figures = ", ".join(f"{k} {v:.4f}" for k, v in noise.items())
        print(f"noise ({what}) of a mixture's mean over its {seeds} seeds: {figures}")
    spread = report["swarm_spread"]
    ratios = [
        f"{spread / noise['weighted']:.1f} x {what} noise"
        for what, noise in report["noise_of_a_mixture"].items()
        if noise.get("weighted")
    ]
    print(
        f"std of the weighted loss over the swarm's mixtures: {spread:.4f}"
        + (f" ({', '.join(ratios)})" if ratios else "")
    )
    print("Spearman of predicted vs actual on the test mixtures (goal >= 0.9), and what a perfect predictor attains")
    print("through the noise at the base and through the pooled noise:")
    from model.mixture_search.fits import FIT_KINDS

    kinds = sorted({r["kind"] for r in report["test_by_kind"]}, key=FIT_KINDS.index)
    names = list(dict.fromkeys(r["objective"] for r in report["test_by_kind"]))
    ceilings = list(report["noise_of_a_mixture"])
    head = "".join(f"{'attainable ' + w:>19s}" for w in ceilings)
    print(f"  {'objective':24s}" + "".join(f"{k:>11s}" for k in kinds) + f"{head}   chosen")
    for name in names:
        rows = [r for r in report["test_by_kind"] if r["objective"] == name]
        cells = {r["kind"]: r["spearman"] for r in rows}
        attainable = [rows[0][f"attainable {w}"] for w in ceilings]
        print(
            f"  {name:24s}"
            + "".join(f"{cells[k]:>11.3f}" if cells.get(k) is not None else f"{'-':>11s}" for k in kinds)
            + "".join(f"{a:>19.3f}" if a is not None else f"{'-':>19s}" for a in attainable)
            + f"   {report['chosen'].get(name, '')}"
        )
    if any("spearman replicate" in r for r in report["test_by_kind"]):
        n = report["sizes"]["replicate_tests"]
        print(f"the same predictions against the second seed of {n} test mixtures (a seed no fit has seen):")
        for name in names:
            cells = {r["kind"]: r.get("spearman replicate") for r in report["test_by_kind"] if r["objective"] == name}
            print(
                f"  {name:24s}"
                + "".join(f"{cells[k]:>11.3f}" if cells.get(k) is not None else f"{'-':>11s}" for k in kinds)
            )
    proposal = report["proposal"]
    predicted = proposal["predicted_weighted"]
    print(f"proposal {proposal['shares']}: predicted {predicted['mean']:.4f} +- {predicted['std']:.4f}", end="")
    print(f", measured {proposal['measured_weighted']:.4f}")
    print(f"grid best {report['grid_best']['shares']}: {report['grid_best']['weighted']:.4f}")
    for name, row in report["compare"].items():
        print(
            f"  proposal - {name}: {row['proposal_minus']:+.4f} ({row['in_noise_units']} x base noise, "
            f"{row['in_pooled_noise_units']} x pooled noise)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny corpus, model and swarm: checks the script runs")
    parser.add_argument("--work", type=Path, help="keep the corpus and runs here (a rerun reuses them)")
    parser.add_argument("--model", help="proxy preset (default: tiny)")
    parser.add_argument("--tokens", type=int, help="training tokens of each proxy run")
    parser.add_argument(
        "--seeds", type=int, help="runs of every mixture (averaged); the swarm and the grid keep 48 runs: 48 / seeds"
    )
    parser.add_argument(
        "--fit-kinds", help="comma-separated fits the search chooses from (default: the config's default)"
    )
    parser.add_argument(
        "--replicate-tests",
        type=int,
        help="test mixtures run with a second seed, for the pooled noise (default: 16, all; --quick 2)",
    )
    parser.add_argument(
        "--parallel", type=int, help="proxy runs at once (default: 2; cached runs are reused either way)"
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    sizes = dataclasses.replace(sizes, model=args.model or sizes.model, tokens=args.tokens or sizes.tokens)
    if args.seeds:
        sizes = dataclasses.replace(sizes, seeds=args.seeds, size=sizes.size * sizes.seeds // args.seeds)
    if args.replicate_tests is not None:
        sizes = dataclasses.replace(sizes, replicate_tests=args.replicate_tests)
    if args.parallel:
        sizes = dataclasses.replace(sizes, parallel=args.parallel)
    if args.fit_kinds:
        sizes = dataclasses.replace(sizes, fit_kinds=tuple(args.fit_kinds.split(",")))
    # Two proxy processes at once on two cores: one thread each, or they fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run(work, sizes)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
