"""Mixture search on the prepared sample: proxy runs (real mixes, real training) cached by content and reused, fits,
a proposal within its constraints, the CLI; the flow's approval through a real server is in
test_mixture_search_approval.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.mixture_proposal import SEARCH_FILE, approved_spec, search
from flows.mixture_swarm import RESULT, plan_runs, pooled_run_noise, run_key, search_space
from model.mixture_search.fits import pooled_noise
from schemas import MixtureSearchConfig, MixtureSpec, load_config, validate_config

pytestmark = pytest.mark.slow
SOURCES = ("prose", "code", "photos")


def write_search_config(folder: Path, prepared: Path, heldout: Path, **changes) -> Path:
    """A tiny search: 6 drawn mixtures of 3 sample sources, 4-step proxies of the tiny model."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "seq_len": 128,
        "tokens_per_image": 64,
        "max_repetitions": 64,
        "seed": 1,
        "stages": {
            "stage1": {
                "tokens": 200_000,
                "sources": [{"name": n, "path": str(prepared / n), "weight": 1} for n in SOURCES],
            }
        },
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    config = {
        "spec": str(folder / "spec.yaml"),
        "out_dir": str(folder / "search"),
        "heldout": {"val": str(heldout)},
        "objective": {"val.text": 1.0, "val.image": 1.0},
        "proxy": {
            "model": {"preset": "tiny"},
            "tokens": 4 * 8 * 128,
            "global_batch_size": 8,
            "micro_batch_size": 8,
            "warmup_steps": 1,
            "eval_max_batches": 2,
        },
        "swarm": {"size": 6, "noise_seeds": 1, "parallel": 2, "seed": 5},
        "fits": {"kinds": ["loglinear", "gp"], "folds": 3},
        "proposal": {"candidates": 2000, "top_k": 20, "max_share": {"photos": 0.3}, "min_share": {"prose": 0.2}},
    }
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def heldout(make_stage) -> Path:
    return make_stage(3_000)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, prepared_sources: Path, heldout: Path) -> tuple[Path, dict]:
    """One search, run once for the module; later searches with the same settings reuse its runs."""
    path = write_search_config(tmp_path_factory.mktemp("search"), prepared_sources, heldout)
    return path, search(load_config(MixtureSearchConfig, path), log=lambda _: None)


def test_every_run_is_a_real_proxy_run_with_its_losses(searched) -> None:
    path, outcome = searched
    config = load_config(MixtureSearchConfig, path)
    runs = plan_runs(config, search_space(config))
    assert [r.role for r in runs] == ["fit"] * 6 + ["base", "noise"]
    assert len(outcome["runs"]) == 8
    for run in runs:
        result = json.loads((Path(config.out_dir) / "runs" / run.name / RESULT).read_text())
        assert result["steps"] == 4
        assert set(result["objectives"]) >= {"val.loss", "val.text", "val.image"}
        # the proxy's stage was mixed to the run's shares (realized: up to whole documents of a 4k-token stage)
        assert result["target_shares"] == pytest.approx({s: v for s, v in run.shares.items() if v > 0}, abs=1e-6)
        assert sum(result["realized_shares"].values()) == pytest.approx(1.0)
    base, noise = (r for r in outcome["runs"] if r["role"] in ("base", "noise"))
    assert base["weighted"] != noise["weighted"]  # another seed, another loss: the noise is measured
    assert outcome["noise"]["weighted"] == pytest.approx(abs(base["weighted"] - noise["weighted"]) / 2**0.5)


