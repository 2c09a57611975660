"""The REVIVE paper's three open questions (its Appendix B) as experiments over seeds: ``python -m
spectra.experiments.open_questions DIR`` (``make figures`` runs it too).

1. **attention**: concentration and sensitivity of every site kind, FFN and attention, one kind at a
   time (``--by-kind``); and the drift of attention sites while MEMIT edits the FFN (the guard that it
   never writes them, so protecting them cannot matter for an FFN editor).
2. **criteria**: MEMIT with REVIVE under each protection criterion at an equal protected dimension
   (energy's at tau; rank and sigma2 at the tau that protects as many triplets in all), and off.
3. **capacity**: ``spectra capacity`` per tau: edits absorbed before a round's own edits fail, against
   the dimension of the protected complement.

Each experiment runs once per seed (different general-task items and perturbations for 1; a
different shuffle of the edited facts for 2 and 3) and reports mean and sd over seeds. Writes
``DIR/open_questions_<question>.png`` and ``.md`` (the table), and its runs under ``DIR/runs/open_questions``.
The sizes below were fixed before any result was seen, to fit about 25 minutes on 2 CPU cores
for the embedded model (all three, three seeds); nothing is chosen by outcome.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from spectra.errors import SpectraError
from spectra.experiments.capacity import CapacityConfig, run_capacity
from spectra.experiments.common import CommonOptions, GeneralOptions, open_model
from spectra.experiments.drift import DriftConfig, drift_hparams, editor_defaults, run_drift
from spectra.experiments.probes import ConcentrationConfig, SensitivityConfig, run_concentration, run_sensitivity
from spectra.models.sites import Site
from spectra.plots import capacity_curve, drift_overview, kind_comparison, save_figure
from spectra.results import load_run
from spectra.spectral import Protection, matching_tau, svd

#: Every site kind, FFN first.
ALL_KINDS = "mlp.up,mlp.gate,mlp.down,attn.q,attn.k,attn.v,attn.o"
ATTENTION = "attn.q,attn.k,attn.v,attn.o"


@dataclass
class OpenQuestionsConfig:
    """The sizes of the three experiments (fixed in advance; see the module docstring)."""

    model: str = "tiny"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    #: general-task items per task for every general-ability measurement
    items_per_task: int = 50
    #: question 1: the kinds compared, the energy shares kept, the perturbation size (sensitivity's default)
    kinds: str = ALL_KINDS
    fractions: list[float] = field(default_factory=lambda: [5.0, 10.0, 20.0, 40.0, 70.0])
    eps: float = 0.1
    #: questions 2 and 3: the editor and its statistics corpus (None: the model's own)
    editor: str = "memit"
    stats_corpus: Path | None = None
    eval_records: int = 50
    #: question 2: the paper's tau, and rounds x edits per round
    tau: float = 0.1
    criteria_rounds: int = 4
    criteria_batch: int = 50
    #: question 3: one arm per tau and the off arm; budget rounds x edits per round; failure threshold (%)
    capacity_taus: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    capacity_rounds: int = 8
    capacity_batch: int = 25
    threshold: float = 50.0

    def validate(self) -> None:
        """At least one seed, each once; the experiments' own options are checked by their configs."""
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SpectraError(f"Give at least one seed, each once (got {self.seeds}); the README's numbers use three.")


def attention_rows(config: OpenQuestionsConfig, runs: Path) -> pd.DataFrame:
    """Question 1: per seed, a --by-kind concentration and sensitivity run over every kind; rows with a seed column."""
    frames = []
    general = GeneralOptions(items_per_task=config.items_per_task)
    for seed in config.seeds:
        common = dict(model=config.model, seed=seed, sites=config.kinds, by_kind=True, general=general)
        paths = [run_concentration(ConcentrationConfig(**common, fractions=list(config.fractions),
                                                       out=runs / f"concentration-seed{seed}"), False, False),
                 run_sensitivity(SensitivityConfig(**common, eps=[config.eps], seeds=1,
                                                   out=runs / f"sensitivity-seed{seed}"), False, False)]
        frames += [load_run(path).rows.assign(seed=seed) for path in paths]
    return pd.concat(frames, ignore_index=True)


