"""The swarm of a mixture search: the proxy runs it needs, each in a folder named by its content, run as processes
(`cham mixture proxy RUN_DIR`) a few at a time; a run whose result exists is reused, never run again.

A run's key hashes everything its losses depend on: the proxy stage's spec (shares, token budget, seq_len, seeds,
the sources' paths and filters), each prepared source's manifest, the training settings and seed, and each held-out
stage's manifest. A rerun of the search, or a larger swarm, finds the runs it already has under out_dir/runs/.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from model.files.atomic import write_atomic
from model.mixture_search.draws import draw_mixtures, normalise
from schemas import MixtureSpec, TrainConfig, load_config, validate_config
from schemas.search_config import MixtureSearchConfig, model_for_data

REQUEST, RESULT, LOG = "request.json", "result.json", "proxy.log"
KEY_CHARS = 16  # of the sha256: a run folder's name


@dataclass(frozen=True)
class ProxyRun:
    """One proxy run: a mixture (shares by source), a training seed, why it is run, and its content key."""

    # given, fit, test, base (the base mixture), noise (the base, other seeds), replicate (a test mixture, the next
    # seed) or proposal
    role: str
    shares: dict[str, float]
    seed: int
    key: str

    @property
    def name(self) -> str:
        return self.key[:KEY_CHARS]


@dataclass(frozen=True)
class SearchSpace:
    """The searched stage: its spec, sources in order, base shares and the proxy stage's shape."""

    spec: MixtureSpec
    stage: str
    sources: list[str]
    base: dict[str, float]
    seq_len: int
    vocab_size: int
    steps: int
    data: dict[str, dict[str, str]]  # sha256 of each source's and each held-out stage's manifest: read once a search


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _stage_manifest(path: Path, what: str) -> dict[str, Any]:
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        raise ValueError(f"{what}: {path} is not a stage folder (no manifest.json; run `cham mix`)")
    return json.loads(manifest.read_text())


def search_space(config: MixtureSearchConfig) -> SearchSpace:
    """The spec's stage to search, checked: a known stage, sources on local disk, held-out stages that fit it."""
    spec = load_config(MixtureSpec, config.spec)
    stage = config.stage or next(iter(spec.stages))
    if stage not in spec.stages:
        raise ValueError(f"stage {stage!r} is not in {config.spec}; stages: {list(spec.stages)}")
    weighted = spec.sources_of(stage)
    sources = [s.name for s in weighted]
    unknown = (set(config.proposal.min_share) | set(config.proposal.max_share)) - set(sources)
    if unknown:
        raise ValueError(f"proposal shares name sources not in stage {stage!r}: {sorted(unknown)}; {sources}")
    vocab = None
    for name, path in config.heldout.items():
        layout = _stage_manifest(path, f"heldout {name!r}")["vocab_layout"]
        if vocab is not None and layout["vocab_size"] != vocab:
            raise ValueError(f"held-out stages have different vocabularies ({vocab} and {layout['vocab_size']} ids)")
        vocab = layout["vocab_size"]
    assert vocab is not None
    return SearchSpace(
        spec=spec,
        stage=stage,
        sources=sources,
        base=normalise({s.name: s.weight for s in weighted}, sources),
        seq_len=spec.seq_len,
        vocab_size=vocab,
        steps=config.proxy.steps(spec.seq_len),
        data={
            "sources": {s.name: _file_digest(Path(s.path) / "manifest.json") for s in weighted},
            "heldout": {n: _file_digest(Path(p) / "manifest.json") for n, p in sorted(config.heldout.items())},
        },
    )