def test_the_proposal_keeps_its_constraints_and_is_confirmed(searched) -> None:
    _, outcome = searched
    shares = outcome["proposal"]["shares"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert shares["photos"] <= 0.3 + 1e-6 and shares["prose"] >= 0.2 - 1e-6
    assert outcome["constraints"]["max_share"]["photos"] == 0.3
    confirmation = outcome["confirmation"]
    assert confirmation["weighted"] == pytest.approx(
        confirmation["objectives"]["val.text"] + confirmation["objectives"]["val.image"]
    )
    assert confirmation["best_swarm_weighted"] == min(r["weighted"] for r in outcome["runs"] if r["role"] != "noise")
    chosen = [r for r in outcome["cross_validation"] if r.get("chosen")]
    assert sorted(r["objective"] for r in chosen) == ["val.image", "val.text"]
    assert all(len(r["predicted"]) == 7 for r in chosen)  # 6 drawn + the base, each predicted out of fold


def test_a_rerun_reuses_every_run_and_a_larger_swarm_runs_only_the_new_ones(searched) -> None:
    path, first = searched
    config = load_config(MixtureSearchConfig, path)
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in Path(config.out_dir).glob(f"runs/*/{RESULT}")}
    seen: list[tuple[str, bool]] = []
    again = search(config, progress=lambda d, t, run, reused: seen.append((run.role, reused)), log=lambda _: None)
    assert all(reused for _, reused in seen) and len(seen) == 9  # 8 swarm runs and the confirmation
    assert again["proposal"] == first["proposal"]  # same runs, same seed: the same fits and proposal, exactly
    larger = config.model_copy(update={"swarm": config.swarm.model_copy(update={"size": 8})})
    seen.clear()
    search(larger, progress=lambda d, t, run, reused: seen.append((run.role, reused)), log=lambda _: None)
    ran = [role for role, reused in seen if not reused]
    assert ran[:2] == ["fit", "fit"]  # the two new draws; the first six are the same mixtures, reused
    after = {p.parent.name: p.stat().st_mtime_ns for p in Path(config.out_dir).glob(f"runs/*/{RESULT}")}
    assert all(after[name] == stamp for name, stamp in stamps.items())


def test_seeds_average_each_mixture_and_the_fits_see_the_means(searched) -> None:
    path, first = searched
    config = load_config(MixtureSearchConfig, path)
    seeded = config.model_copy(update={"swarm": config.swarm.model_copy(update={"seeds": 2})})
    runs = plan_runs(seeded, search_space(seeded))
    assert [(r.role, r.seed) for r in runs] == [("fit", 0), ("fit", 1)] * 6 + [("base", 0), ("base", 1), ("noise", 1)]
    seen: list[tuple[str, bool]] = []
    outcome = search(seeded, progress=lambda d, t, run, reused: seen.append((run.role, run.seed, reused)), log=print)
    # seed 0 of every mixture, and the noise run (= the base's seed 1), were made by the first search
    made_before = [("fit", 0, True)] * 6 + [("base", 0, True), ("base", 1, True)]
    made_now = [("fit", 1, False)] * 6 + [("proposal", 0, False), ("proposal", 1, False)]
    assert sorted(seen) == sorted(made_before + made_now)
    assert len(outcome["runs"]) == 14  # the base's seed 1 is the noise run: listed once
    by_name = {r["run"]: r for r in outcome["runs"]}
    mixtures = outcome["mixtures"]
    assert [m["role"] for m in mixtures] == ["fit"] * 6 + ["base"]
    for m in mixtures:
        assert len(m["runs"]) == 2
        for name in ("val.text", "val.image", "weighted"):
            assert m[name] == pytest.approx(sum(by_name[r][name] for r in m["runs"]) / 2)
    assert outcome["noise"] == first["noise"]  # one run's noise: the base over its distinct seeds 0 and 1
    chosen = [r for r in outcome["cross_validation"] if r.get("chosen")]
    assert all(r["actual"] == pytest.approx([m[r["objective"]] for m in mixtures]) for r in chosen)
    confirmation = outcome["confirmation"]
    assert len(confirmation["runs"]) == 2
    assert confirmation["best_swarm_weighted"] == min(m["weighted"] for m in mixtures)