def criteria_rows(config: OpenQuestionsConfig, runs: Path) -> pd.DataFrame:
    """Question 2: per seed, off and REVIVE under each criterion at energy's protected dimension; ``arm`` names the
    criterion. rank and sigma2 run at the tau that protects as many triplets over the edited sites as energy; when
    that gives each site exactly energy's k they protect the very same triplets and energy's rows stand for them."""
    edited, taus, same = criterion_taus(config)
    measured = ",".join([str(site) for site in edited] + [ATTENTION])
    frames = []
    for seed in config.seeds:
        base = dict(model=config.model, editor=config.editor, seed=seed, rounds=config.criteria_rounds,
                    batch_size=config.criteria_batch, eval_records=config.eval_records, represent_prompts=0,
                    ss_every=config.criteria_rounds, shuffle_records=True, stats_corpus=config.stats_corpus,
                    general=GeneralOptions(items_per_task=config.items_per_task))
        energy = load_run(run_drift(DriftConfig(**base, revive="both", tau=[config.tau], sites=measured,
                                                out=runs / f"energy-seed{seed}"), False, figures=False)).rows
        frames.append(energy.assign(seed=seed, arm=energy["arm"].replace({"revive": "energy"})))
        for criterion, tau in taus.items():
            if criterion in same:
                reused = energy[energy["arm"] == "revive"]
                frames.append(reused.assign(seed=seed, arm=criterion, tau=tau))
                continue
            rows = load_run(run_drift(DriftConfig(**base, revive="on", tau=[tau], protect=criterion,
                                                  out=runs / f"{criterion}-seed{seed}"), False, figures=False)).rows
            frames.append(rows.assign(seed=seed, arm=criterion))
    return pd.concat(frames, ignore_index=True)


def criterion_taus(config: OpenQuestionsConfig) -> tuple[list[Site], dict[str, float], set[str]]:
    """The sites the editor writes, the tau each other criterion runs at (its equal-dimension budget), and the
    criteria that protect exactly energy's triplets at every written site."""
    from spectra.editing import make_editor

    probe = DriftConfig(model=config.model, editor=config.editor, stats_corpus=config.stats_corpus)
    hparams = drift_hparams(probe, editor_defaults(config.model, probe)[0]).hparams
    model = open_model(CommonOptions(model=config.model))
    edited = make_editor(config.editor, hparams=hparams).edited_sites(model)
    spectra = [svd(model.adapter.read(site).float()) for site in edited]
    energy = [Protection("energy", tau=config.tau).size(s) for s in spectra]
    taus = {"activation": config.tau, "fisher": config.tau}
    same = set()
    for criterion in ("rank", "sigma2"):
        taus[criterion] = matching_tau(spectra, criterion, sum(energy))
        if [Protection(criterion, tau=taus[criterion]).size(s) for s in spectra] == energy:
            same.add(criterion)
    return edited, taus, same


def capacity_rows(config: OpenQuestionsConfig, runs: Path) -> pd.DataFrame:
    """Question 3: per seed, one capacity run (the off arm and one arm per tau); rows with a seed column."""
    frames = []
    for seed in config.seeds:
        path = run_capacity(CapacityConfig(
            model=config.model, editor=config.editor, seed=seed, rounds=config.capacity_rounds,
            batch_size=config.capacity_batch, tau=list(config.capacity_taus), threshold=config.threshold,
            eval_records=config.eval_records, shuffle_records=True, stats_corpus=config.stats_corpus,
            general=GeneralOptions(items_per_task=config.items_per_task), out=runs / f"capacity-seed{seed}"),
            False, figures=False)
        frames.append(load_run(path).rows.assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


def attention_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per kind: task-mean accuracy (and held-out NLL) rebuilt from each energy share, and after perturbing the top and
    the bottom energy group of each side; mean +- sd over seeds."""
    table: dict[str, dict[str, str]] = {}
    for metric, task, short in (("accuracy", "mean", "acc"), ("text_nll", "heldout_text", "NLL")):
        chosen = rows[(rows["metric"] == metric) & (rows["task"] == task) & rows["kind"].notna()]
        if chosen.empty:
            continue
        concentration = chosen[chosen["experiment"] == "concentration"]
        for fraction, part in concentration.groupby("fraction"):
            _fill(table, part, f"{short} @{fraction:g}% energy")
        sensitivity = chosen[chosen["experiment"] == "sensitivity"]
        last = int(sensitivity["group"].max()) if len(sensitivity) else 0
        for (side, group), part in sensitivity[sensitivity["group"].isin([0, last])].groupby(["side", "group"]):
            _fill(table, part, f"{short} {side} {'top' if group == 0 else 'bottom'} group perturbed")
    frame = pd.DataFrame.from_dict(table, orient="index")
    order = [kind for kind in ALL_KINDS.split(",") if kind in frame.index]
    return frame.loc[order].rename_axis("kind").reset_index()


def _fill(table: dict[str, dict[str, str]], part: pd.DataFrame, column: str) -> None:
    """table[kind][column] = mean +- sd over seeds of ``part``'s values (each seed's mean first)."""
    for kind, values in part.groupby("kind"):
        table.setdefault(kind, {})[column] = _spread(values.groupby("seed")["value"].mean())


def guard_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The largest ||W_t - W_0||_F of each measured kind over every round, arm and seed of question 2's energy runs."""
    drift = rows[(rows["metric"] == "delta_fro") & rows["arm"].isin(["off", "energy"])]
    kinds = drift.assign(kind=drift["site"].str.split("@").str[0])
    return kinds.groupby("kind")["value"].max().rename("largest delta_fro").reset_index()


