"""The paper's open questions as tools: protection criteria in drift, attention sites in the probes, spectra capacity,
and their figures; on random-init and few-step tiny-world models (no facts or numbers of the shipped model)."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_editing_support import tiny_model  # noqa: E402
from test_editing_support import single_thread  # noqa: E402,F401 - autouse fixture, applied to this module
from typer.testing import CliRunner  # noqa: E402

from spectra import plots  # noqa: E402
from spectra.data.records import MultipleChoiceItem  # noqa: E402
from spectra.editing.filters import ReviveFilter  # noqa: E402
from spectra.editing.loop import Arm, RoundRecord  # noqa: E402
from spectra.errors import SpectraError  # noqa: E402
from spectra.evaluation.gradients import general_loss_gradients  # noqa: E402
from spectra.evaluation.scoring import encode_pairs  # noqa: E402
from spectra.experiments.capacity import CapacityConfig, CapacityObservers, capacity_table  # noqa: E402
from spectra.experiments.common import GeneralOptions, general_items, spare_general_items  # noqa: E402
from spectra.experiments.drift import unclaimed_changes  # noqa: E402
from spectra.glossary import GLOSSARY  # noqa: E402
from spectra.models.loading import load_model  # noqa: E402
from spectra.models.sites import Site  # noqa: E402
from spectra.results import load_run  # noqa: E402
from spectra.spectral import Protection, svd  # noqa: E402
from spectra_cli.main import app  # noqa: E402

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


ITEMS = [MultipleChoiceItem("t", prompt, ("paris", "rome"), gold) for prompt, gold in
         [("alice lives in", 0), ("bob works in", 1), ("carol sees the city of", 0), ("dave likes", 1),
          ("the river is near", 0)]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_general_loss_gradients_are_the_derivative_of_the_gold_answers_nll(family: str) -> None:
    """<G, E> equals the central difference of the mean gold-answer NLL along E, per site, the NLL computed item by
    item in float64 without padding: the gradient is read in the site's (out, in) layout, GPT-2's transposed Conv1D
    and its q slice of c_attn included."""
    model = tiny_model(family)
    model.model.double()
    sites = [Site(1, "mlp.down"), Site(2, "attn.q"), Site(0, "attn.o")]
    batches = list(general_loss_gradients(model, ITEMS, sites, batch_size=3))
    assert len(batches) == 2 and all(set(b) == set(sites) for b in batches)
    pairs = encode_pairs(model.tokenizer, [(item.prompt, item.choices[item.gold]) for item in ITEMS[:3]])

    @torch.no_grad()
    def loss() -> float:
        total = 0.0
        for prefix, answer in pairs:
            logits = model.model(input_ids=torch.tensor([prefix + answer])).logits[0].double()
            log_probs = torch.log_softmax(logits[len(prefix) - 1 : -1], dim=-1)
            total += float(-log_probs[torch.arange(len(answer)), torch.tensor(answer)].mean())
        return total / len(pairs)

    g = torch.Generator().manual_seed(0)
    for site in sites:
        W = model.adapter.read(site)
        assert batches[0][site].shape == W.shape
        E = torch.randn(W.shape, generator=g, dtype=W.dtype)

        def central(h: float) -> float:
            model.adapter.write(site, W + h * E)
            up = loss()
            model.adapter.write(site, W - h * E)
            down = loss()
            model.adapter.write(site, W)
            return (up - down) / (2 * h)

        # The model's RoPE tables stay float32, so the NLL is exact to ~1e-7 and h cannot be tiny; Richardson's
        # extrapolation of two central differences removes their h^2 error instead.
        expected = (4 * central(5e-3) - central(1e-2)) / 3
        assert float((batches[0][site].double() * E).sum()) == pytest.approx(expected, rel=1e-3), site
    assert all(not p.requires_grad and p.grad is None for p in model.model.parameters())


def test_fisher_items_are_general_task_items_the_probe_never_scores(world_model: Path) -> None:
    options = GeneralOptions(items_per_task=5)
    scored = {item for items in general_items(str(world_model), options, 3, 5).values() for item in items}
    spare = spare_general_items(str(world_model), options, 3, per_task=4)
    tasks = general_items(str(world_model), options, 3, None)
    assert len(spare) == 4 * len(tasks) and not scored & set(spare)
    task, items = next(iter(tasks.items()))
    with pytest.raises(SpectraError, match="none is left"):
        spare_general_items(str(world_model), GeneralOptions(tasks=[task], items_per_task=len(items)), 3, per_task=4)


def test_a_refreshing_filter_keeps_its_criterion_and_refuses_scored_ones() -> None:
    model = tiny_model("llama")
    site = Site(1, "mlp.down")
    s0 = svd(model.adapter.read(site))
    rank = Protection("rank", tau=0.25)
    revive = ReviveFilter({site: rank.projector(s0)}, 0.25, refresh="current", protection=rank)
    model.adapter.write(site, model.adapter.read(site) * 2.0)
    revive.begin_round(model)
    assert revive.basis(site).k == rank.size(s0) and revive.basis(site).k != s0.rank_for(0.25)
    with pytest.raises(SpectraError, match="cannot be rebuilt"):
        ReviveFilter({site: rank.projector(s0)}, 0.25, refresh="current", protection=Protection("fisher", tau=0.25))


def _drift(world_model: Path, out: Path, *extra: str) -> list[str]:
    return ["drift", "--model", str(world_model), "--rounds", "1", "--batch-size", "2", "--eval-records", "2",
            "--items-per-task", "4", "--represent-prompts", "0", "--stats-corpus", str(world_model / "small_corpus.txt"),
            "--out", str(out), *extra]


@pytest.mark.parametrize("criterion", ["energy", "rank", "sigma2", "activation", "fisher"])
def test_drift_protects_with_every_criterion_and_records_the_dimension(world_model: Path, tmp_path: Path,
                                                                        criterion: str, monkeypatch) -> None:
    """Each --protect runs; protected_dim is what the criterion's budget buys at each written site (energy's k for
    activation and fisher), the protected triplets survive, and attention sites measured alongside stay untouched.
    (Figures are tested elsewhere; drawing a drift run's dozen takes 80 % of its time here.)"""
    monkeypatch.setattr(plots, "plot_run", lambda path, *args, **kwargs: [])
    out = tmp_path / criterion
    output = invoke(*_drift(world_model, out, "--revive", "on", "--tau", "0.2", "--protect", criterion,
                            "--sites", "mlp.down,attn.q,attn.o"))
    assert "warning" not in output
    rows = load_run(out).rows
    assert set(rows["metric"]) <= set(GLOSSARY)
    final = rows[rows["round"] == 1]
    dims = final[final["metric"] == "protected_dim"].set_index("site")["value"]
    run = load_run(out)
    edited = {f"mlp.down@{layer}" for layer in run.provenance["hparams"]["values"]["layers"]}
    assert run.config["protect"] == criterion and set(dims.index) >= edited
    original = load_model(str(world_model))
    for site in edited:
        budget = Protection("energy" if criterion in ("activation", "fisher") else criterion, tau=0.2)
        assert dims[site] == budget.size(svd(original.adapter.read(Site.parse(site)).float())), site
    assert (dims.drop(list(edited)) == 0).all()
    residual = final[(final["metric"] == "protected_triplet_residual") & final["site"].isin(edited)]
    assert residual["value"].max() < 1e-3
    attention = final[(final["metric"] == "delta_fro") & final["site"].str.startswith("attn.")]
    assert len(attention) and (attention["value"] == 0).all(), "an FFN editor leaves attention alone"


def test_protect_dim_fixes_the_dimension_and_bad_protections_fail_before_loading(world_model: Path, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    monkeypatch.setattr(plots, "plot_run", lambda path, *args, **kwargs: [])
    out = tmp_path / "dim"
    invoke(*_drift(world_model, out, "--revive", "on", "--protect", "activation", "--protect-dim", "3"))
    rows = load_run(out).rows
    assert set(rows.loc[rows["metric"] == "protected_dim", "value"]) == {3.0}
    for args, needle in [(["--protect", "entropy"], "--protect must be one of"),
                         (["--protect-dim", "2", "--tau", "0.1,0.2"], "give one --tau"),
                         (["--protect", "fisher", "--refresh", "current"], "--refresh original"),
                         (["--protect-dim", "0"], "at least 1")]:
        result = runner.invoke(app, _drift(world_model, tmp_path / "bad", *args))
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, args


def test_unclaimed_changes_name_measured_sites_an_editor_wrote_without_claiming() -> None:
    rows = pd.DataFrame([{"site": site, "round": r, "metric": "delta_fro", "value": value}
                         for site, r, value in [("mlp.down@1", 1, 3.0), ("attn.o@1", 1, 0.0), ("attn.q@2", 1, 0.0),
                                                ("attn.q@2", 2, 1e-6)]])
    assert unclaimed_changes(rows, [Site(1, "mlp.down")]) == ["attn.q@2"]
    assert unclaimed_changes(rows[rows["round"] == 1], [Site(1, "mlp.down")]) == []


def test_an_arm_ends_at_its_first_failing_round_and_records_what_it_absorbed() -> None:
    judge = CapacityObservers(CapacityConfig(rounds=5, batch_size=10, threshold=50.0))
    arm = Arm("revive@0.5", 0.5)

    def record(efficacy: float) -> RoundRecord:
        return RoundRecord(rows=[{"arm": arm.name, "round": 0, "metric": "round_efficacy", "value": efficacy}])

    assert not judge.finished(arm, 0, record(0.0)), "round 0 scores the edits before they are made"
    passing = record(50.0)
    assert not judge.finished(arm, 2, passing) and len(passing.rows) == 1
    failing = record(49.9)
    assert judge.finished(arm, 3, failing)
    assert {r["metric"]: r["value"] for r in failing.rows[1:]} == {"edits_absorbed": 20.0, "capacity_reached": 1.0}
    last = record(90.0)
    assert not judge.finished(arm, 5, last)
    assert {r["metric"]: r["value"] for r in last.rows[1:]} == {"edits_absorbed": 50.0, "capacity_reached": 0.0}
    with pytest.raises(SpectraError, match="threshold"):
        CapacityConfig(threshold=0.0).validate()


def test_capacity_fills_the_complement_stops_failed_arms_and_keeps_them_stopped_when_extended(
        world_model: Path, tmp_path: Path) -> None:
    """Two rounds of two edits per arm at threshold 100 %: an arm whose round falls short stops after it; every round
    records rank, effective rank and dimension left in the complement; extending the run leaves stopped arms alone."""
    out = tmp_path / "capacity"
    args = ["capacity", "--model", str(world_model), "--rounds", "2", "--batch-size", "2", "--tau", "0.2,0.9",
            "--threshold", "100", "--eval-records", "4", "--stats-corpus", str(world_model / "small_corpus.txt"),
            "--out", str(out)]
    output = invoke(*args)
    assert "edits absorbed" in output
    rows = load_run(out).rows
    assert set(rows["metric"]) <= set(GLOSSARY) and (out / "figures" / "capacity.png").is_file()
    usage = rows.pivot_table(index=["arm", "round", "site"], columns="metric", values="value").reset_index()
    usage = usage.dropna(subset=["update_rank"])
    assert (usage["remaining_dim"] == usage["complement_rank"] - usage["update_rank"]).all()
    assert (usage["update_rank"] <= 2 * usage["round"]).all(), "a round of b edits adds rank <= b"
    full = usage[usage["arm"] == "off"].groupby("site")["complement_rank"].first()  # min(m, n): nothing protected
    assert (usage["complement_rank"] + usage["protected_dim"] == usage["site"].map(full)).all()
    stopped = []
    for arm, part in rows.groupby("arm"):
        efficacy = part[part["metric"] == "round_efficacy"].set_index("round")["value"]
        failed = [r for r in (1, 2) if r in efficacy and efficacy[r] < 100]
        assert part["round"].max() == (failed[0] if failed else 2)
        absorbed = part[part["metric"] == "edits_absorbed"]["value"].item()
        assert absorbed == 2 * (failed[0] - 1 if failed else 2)
        stopped += [arm] if failed else []
    table = capacity_table(rows)
    assert set(table["arm"]) == {"off", "revive@0.2", "revive@0.9"}
    assert list(table.loc[table["arm"].isin(stopped), "failed"]) == [True] * len(stopped)
    invoke(*args[:-2], "--resume", str(out), "--rounds", "3")
    extended = load_run(out).rows
    for arm in stopped:
        assert extended.loc[extended["arm"] == arm, "round"].max() == 1, "a failed arm stays stopped"


def test_probes_compare_attention_kinds_with_ffn_one_kind_at_a_time(world_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "concentration"
    invoke("concentration", "--model", str(world_model), "--sites", "mlp.down,attn.q,attn.o", "--by-kind",
           "--fractions", "10,50", "--items-per-task", "4", "--out", str(out))
    run = load_run(out)
    probes = run.rows[run.rows["baseline"].astype(str) == "False"]
    assert set(probes["kind"]) == {"mlp.down", "attn.q", "attn.o"} and set(probes["fraction"]) == {10.0, 50.0}
    assert {p.name for p in (out / "figures").iterdir()} == {"kind_comparison.png"}
    out = tmp_path / "sensitivity"
    invoke("sensitivity", "--model", str(world_model), "--sites", "attn.o", "--seeds", "1", "--items-per-task", "4",
           "--out", str(out))
    perturbed = load_run(out).rows
    assert set(perturbed.loc[perturbed["group"] >= 0, "side"]) == {"input", "output"}


def kind_rows() -> pd.DataFrame:
    """Two seeds of --by-kind concentration and sensitivity rows for one FFN and one attention kind."""
    rows = [{"experiment": "concentration", "kind": kind, "fraction": f, "task": "mean", "metric": "accuracy",
             "seed": seed, "value": f / 100 + seed / 100} for kind, f, seed in itertools.product(("mlp.down", "attn.o"),
                                                                                             (5, 50), (0, 1))]
    rows += [{"experiment": "sensitivity", "kind": kind, "side": side, "group": g, "task": "mean", "metric": "accuracy",
              "seed": seed, "value": 0.9 - g / 20} for kind, side, g, seed in itertools.product(
                  ("mlp.down", "attn.o"), ("input", "output"), range(3), (0, 1))]
    rows += [{"experiment": e, "task": "mean", "metric": "accuracy", "baseline": True, "value": 1.0}
             for e in ("concentration", "sensitivity")]
    return pd.DataFrame(rows)


def test_kind_comparison_draws_a_line_per_kind_with_attention_dashed() -> None:
    fig = plots.kind_comparison(kind_rows())
    assert [ax.get_title() for ax in fig.axes] == ["rebuilt from top energy", "input side perturbed",
                                                   "output side perturbed"]
    for ax in fig.axes:
        styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
        assert styles["mlp.down"] == "-" and styles["attn.o"] == "--" and "unchanged" in styles
    with pytest.raises(plots.NoData):
        plots.concentration_curve(kind_rows())


def test_capacity_figure_puts_each_arm_at_its_complement_dimension() -> None:
    rows = []
    for seed, (arm, tau, k, failed_at) in itertools.product((0, 1), [("off", None, 0, None), ("revive@0.5", 0.5, 30, 2)]):
        for r in range(3 if failed_at is None else failed_at + 1):
            rows += [{"arm": arm, "tau": tau, "round": r, "seed": seed, "metric": "round_efficacy",
                      "value": 10.0 if r == failed_at else 90.0}]
            rows += [{"arm": arm, "tau": tau, "round": r, "seed": seed, "site": s, "metric": m, "value": v}
                     for s in ("mlp.down@0", "mlp.down@1")
                     for m, v in (("complement_rank", 64 - k), ("remaining_dim", 64 - k - 4 * r))]
        last = 2 if failed_at is None else failed_at
        rows += [{"arm": arm, "tau": tau, "round": last, "seed": seed, "metric": "edits_absorbed",
                  "value": 8.0 if failed_at else 12.0},
                 {"arm": arm, "tau": tau, "round": last, "seed": seed, "metric": "capacity_reached",
                  "value": float(failed_at is not None)}]
    fig = plots.capacity_curve(pd.DataFrame(rows))
    scatter = fig.axes[-1]
    points = {bars.get_label(): (bars.lines[0].get_xdata()[0], bars.lines[0].get_ydata()[0],
                                 bars.lines[0].get_markerfacecolor()) for bars in scatter.containers}
    assert points["off"][:2] == (64, 12.0) and points["off"][2] == "white", "the budget ran out: hollow"
    assert points["revive@0.5"][:2] == (34, 8.0) and points["revive@0.5"][2] != "white"


@pytest.mark.slow
def test_open_questions_writes_a_figure_and_a_table_per_question_with_every_seed(world_model: Path,
                                                                                 tmp_path: Path) -> None:
    """The driver behind the README's open-questions section, at the smallest sizes: two seeds, each question's
    table holds every arm or kind it ran and a spread over the seeds."""
    from spectra.experiments.open_questions import OpenQuestionsConfig, regenerate

    config = OpenQuestionsConfig(model=str(world_model), seeds=[0, 1], items_per_task=4, kinds="mlp.down,attn.o",
                                 fractions=[50.0], stats_corpus=world_model / "small_corpus.txt", eval_records=3,
                                 criteria_rounds=1, criteria_batch=3, capacity_taus=[0.3], capacity_rounds=2,
                                 capacity_batch=3)
    written = regenerate(tmp_path, config)
    assert set(written) == {"attention", "criteria", "capacity"} and all(p.is_file() for p in written.values())
    attention = (tmp_path / "open_questions_attention.md").read_text()
    assert "| mlp.down |" in attention and "| attn.o |" in attention and "±" in attention
    criteria = (tmp_path / "open_questions_criteria.md").read_text()
    for criterion in ("off", "energy", "rank", "sigma2", "activation", "fisher"):
        assert f"| {criterion} |" in criteria
    capacity = (tmp_path / "open_questions_capacity.md").read_text()
    assert "| off |" in capacity and "2 seeds (0, 1)" in capacity
    with pytest.raises(SpectraError, match="each once"):
        regenerate(tmp_path, OpenQuestionsConfig(seeds=[1, 1]))