def test_replicated_test_mixtures_measure_the_noise_away_from_the_base(searched) -> None:
    path, first = searched
    config = load_config(MixtureSearchConfig, path)
    space = search_space(config)

    def swarm(**changes) -> MixtureSearchConfig:
        return config.model_copy(update={"swarm": config.swarm.model_copy(update=changes)})

    plain, replicated = swarm(test_size=2), swarm(test_size=2, replicate_tests=1)
    before, runs = plan_runs(plain, space), plan_runs(replicated, space)
    assert runs[: len(before)] == before  # the option only adds runs: every other run (and its key) as it was
    (extra,) = runs[len(before) :]
    test = [r for r in runs if r.role == "test"]
    assert (extra.role, extra.seed, extra.shares) == ("replicate", 1, test[0].shares)
    assert extra.key == run_key(config, space, test[0].shares, 1)
    seen: list[tuple[str, bool]] = []
    outcome = search(replicated, progress=lambda d, t, run, reused: seen.append((run.role, reused)), log=lambda _: None)
    # the replicate is new; the test runs are too, unless an earlier test's larger swarm drew them as fit runs
    assert ("replicate", False) in seen and {role for role, reused in seen if not reused} <= {"test", "replicate"}
    assert outcome["noise"] == first["noise"]  # the noise at the base, as before
    by_role: dict[str, list[dict]] = {}
    for row in outcome["runs"]:
        by_role.setdefault(row["role"], []).append(row)
    base, pair = by_role["base"] + by_role["noise"], [by_role["test"][0], *by_role["replicate"]]
    pooled = pooled_run_noise(outcome["runs"], outcome["sources"], ["val.text", "weighted"])
    assert (pooled["groups"], pooled["dof"]) == (2, 2)
    for name in ("val.text", "weighted"):
        expected = pooled_noise([[r[name] for r in base], [r[name] for r in pair]])
        assert pooled["noise"][name] == pytest.approx(expected)
    assert pooled_run_noise(first["runs"], first["sources"], ["weighted"])["noise"] == {
        "weighted": first["noise"]["weighted"]  # without replicates: the base's figure
    }
    seen.clear()
    search(replicated, progress=lambda d, t, run, reused: seen.append((run.role, reused)), log=lambda _: None)
    assert all(reused for _, reused in seen)  # cached by content like every other run
    # a replicate measures the noise only: not a mixture of its own (best swarm member, effects), not averaged in
    assert {m["role"] for m in outcome["mixtures"]} <= {"given", "fit", "test", "base"}
    from flows.cli import app

    replicated_file = path.with_name("replicated.yaml")
    replicated_file.write_text(yaml.safe_dump(replicated.model_dump(mode="json")))
    printed = CliRunner().invoke(app, ["mixture", "search", str(replicated_file)])
    assert printed.exit_code == 0, printed.output
    said = " ".join(printed.output.split())
    weighted = f"weighted {pooled['noise']['weighted']:.4f}"
    assert (
        "noise pooled over 2 mixtures with two or more seeds (2 degrees of freedom), one run:" in said
        and weighted in said
    )


def test_a_run_key_follows_everything_its_losses_depend_on(searched) -> None:
    path, _ = searched
    config = load_config(MixtureSearchConfig, path)
    space = search_space(config)
    shares = space.base
    key = run_key(config, space, shares, 0)
    assert run_key(config, space, dict(shares), 0) == key
    assert run_key(config, space, shares, 1) != key
    other_lr = config.model_copy(update={"proxy": config.proxy.model_copy(update={"lr": 1e-3})})
    assert run_key(other_lr, space, shares, 0) != key
    moved = dict(shares, prose=shares["prose"] + 0.1, code=shares["code"] - 0.1)
    assert run_key(config, space, moved, 0) != key


def test_the_approved_spec_changes_only_the_searched_stage(searched) -> None:
    path, _ = searched
    config = load_config(MixtureSearchConfig, path)
    spec = approved_spec(search_space(config), {"prose": 2, "code": 1, "photos": 1})
    assert {s.name: s.weight for s in spec.sources_of("stage1")} == {"prose": 0.5, "code": 0.25, "photos": 0.25}
    assert spec.stage_tokens("stage1") == 200_000 and spec.seed == 1


def test_cham_mixture_search_prints_the_fits_and_writes_the_approved_spec(searched) -> None:
    from flows.cli import app

    path, outcome = searched
    result = CliRunner().invoke(app, ["mixture", "search", str(path), "--approve"])
    assert result.exit_code == 0, result.output
    assert "predicted vs actual" in result.output and "proposal:" in result.output
    config = load_config(MixtureSearchConfig, path)
    approved = load_config(MixtureSpec, Path(config.out_dir) / "approved-mixture.yaml")
    weights = {s.name: s.weight for s in approved.sources_of("stage1")}
    assert weights == pytest.approx(outcome["proposal"]["shares"], abs=1e-6)
    assert json.loads((Path(config.out_dir) / SEARCH_FILE).read_text())["proposal"] == outcome["proposal"]