def criteria_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per criterion after the last round: tau, protected dimension per edited site, general ability, edit metrics."""
    last = rows[rows["round"] == rows["round"].max()]
    out = []
    for arm in _present(last["arm"], ("off", "energy", "rank", "sigma2", "activation", "fisher")):
        part = last[last["arm"] == arm]
        edited = part[(part["metric"] == "protected_dim") & part["site"].astype(str).str.startswith("mlp.down")]
        entry = {"criterion": arm, "tau": part["tau"].dropna().iloc[0] if part["tau"].notna().any() else None,
                 "protected dim per site": ", ".join(f"{v:g}" for v in edited.groupby("site")["value"].first())}
        for label, metric, task in (("mean accuracy", "accuracy", "mean"), ("held-out NLL", "text_nll", "heldout_text"),
                                    ("efficacy %", "efficacy", None), ("neighbourhood %", "neighborhood", None)):
            chosen = part[part["metric"] == metric]
            if task is not None:
                chosen = chosen[chosen["task"] == task]
            if len(chosen):
                entry[label] = _spread(chosen.groupby("seed")["value"].mean())
        out.append(entry)
    return pd.DataFrame(out)


def capacity_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per arm: protected and complement dimension (mean over sites), edits absorbed (mean +- sd), seeds that failed."""
    out = []
    for arm in _present(rows["arm"], ("off",)):
        part = rows[rows["arm"] == arm]
        start = part[part["round"] == 0]
        absorbed = part[part["metric"] == "edits_absorbed"].sort_values("round").groupby("seed")["value"].last()
        reached = part[part["metric"] == "capacity_reached"].sort_values("round").groupby("seed")["value"].last()
        out.append({"arm": arm, "tau": part["tau"].iloc[0],
                    "protected dim": start.loc[start["metric"] == "protected_dim", "value"].mean(),
                    "complement dim": start.loc[start["metric"] == "complement_rank", "value"].mean(),
                    "edits absorbed": _spread(absorbed), "seeds failed": f"{int(reached.sum())} of {len(reached)}"})
    return pd.DataFrame(out)


def _present(values: pd.Series, first: tuple[str, ...]) -> list[str]:
    """The distinct values, ``first`` leading in its order."""
    found = list(dict.fromkeys(values.dropna()))
    return [v for v in first if v in found] + [v for v in found if v not in first]


def _spread(values: pd.Series) -> str:
    """``mean +- sd`` over seeds (sd omitted for one seed), three significant digits."""
    if len(values) == 1:
        return f"{values.iloc[0]:.3g}"
    return f"{values.mean():.3g} ± {values.std():.2g}"


def markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (NaN shown as a dash)."""
    cells = frame.astype(object).where(frame.notna(), "—")
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in cells.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def regenerate(target: Path, config: OpenQuestionsConfig | None = None) -> dict[str, Path]:
    """Run the three experiments, write ``target/open_questions_<q>.png`` and ``.md``; returns the written figures."""
    config = config or OpenQuestionsConfig()
    config.validate()
    runs = target / "runs" / "open_questions"
    runs.mkdir(parents=True, exist_ok=True)
    rows: dict[str, pd.DataFrame] = {}
    minutes: dict[str, float] = {}
    for question, collect in (("attention", attention_rows), ("criteria", criteria_rows), ("capacity", capacity_rows)):
        print(f"open questions: {question} ...", file=sys.stderr, flush=True)
        began = time.perf_counter()
        rows[question] = collect(config, runs)
        minutes[question] = (time.perf_counter() - began) / 60
        rows[question].to_csv(runs / f"{question}.csv", index=False)
    edited = rows["criteria"][~rows["criteria"]["site"].astype(str).str.startswith("attn.")]  # attention: the guard only
    outputs = {
        "attention": ([attention_table(rows["attention"]), guard_table(rows["criteria"])], kind_comparison(rows["attention"])),
        "criteria": ([criteria_table(edited)], drift_overview(edited)),
        "capacity": ([capacity_summary(rows["capacity"])], capacity_curve(rows["capacity"])),
    }
    written: dict[str, Path] = {}
    for question, (tables, figure) in outputs.items():
        text = "\n".join(markdown(table) for table in tables)
        (target / f"open_questions_{question}.md").write_text(
            f"{text}\n{len(config.seeds)} seeds ({', '.join(map(str, config.seeds))}); {minutes[question]:.1f} min.\n")
        written[question] = save_figure(figure, target, f"open_questions_{question}")[0]
    return written


if __name__ == "__main__":
    regenerate(Path(sys.argv[1] if len(sys.argv) > 1 else "figures"))