def proxy_spec(space: SearchSpace, shares: dict[str, float], tokens: int) -> MixtureSpec:
    """A spec of the searched stage alone (inheritance resolved), with `shares` as its weights and `tokens` as its
    budget: what one proxy run trains on."""
    stage = space.spec.stages[space.stage]
    sources = [
        {
            "name": s.name,
            "path": s.path,
            "weight": shares[s.name],
            "max_repetitions": s.max_repetitions,
            **({"filters": list(s.filters)} if s.filters else {}),
        }
        for s in space.spec.sources_of(space.stage)
        if shares[s.name] > 0
    ]
    data = space.spec.model_dump(mode="json", exclude={"total_tokens"})
    data["stages"] = {
        space.stage: {
            "tokens": tokens,
            "sources": sources,
            "sft": stage.sft,
            **({"category_weights": stage.category_weights} if stage.category_weights else {}),
        }
    }
    return validate_config(MixtureSpec, data, f"proxy mixture {shares}")


def proxy_train_config(
    config: MixtureSearchConfig, space: SearchSpace, data: Path, out: Path, seed: int
) -> TrainConfig:
    """The proxy's short pretraining: the same model, batch, lr and tokens for every mixture."""
    proxy = config.proxy
    model = model_for_data(proxy.model, space.vocab_size, space.seq_len)
    return validate_config(
        TrainConfig,
        {
            "model": model.model_dump(mode="json"),
            "data": str(data),
            "out_dir": str(out),
            "seq_len": space.seq_len,
            "steps": space.steps,
            "global_batch_size": proxy.global_batch_size,
            "micro_batch_size": proxy.micro_batch_size,
            "optimizer": {"lr": proxy.lr},
            "schedule": {"warmup_steps": min(proxy.warmup_steps, space.steps - 1)},
            "checkpoint": {"every_steps": space.steps, "keep_last": 1},
            "logging": {"every_steps": max(1, space.steps // 10), "tensorboard": False},
            "loader_workers": 0,
            "seed": seed,
        },
        "proxy training",
        check_paths=False,  # the stage is mixed by the run itself
    )


def run_key(config: MixtureSearchConfig, space: SearchSpace, shares: dict[str, float], seed: int) -> str:
    """The content key of a proxy run (see the module docstring)."""
    spec = proxy_spec(space, shares, space.steps * config.proxy.global_batch_size * space.seq_len)
    training = config.proxy.model_dump(mode="json", exclude={"tokens", "seed"})
    content = {
        "spec": spec.model_dump(mode="json"),
        "sources": space.data["sources"],
        "training": training | {"steps": space.steps, "seed": seed},
        "heldout": space.data["heldout"],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def plan_runs(config: MixtureSearchConfig, space: SearchSpace) -> list[ProxyRun]:
    """The swarm's runs in order: given mixtures, drawn fit mixtures, drawn test mixtures and the base mixture, each
    with `swarm.seeds` training seeds; then the base with `noise_seeds` more seeds (their spread is the run-to-run
    noise; a seed the base already has is the same run, made once); then the first `replicate_tests` test mixtures
    with the next seed, proxy.seed + seeds (their pairs measure the noise away from the base; `pooled_run_noise`).

    Drawing `size + test_size` mixtures in one sequence means a larger swarm keeps the smaller one's mixtures."""
    swarm, seed = config.swarm, config.proxy.seed
    drawn = draw_mixtures(space.base, swarm.size + swarm.test_size, swarm.concentration, swarm.seed)
    # Test mixtures come from the far end of the sequence, so raising `size` does not turn test runs into fit runs.
    fit, test = drawn[: swarm.size], drawn[swarm.size :]
    mixtures = [("given", normalise(m, space.sources)) for m in swarm.mixtures]
    mixtures += [("fit", m) for m in fit] + [("test", m) for m in test] + [("base", space.base)]
    runs = [seeded_runs(config, space, role, m) for role, m in mixtures]
    noise = [seed + i for i in range(1, swarm.noise_seeds + 1)]
    replicate = seed + swarm.seeds
    return (
        [r for group in runs for r in group]
        + [ProxyRun("noise", space.base, s, run_key(config, space, space.base, s)) for s in noise]
        + [
            ProxyRun("replicate", m, replicate, run_key(config, space, m, replicate))
            for m in test[: swarm.replicate_tests]
        ]
    )


def distinct(runs: list[ProxyRun]) -> list[ProxyRun]:
    """The runs in order, each key once as it first appears (a base seed that is also a noise seed stays the base's)."""
    first: dict[str, ProxyRun] = {}
    for run in runs:
        first.setdefault(run.key, run)
    return list(first.values())


def pooled_run_noise(rows: list[dict[str, Any]], sources: list[str], names: list[str]) -> dict[str, Any]:
    """The noise of one run pooled over every mixture measured with two or more seeds (`fits.pooled_noise`): `rows`
    are a search's runs (its outcome's `runs`: seed, `share <source>` and each of `names`), grouped by mixture, each
    seed once: with `swarm.seeds` 1 the base (with its noise seeds) and each replicated test mixture (with its first
    seed); with more, every mixture. Returns `noise` (name -> the pooled std, None where no group has two values) and,
    to read it by, `groups` and `dof` (mixtures and degrees of freedom of those with every name measured)."""
    from model.mixture_search.fits import pooled_noise

    by_mixture: dict[tuple[float, ...], dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_mixture.setdefault(tuple(row[f"share {s}"] for s in sources), {}).setdefault(row["seed"], row)
    groups = [list(seeds.values()) for seeds in by_mixture.values() if len(seeds) >= 2]
    noise = {name: pooled_noise([[r[name] for r in g if r.get(name) is not None] for g in groups]) for name in names}
    measured = [n for g in groups if (n := sum(all(r.get(x) is not None for x in names) for r in g)) >= 2]
    return {"noise": noise, "groups": len(measured), "dof": sum(n - 1 for n in measured)}


def seeded_runs(config: MixtureSearchConfig, space: SearchSpace, role: str, shares: dict[str, float]) -> list[ProxyRun]:
    """One mixture's runs: training seeds proxy.seed, +1, ... (`swarm.seeds` of them)."""
    seeds = range(config.proxy.seed, config.proxy.seed + config.swarm.seeds)
    return [ProxyRun(role, shares, s, run_key(config, space, shares, s)) for s in seeds]


def write_request(config: MixtureSearchConfig, space: SearchSpace, run: ProxyRun, runs_dir: Path) -> Path:
    """The run's folder with what `cham mixture proxy` needs: the proxy spec, the train config, the held-out stages."""
    folder = runs_dir / run.name
    folder.mkdir(parents=True, exist_ok=True)
    tokens = space.steps * config.proxy.global_batch_size * space.seq_len
    (folder / "mixture.yaml").write_text(yaml.safe_dump(proxy_spec(space, run.shares, tokens).model_dump(mode="json")))
    train = proxy_train_config(config, space, folder / "mixed" / space.stage, folder / "run", run.seed)
    (folder / "train.yaml").write_text(yaml.safe_dump(train.model_dump(mode="json")))
    request = {
        **asdict(run),
        "stage": space.stage,
        "heldout": {n: str(p) for n, p in config.heldout.items()},
        "eval_batch_size": config.proxy.eval_batch_size,
        "eval_max_batches": config.proxy.eval_max_batches,
    }
    write_atomic(folder / REQUEST, json.dumps(request, indent=1))
    return folder


def read_result(folder: Path) -> dict[str, Any] | None:
    """A finished run's result, or None (never run, or stopped before its result was written)."""
    path = folder / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def run_proxy(folder: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """What `cham mixture proxy FOLDER` does: mix the proxy stage, train on it, evaluate, write result.json last.

    A run stopped part-way leaves no result: the next search starts it over (its folders are cleared first)."""
    from model.mixture_search.proxy_run import train_and_evaluate
    from pipelines.mix_job import run_mix
    from pipelines.mix_plan import MixPlanError

    request = json.loads((folder / REQUEST).read_text())
    for partial in ("mixed", "run"):
        shutil.rmtree(folder / partial, ignore_errors=True)
    spec = load_config(MixtureSpec, folder / "mixture.yaml")
    identity = {k: request[k] for k in ("key", "role", "shares", "seed")}
    try:
        manifest = run_mix(spec, folder / "mixed")["manifests"][request["stage"]]
    except MixPlanError as err:
        # A mixture that cannot be built (a source repeated past its cap at this budget) is a property of the
        # mixture, not a failure of the search: recorded with its reason, left out of the fits, never retried.
        result = {**identity, "error": str(err), "objectives": {}}
        write_atomic(folder / RESULT, json.dumps(result, indent=1))
        return result
    config = load_config(TrainConfig, folder / "train.yaml")
    result = train_and_evaluate(
        config, request["heldout"], request["eval_batch_size"], request["eval_max_batches"], log=log
    )
    result |= {
        **identity,
        "target_shares": {n: s["target_share"] for n, s in manifest["sources"].items()},
        "realized_shares": {n: s["realized_share"] for n, s in manifest["sources"].items()},
        "image_share": manifest["modality"]["image_share"],
    }
    write_atomic(folder / RESULT, json.dumps(result, indent=1))
    shutil.rmtree(folder / "mixed", ignore_errors=True)  # re-mixed in seconds if ever needed; the result is kept
    return result


def run_on_deployment(deployment: str, folder: Path, stop: threading.Event) -> None:
    """One proxy run as a flow run of `deployment` (the `mixture-proxy` flow, on whatever serves it or on a work
    pool's workers), waited for; a run that does not complete is an error naming its state. When the search stops
    (another run failed, or it was interrupted) the flow run is cancelled."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    flow_run = run_deployment(deployment, parameters={"run_dir": str(folder.resolve())}, timeout=0, as_subflow=False)
    with get_client(sync_client=True) as client:
        try:
            while True:
                state = client.read_flow_run(flow_run.id).state
                if state is not None and state.is_final():
                    break
                if stop.is_set():
                    raise RuntimeError("stopped: another proxy run failed")
                time.sleep(1.0)
        except BaseException:
            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
            raise
    if not state.is_completed():
        raise RuntimeError(f"proxy run {folder.name}: flow run {flow_run.name} of {deployment} ended {state.name}")


def run_swarm(
    config: MixtureSearchConfig,
    space: SearchSpace,
    runs: list[ProxyRun],
    progress: Callable[[int, int, ProxyRun, bool], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every run's result by key: existing results reused, the others run `swarm.parallel` at a time, each as
    `cham mixture proxy` in a process of its own that ends with this one (or as a flow run of `swarm.deployment`).
    `progress(done, total, run, reused)`."""
    from flows.subprocess_task import cham, run_command

    runs_dir = Path(config.out_dir) / "runs"
    unique = distinct(runs)
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for run in unique:
        folder = write_request(config, space, run, runs_dir)
        if (found := read_result(folder)) is not None:
            results[run.key] = found
        else:
            todo.append((run, folder))
    done = 0
    for run in unique:
        if run.key in results:
            done += 1
            if progress:
                progress(done, len(unique), run, True)
    stop = threading.Event()
    lock = threading.Lock()

    def stopped() -> None:
        if stop.is_set():
            raise RuntimeError("stopped: another proxy run failed")

    def one(run: ProxyRun, folder: Path) -> None:
        nonlocal done
        if config.swarm.deployment:
            run_on_deployment(config.swarm.deployment, folder, stop)
        else:
            run_command(cham("mixture", "proxy", str(folder)), poll=stopped, poll_every=0.5, tail_lines=20)
        with lock:
            results[run.key] = read_result(folder) or {}
            done += 1
            if progress:
                progress(done, len(unique), run, False)

    with ThreadPoolExecutor(max_workers=config.swarm.parallel, thread_name_prefix="proxy") as pool:
        # Each thread runs in a copy of this context: Prefect's settings (the API a deployment run goes to) and run
        # context are context variables, which a plain thread would not see.
        futures = [pool.submit(contextvars.copy_context().run, one, run, folder) for run, folder in todo]
        try:
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in finished if f.exception() is not None]
            if failed:
                stop.set()
                for f in futures:
                    f.cancel()
                raise failed[0].exception()  # type: ignore[misc]
        except BaseException:
            stop.set()  # an interrupt ends every running proxy process too (run_command terminates it)
            raise
    return results