def test_config_errors_are_clear(prepared_sources: Path, heldout: Path, tmp_path: Path) -> None:
    path = write_search_config(tmp_path, prepared_sources, heldout)
    data = yaml.safe_load(path.read_text())
    with pytest.raises(ValueError, match="no held-out stage 'test'"):
        validate_config(MixtureSearchConfig, {**data, "objective": {"test.loss": 1}})
    with pytest.raises(ValueError, match="vocab_size"):
        validate_config(MixtureSearchConfig, {**data, "proxy": {**data["proxy"], "model": {"vocab_size": 9}}})
    with pytest.raises(ValueError, match=r"replicate_tests \(3\) exceeds test_size \(2\)"):
        validate_config(MixtureSearchConfig, {**data, "swarm": {**data["swarm"], "test_size": 2, "replicate_tests": 3}})
    bad = load_config(MixtureSearchConfig, path).model_copy(update={"stage": "stage9"})
    with pytest.raises(ValueError, match="stage 'stage9' is not in"):
        search_space(bad)


FLOW_SCRIPT = """
import json, sys
from flows.mixture_search import mixture_search
from schemas import MixtureSearchConfig, load_config
outcome = mixture_search(config=load_config(MixtureSearchConfig, sys.argv[1]))
print("OUTCOME " + json.dumps({k: outcome.get(k) for k in ("approval", "launched")}))
"""


def test_the_flow_pauses_for_approval_and_launches_training_with_the_edited_weights(
    server: dict, searched, make_stage, tmp_path: Path
) -> None:
    """Through a real server: the flow (its proxy runs reused) pauses with a form holding the proposal; the form is
    submitted through the API with other weights, as the UI does; the approved spec is written and mixed, and a run of
    the training deployment is created whose data is the approved stage."""
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.training_flows import train
    from tests.flows.prefect_server import REPO, stop, wait_for

    path, outcome = searched
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "tiny"},
                "data": str(make_stage(3_000)),  # replaced by the approved stage
                "out_dir": str(tmp_path / "real-run"),
                "steps": 2,
                "global_batch_size": 4,
                "micro_batch_size": 2,
                "schedule": {"warmup_steps": 1},
            }
        )
    )
    config = yaml.safe_load(path.read_text())
    config["launch"] = {"train_config": str(train_yaml), "deployment": "train/on-demand"}
    config_file = tmp_path / "search.yaml"
    config_file.write_text(yaml.safe_dump(config))

    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
        train.to_deployment("on-demand").apply()  # registered, as `cham serve` does, and not served: runs wait
        log = (tmp_path / "flow.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-c", FLOW_SCRIPT, str(config_file)],
            cwd=REPO,
            env=server,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        try:
            with get_client(sync_client=True) as client:

                def paused():
                    runs = client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(
                            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                        )
                    )
                    return runs[0] if runs else None

                run = wait_for(paused, "the flow to pause for approval", 240, [proc])
                edited = {"prose": 0.5, "code": 0.3, "photos": 0.2}
                resume_flow_run(run.id, run_input={"approve": True, "weights": edited})
                out, _ = proc.communicate(timeout=300)
                assert proc.returncode == 0, (tmp_path / "flow.log").read_text()[-3000:]
                result = json.loads(out.split("OUTCOME ", 1)[1])
                assert result["approval"] == {"approved": True, "weights": edited}
                launched = client.read_flow_run(result["launched"]["flow_run"])
                deployment = client.read_deployment_by_name("train/on-demand")
                assert launched.deployment_id == deployment.id
                approved_stage = Path(config["out_dir"]) / "approved-mix" / "stage1"
                assert launched.parameters["config"]["data"] == str(approved_stage)
                manifest = json.loads((approved_stage / "manifest.json").read_text())
                targets = {n: s["target_share"] for n, s in manifest["sources"].items()}
                assert targets == pytest.approx(edited, abs=1e-6)
                # the search itself was not run again: every proxy run was reused
                assert (
                    json.loads((Path(config["out_dir"]) / SEARCH_FILE).read_text())["proposal"] == outcome["proposal"]
                )
        finally:
            stop(proc)
            log.close()


def test_proxy_runs_go_to_a_deployment_when_the_swarm_names_one(server: dict, searched, tmp_path: Path) -> None:
    """`swarm.deployment`: the new runs become flow runs of mixture-proxy/on-demand, here served by `cham serve` as a
    work pool's worker would run them; the runs the search already has are reused, not sent."""
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.flows.prefect_server import REPO, stop, wait_for

    path, _ = searched
    config = load_config(MixtureSearchConfig, path)
    new_mixture = {"prose": 0.7, "code": 0.2, "photos": 0.1}
    swarm = config.swarm.model_copy(update={"deployment": "mixture-proxy/on-demand", "mixtures": [new_mixture]})
    config = config.model_copy(update={"swarm": swarm})
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows", "serve", "--build-cron", ""],
        cwd=REPO,
        env=server | {"PREFECT_RUNNER_POLL_FREQUENCY": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with (
            temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}),
            get_client(sync_client=True) as client,
        ):

            def served():
                try:
                    return client.read_deployment_by_name("mixture-proxy/on-demand")
                except Exception:
                    return None

            deployment = wait_for(served, "the mixture-proxy deployment", 120, [serve])
            seen: list[tuple[str, bool]] = []
            outcome = search(config, progress=lambda d, t, r, reused: seen.append((r.role, reused)), log=print)
            runs = client.read_flow_runs()
            proxy_runs = [r for r in runs if r.deployment_id == deployment.id]
        # the given mixture and the proposal moved by it: new runs, sent to the deployment; the rest reused
        sent = [role for role, reused in seen if not reused]
        assert "given" in sent and len(proxy_runs) == len(sent)
        assert all(r.state.is_completed() for r in proxy_runs)
        given = next(r for r in outcome["runs"] if r["role"] == "given")
        assert given["share prose"] == 0.7 and given["weighted"] > 0
    finally:
        stop(serve)
        log.close()


def test_a_mixture_that_cannot_be_mixed_is_recorded_with_its_reason_and_left_out(searched, tmp_path: Path) -> None:
    from flows.mixture_swarm import ProxyRun, read_result, run_proxy, write_request

    path, _ = searched
    config = load_config(MixtureSearchConfig, path)
    space = search_space(config)
    only_photos = {"prose": 0.0, "code": 0.0, "photos": 1.0}
    run = ProxyRun("given", only_photos, 0, "f" * 64)
    folder = write_request(config, space, run, tmp_path / "runs")
    spec = yaml.safe_load((folder / "mixture.yaml").read_text())
    spec["stages"]["stage1"]["sources"][0]["max_repetitions"] = 0.01  # the photos cannot fill the budget
    (folder / "mixture.yaml").write_text(yaml.safe_dump(spec))
    result = run_proxy(folder, log=lambda _: None)
    assert result["objectives"] == {} and "repetitions" in result["error"] and result["role"] == "given"
    assert read_result(folder) == result  # recorded: a rerun does not try it again

    # In a search, such a run is shown with its reason and left out of the fits (here: a result like the above).
    given = config.model_copy(update={"swarm": config.swarm.model_copy(update={"mixtures": [only_photos]})})
    key = run_key(given, space, {**only_photos}, given.proxy.seed)
    runs_dir = Path(given.out_dir) / "runs" / key[:16]
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / RESULT).write_text(json.dumps({**result, "key": key}))
    lines: list[str] = []
    outcome = search(given, log=lines.append)
    assert outcome["failed"] == 1 and any("has no losses" in line for line in lines)
    (row,) = [r for r in outcome["runs"] if r["role"] == "given"]
    assert row["weighted"] is None and "repetitions" in row["error"]
    assert all(len(r["predicted"]) == 7 for r in outcome["cross_validation"] if r.get("chosen"))  # not fitted on
