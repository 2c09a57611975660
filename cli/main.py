"""The ``spectra`` command: thin typer commands that parse options, call one library function, print a summary."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spectra.errors import RunInterrupted, SpectraError

if TYPE_CHECKING:
    import pandas as pd

    from spectra.experiments.common import GeneralOptions

app = typer.Typer(
    help="Spectral diagnosis of sequential knowledge editing, with REVIVE built in. "
    "Every command defaults to the embedded tiny-world model (--model tiny) and runs offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help text: rich markup would swallow the "[default: ...]" notes of the options.
    rich_markup_mode=None,
)
# Long lines stay whole (never wrapped at 80 columns when stdout is a file or a pipe).
console = Console(soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])
FORMATS = ("table", "csv", "json")


def show(frame: "pd.DataFrame", fmt: str) -> None:
    """Print a table whole: a rich table on a terminal, plain wide text into a file or pipe, or CSV / JSON.

    Nothing is ever cut: rich fits tables to the terminal's width (and to 80 columns when it is
    not one), so anything but a terminal gets pandas' plain text, which never wraps or truncates.
    """
    if fmt == "csv":
        sys.stdout.write(frame.to_csv(index=False))
    elif fmt == "json":
        sys.stdout.write(frame.to_json(orient="records", indent=1) + "\n")
    elif console.is_terminal:
        table = Table(*map(str, frame.columns))
        for column in table.columns:
            column.overflow = "fold"
        for values in frame.astype(str).itertuples(index=False):
            table.add_row(*values)
        console.print(table)
    else:
        print(frame.to_string(index=False), flush=True)


def note(text: str, fmt: str) -> None:
    """A line around a table (run directory, hints): on stdout with a table, on stderr when stdout is CSV or JSON."""
    print(text, file=sys.stdout if fmt == "table" else sys.stderr, flush=True)


def check_format(fmt: str) -> None:
    """--format must name one of FORMATS."""
    if fmt not in FORMATS:
        raise SpectraError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")


def friendly_errors(command: F) -> F:
    """Print a SpectraError as its one-paragraph message (no traceback) and exit with its status (2 for bad input).

    Ctrl-C outside a run that handles it (a drift run stops between checkpoints itself) ends the
    command with a line instead of a traceback.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpectraError as err:
            label = "stopped" if isinstance(err, RunInterrupted) else "error"
            Console(stderr=True).print(f"[bold red]{label}:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=err.exit_code) from None
        except KeyboardInterrupt:
            Console(stderr=True).print("[bold red]interrupted:[/] stopped by Ctrl-C; no run of this command was "
                                       "completed.", highlight=False, soft_wrap=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def given_options(ctx: typer.Context, renamed: dict[str, str]) -> set[str]:
    """The config keys of the options typed on the command line (``renamed``: option -> key where they differ)."""
    typed = {"COMMANDLINE", "ENVIRONMENT", "PROMPT"}
    return {renamed.get(name, name) for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") in typed}


def _edit_options_given(ctx: typer.Context) -> set[str]:
    """The config keys of the options a drift or capacity command line typed (what a resumed run checks)."""
    from spectra.experiments.drift import OPTION_NAMES

    renamed = {option.removeprefix("--").replace("-", "_"): key for key, option in OPTION_NAMES.items()}
    return given_options(ctx, renamed)


FORMAT = typer.Option("table", "--format", help="table (whole, never cut; plain text when stdout is not a terminal), "
                      "csv or json (to stdout; other lines go to stderr).")


@app.command()
@friendly_errors
def models(fmt: str = FORMAT) -> None:
    """List the model aliases, what they resolve to, whether each is available locally, and its editor defaults."""
    import pandas as pd

    from spectra.editing.hparams import KNOWN_MODELS
    from spectra.models import ALIASES, locally_available

    check_format(fmt)
    rows = []
    for alias in ALIASES:
        available, where = locally_available(alias)
        rows.append({"alias": alias, "resolves to": ALIASES[alias], "available locally": "yes" if available else "no",
                     "editor defaults": "yes" if alias in KNOWN_MODELS else "no", "from": where if available else "-"})
    show(pd.DataFrame(rows), fmt)
    note("Any local directory saved with save_pretrained or a cached hub id also works as --model; a hub id an alias "
         "resolves to gets that alias's editor defaults, any other model takes --hparams FILE.", fmt)


@app.command("train-tiny")
@friendly_errors
def train_tiny(
    out: Path = typer.Option(None, help="Directory to write the model and world files into "
                             "[default: the package's embedded assets/tiny]."),
    steps: int = typer.Option(None, help="Optimizer steps, batches of 64 documents of 1-3 sentences "
                              "[default: TinyTrainConfig.steps, 3000]."),
    seed: int = typer.Option(0, help="Seed of initialisation and data order."),
) -> None:
    """Regenerate the tiny world and retrain the embedded model (about 20-30 min on 2 CPU cores)."""
    from spectra.assets import tiny_model_dir
    from spectra.models.tiny import TinyTrainConfig, build_and_save

    target = out or tiny_model_dir()
    config = TinyTrainConfig(seed=seed) if steps is None else TinyTrainConfig(steps=steps, seed=seed)
    report = build_and_save(config, target)
    console.print(f"trained in {report['train_seconds']} s; recall of training facts "
                  f"{report['recall_trained_phrasing']:.1%}, held-out phrasing {report['recall_heldout_phrasing']:.1%}")
    console.print(f"written to {target}")


def main() -> None:
    """Console-script entry point."""
    app()


# -- option helpers ------------------------------------------------------------------------------
MODEL = typer.Option("tiny", "--model", help="Model alias (spectra models), local directory or cached hub id.")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")
DTYPE = typer.Option("float32", "--dtype", help="Model dtype: float32, float16, bfloat16 or auto (the checkpoint's own "
                     "dtype); solves and SVDs stay float32 or better.")
DEVICE_MAP = typer.Option(None, "--device-map", help="auto: spread a model larger than one GPU over all devices "
                          "through accelerate (an optional dependency: pip install 'spectra[large]'); the edited "
                          "sites' keys and solves still go to the first device. Replaces --device.")
SEED = typer.Option(0, "--seed", help="Seed of every random choice (generators are passed explicitly).")
OUT = typer.Option(None, "--out", help="Run directory to write [default: runs/<time>-<command>].")
ALLOW_DOWNLOAD = typer.Option(False, "--allow-download", help="Let transformers download a model missing from the cache.")
SITES = typer.Option(None, "--sites", help="Comma-separated KIND or KIND@LAYER (e.g. mlp.down or mlp.up@2,mlp.down@2; "
                     "attention kinds attn.q, attn.k, attn.v, attn.o too) [default: the FFN matrices of every layer].")
BY_KIND = typer.Option(False, "--by-kind", help="Change one site kind at a time (rows get a kind column; the "
                       "kind_comparison figure compares them) instead of every chosen site at once.")
SPECTRUM_SITES = typer.Option(None, "--sites", help="Comma-separated KIND or KIND@LAYER (e.g. mlp.down or "
                              "mlp.up@2,attn.q@0) [default: every FFN and attention matrix of every layer].")
TASKS = typer.Option(None, "--tasks", help="Comma-separated general-ability tasks [default: the tiny world's four tasks, "
                     "or sst2,mrpc,cola,rte for a real model].")
ITEMS = typer.Option(100, "--items-per-task", help="Items per general-ability task (class-balanced, seeded subsample).")
GLUE_DIR = typer.Option(None, "--glue-dir", help="Directory of <task>.jsonl files for real models [default: the local "
                        "Hugging Face datasets cache].")
SKIP_BAD = typer.Option(False, "--skip-bad-records", help="Leave out dataset records the model's tokenizer cannot "
                        "represent (unknown words, a subject that is not a run of tokens in its prompt, target_new == "
                        "target_true) and say how many; without it they are an error listing the first few.")


# Options shared by the edit-loop commands (drift, capacity).
EDITOR = typer.Option("memit", "--editor", help="memit, alphaedit, rect, prune or nse.")
DATASET = typer.Option("auto", "--dataset", help="tiny, tiny-zsre, counterfact, mcf, cf, zsre or a path to CounterFact, "
                       "zsRE or EasyEdit/KnowEdit JSON (detected by its fields; `spectra data` shows each) [default: tiny "
                       "for the tiny model, else counterfact].")
PLACEMENT = typer.Option(None, "--placement", help="Where REVIVE acts on the key side: after (the paper's post-hoc "
                         "filter) or in_solve (spectra's extension: solve on the complement of V_k, the constrained "
                         "optimum) [default: after].")
PROTECT = typer.Option("energy", "--protect", help="Which singular triplets of W0 REVIVE protects: energy (the paper: "
                       "the top k holding tau of sum sigma), rank (the top tau share of the rank), sigma2 (the top k "
                       "holding tau of sum sigma^2), activation (the k right singular directions the statistics corpus's "
                       "keys use most, E[(v^T k)^2]; mlp.down sites) or fisher (the k directions u v^T along which the "
                       "loss of held-out general-task items has the largest mean squared gradient); activation and "
                       "fisher protect as many as energy at the same tau.")
PROTECT_DIM = typer.Option(None, "--protect-dim", help="Protect exactly this many triplets per site, whatever the "
                           "criterion (one --tau only) [default: as many as tau buys].")
SHUFFLE = typer.Option(False, "--shuffle-records", help="Edit a --seed-shuffled order of the dataset's records (other "
                       "facts per seed) instead of its first ones.")
STATS_CORPUS = typer.Option(None, "--stats-corpus", help="Text file (one document per line) for the key statistics "
                            "[default: the tiny world's corpus; a real model needs it or --stats].")
STATS = typer.Option(None, "--stats", help="Precomputed key statistics instead of computing them: a MEMIT/ROME "
                     "layer_stats .npz (<module>_float32_mom2_<n>.npz, as the official code and EasyEdit write them), "
                     "spectra's cache files, or a directory holding one per edited layer.")
HPARAMS = typer.Option(None, "--hparams", help="Editor hyperparameters from a file: EasyEdit's YAML (hparams/MEMIT/"
                       "llama3-8b.yaml) or the official repositories' JSON. Keys spectra does not need are reported as "
                       "ignored; unknown keys are errors [default: the model's defaults].")
HPARAMS_SET = typer.Option(None, "--set", help="Override one hyperparameter, key=value (repeatable), e.g. --set "
                           "v_lr=0.5 --set layers=[4,5,6].")
RESUME = typer.Option(None, "--resume", help="Continue a run directory: an interrupted one from its last intact "
                      "checkpoint, a finished one with a larger --rounds. Its options come from its config.json; "
                      "options given as well must match them.")


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpectraError(f"{name} must be a comma-separated list of numbers, got {text!r}.") from None


def _general(tasks: str | None, items: int, glue_dir: Path | None) -> "GeneralOptions":
    from spectra.experiments.common import GeneralOptions

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
    return GeneralOptions(tasks=names, items_per_task=items, data_dir=glue_dir)


@app.command()
@friendly_errors
def spectrum(
    model: str = MODEL, sites: str = SPECTRUM_SITES,
    taus: str = typer.Option("0.05,0.1,0.2,0.3", help="Energy thresholds tau."),
    svd_dtype: str = typer.Option("float32", help="SVD precision: float32 or float64."),
    fmt: str = FORMAT,
    device: str = DEVICE, dtype: str = DTYPE, seed: int = SEED, out: Path = OUT, allow_download: bool = ALLOW_DOWNLOAD,
    device_map: str = DEVICE_MAP,
) -> None:
    """Per site: shape, k and k/rank per tau, spectral norm, condition number, effective rank."""
    import pandas as pd

    from spectra.experiments.probes import SpectrumConfig, run_spectrum

    check_format(fmt)
    config = SpectrumConfig(model=model, device=device, dtype=dtype, seed=seed, out=out, allow_download=allow_download,
                            device_map=device_map, sites=sites, taus=_floats(taus, "--taus"), svd_dtype=svd_dtype)
    path, rows = run_spectrum(config)
    by_site: dict[str, dict] = {}
    for row in rows:
        key = row["metric"] + (f"@{row['tau']:g}" if row["tau"] is not None else "")
        by_site.setdefault(row["site"], {})[key] = row["value"]
    table = []
    for site, values in by_site.items():
        entry: dict[str, object] = {"site": site, "shape": f"{int(values['m'])}x{int(values['n'])}"}
        for t in config.taus:
            entry[f"k @{t:g}"] = int(values[f"k@{t:g}"])
            entry[f"k/rank % @{t:g}"] = round(100 * values[f"k_over_rank@{t:g}"], 1)
        entry.update({"sigma_1": float(f"{values['spectral_norm']:.4g}"), "cond": float(f"{values['condition_number']:.4g}"),
                      "eff. rank": round(values["effective_rank"], 1)})
        table.append(entry)
    show(pd.DataFrame(table), fmt)
    note(f"run directory: {path}", fmt)


@app.command()
@friendly_errors
def concentration(
    model: str = MODEL, sites: str = SITES,
    fractions: str = typer.Option("5,10,20,30,40,50,60,70,80,90,100", help="Percent of singular-value energy kept, each in (0, 100]."),
    by_kind: bool = BY_KIND, tasks: str = TASKS, items_per_task: int = ITEMS, glue_dir: Path = GLUE_DIR, fmt: str = FORMAT,
    device: str = DEVICE, dtype: str = DTYPE, seed: int = SEED, out: Path = OUT, allow_download: bool = ALLOW_DOWNLOAD,
    device_map: str = DEVICE_MAP,
) -> None:
    """Reconstruct the sites from their top-n % energy and measure general ability (paper Fig. 2a)."""
    from spectra.experiments.probes import ConcentrationConfig, run_concentration

    check_format(fmt)
    config = ConcentrationConfig(model=model, device=device, dtype=dtype, seed=seed, out=out, allow_download=allow_download,
                                 device_map=device_map, sites=sites, fractions=_floats(fractions, "--fractions"),
                                 by_kind=by_kind,
                                 general=_general(tasks, items_per_task, glue_dir))
    path = run_concentration(config)
    _summarise(path, ["kind"] * by_kind + ["fraction", "task"], "accuracy", fmt)


@app.command()
@friendly_errors
def sensitivity(
    model: str = MODEL, sites: str = SITES,
    side: str = typer.Option("both", help="input (Eq. 2: remap v_j of a group), output (App. F.1: remap u_i) or both."),
    eps: str = typer.Option("1", help="Perturbation Frobenius norm, relative to ||W||_F unless --eps-absolute "
                            "(1: where the tiny model's energy groups differ; at 0.1 none matters); several "
                            "(0.1,0.3,1,3) add the curve over eps (figure sensitivity_by_eps)."),
    eps_absolute: bool = typer.Option(False, "--eps-absolute", help="Read --eps as an absolute Frobenius norm."),
    seeds: int = typer.Option(3, help="Random perturbations per group."),
    by_kind: bool = BY_KIND, tasks: str = TASKS, items_per_task: int = ITEMS, glue_dir: Path = GLUE_DIR, fmt: str = FORMAT,
    device: str = DEVICE, dtype: str = DTYPE, seed: int = SEED, out: Path = OUT, allow_download: bool = ALLOW_DOWNLOAD,
    device_map: str = DEVICE_MAP,
) -> None:
    """Perturb each energy group (0-10 %, ..., 90-100 %) and measure general ability (paper Fig. 2b, 11)."""
    from spectra.experiments.probes import SensitivityConfig, run_sensitivity

    check_format(fmt)
    config = SensitivityConfig(model=model, device=device, dtype=dtype, seed=seed, out=out, allow_download=allow_download,
                               device_map=device_map, sites=sites, side=side, eps=_floats(eps, "--eps"), eps_absolute=eps_absolute,
                               seeds=seeds, by_kind=by_kind,
                               general=_general(tasks, items_per_task, glue_dir))
    path = run_sensitivity(config)
    _summarise(path, ["kind"] * by_kind + ["eps"] * (len(config.eps) > 1) + ["side", "group"], "accuracy", fmt,
               task="mean")


@app.command()
@friendly_errors
def trace(
    model: str = MODEL,
    dataset: str = typer.Option("auto", help="CounterFact-format facts to trace: tiny, counterfact, mcf, cf or a path "
                                "[default: the tiny world for the tiny model, else counterfact]."),
    facts: int = typer.Option(30, help="Facts traced (a seeded sample of the dataset; at most its size)."),
    noise: float = typer.Option(3.0, help="Noise on the subject's embeddings, in stds of the embedding matrix."),
    skip_bad_records: bool = SKIP_BAD, fmt: str = FORMAT,
    device: str = DEVICE, dtype: str = DTYPE, seed: int = SEED, out: Path = OUT, allow_download: bool = ALLOW_DOWNLOAD,
    device_map: str = DEVICE_MAP,
) -> None:
    """Causal trace (ROME): which blocks hold facts at the subject's last token, and where they are read out."""
    from spectra.experiments.probes import TraceConfig, run_trace

    check_format(fmt)
    config = TraceConfig(model=model, device=device, dtype=dtype, seed=seed, out=out, allow_download=allow_download,
                         device_map=device_map, dataset=dataset, facts=facts, noise=noise, skip_bad_records=skip_bad_records)
    path = run_trace(config)
    from spectra.results import load_run

    rows = load_run(path).rows
    per_block = rows.dropna(subset=["layer"]).astype({"layer": int})
    for metric, title in (("trace_probability", "P(true object) with block L's output restored (columns: block L)"),
                          ("trace_recovery", "share of the clean-corrupted gap that block L's output recovers")):
        chosen = per_block[per_block["metric"] == metric]
        if len(chosen):
            note(title, fmt)
            table = chosen.pivot_table(index="position", columns="layer", values="value").round(3)
            show(table.rename(columns=lambda layer: f"block {layer}").reset_index(), fmt)
    baselines = rows[rows["layer"].isna()].set_index("position")["value"]
    note(f"clean {baselines['clean']:.3f}   corrupted {baselines['corrupted']:.3f}", fmt)
    note(f"run directory: {path}", fmt)


@app.command()
@friendly_errors
def drift(
    ctx: typer.Context,
    model: str = MODEL,
    editor: str = EDITOR,
    rounds: int = typer.Option(20, help="Sequential editing rounds."),
    batch_size: int = typer.Option(None, help="Edits per round [default: 2.44 % of the model's hidden size, the "
                                   "paper's 100 edits on Llama-3-8B's 4,096 scaled: 5 on the 192-wide tiny model, "
                                   "100 on 4,096-wide models]."),
    revive: str = typer.Option("both", help="on, off or both (two arms over identical requests)."),
    tau: str = typer.Option("0.1", help="REVIVE energy threshold(s) in (0, 1); several (0.05,0.1,...) run a tau sweep."),
    dataset: str = DATASET,
    refresh: str = typer.Option("original", help="REVIVE basis: from the original weights, or rebuilt from the current ones each round."),
    placement: str = PLACEMENT,
    protect: str = PROTECT, protect_dim: int = PROTECT_DIM,
    sites: str = typer.Option(None, "--sites", help="Sites whose spectral drift is measured, e.g. mlp.down,attn.q,attn.o "
                              "(KIND or KIND@LAYER). REVIVE protects every site the editor writes; a listed site it does "
                              "not write must keep zero drift, and a warning says when it does not [default: the sites "
                              "the editor writes]."),
    shuffle_records: bool = SHUFFLE,
    metric_tau: float = typer.Option(0.1, help="tau defining the dominant subspace for LS and SS."),
    ss_every: int = typer.Option(2, help="Store SS matrices every N rounds (and the last)."),
    eval_records: int = typer.Option(200, help="Edited records sampled for the per-round edit metrics (all of them "
                                     "while fewer have been edited)."),
    represent_prompts: int = typer.Option(200, help="Held-out factual prompts for representation shift (0 = off)."),
    tsne: bool = typer.Option(False, "--tsne", help="Add a joint t-SNE of the last round against the original states."),
    fluency: bool = typer.Option(False, "--fluency", help="Also measure fluency each round: the generation entropy of "
                                 "one 100-token top-5 sample per generation prompt of the scored records (CounterFact: "
                                 "4 per record; the edited prompt where a dataset has none). Cost: one 100-token "
                                 "generation per prompt per round; on the tiny model 43 s a round at the default 200 "
                                 "scored records on one CPU thread (a round's edit and other measurements take about "
                                 "12 s), 29 min over the default 20 rounds x 2 arms."),
    consistency: bool = typer.Option(False, "--consistency", help="Also measure consistency each round: TF-IDF cosine "
                                     "of those generations with reference texts about the new target (attribute "
                                     "snippets; the data directory's idf.npy and tfidf_vocab.json for real models). "
                                     "Shares --fluency's generations, so together they cost the same."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Also keep one row per scored prompt in samples.csv "
                                     "(arm, round, case_id, prompt kind, P(new), P(true), success): which edits failed."),
    stats_corpus: Path = STATS_CORPUS, stats: Path = STATS, hparams: Path = HPARAMS, hparams_set: list[str] = HPARAMS_SET,
    tasks: str = TASKS, items_per_task: int = ITEMS, glue_dir: Path = GLUE_DIR, skip_bad_records: bool = SKIP_BAD,
    fmt: str = FORMAT,
    resume: Path = RESUME,
    device: str = DEVICE, dtype: str = DTYPE, seed: int = SEED, out: Path = OUT, allow_download: bool = ALLOW_DOWNLOAD,
    device_map: str = DEVICE_MAP,
) -> None:
    """Edit round after round with REVIVE on and off; track LS, SS, norms, edit metrics and general ability."""
    from spectra.experiments.drift import DriftConfig, run_drift

    check_format(fmt)
    config = DriftConfig(model=model, device=device, dtype=dtype, seed=seed, out=out, allow_download=allow_download,
                         device_map=device_map, editor=editor, rounds=rounds, batch_size=batch_size, revive=revive,
                         tau=_floats(tau, "--tau"),
                         dataset=dataset, refresh=refresh, placement=placement, protect=protect,
                         protect_dim=protect_dim, sites=sites, shuffle_records=shuffle_records, metric_tau=metric_tau,
                         ss_every=ss_every, eval_records=eval_records, represent_prompts=represent_prompts, tsne=tsne,
                         log_samples=log_samples, fluency=fluency, consistency=consistency,
                         stats_corpus=stats_corpus, stats=stats, hparams=hparams, hparams_set=list(hparams_set or []),
                         general=_general(tasks, items_per_task, glue_dir),
                         skip_bad_records=skip_bad_records, resume=resume)
    path = run_drift(config, given=_edit_options_given(ctx))
    from spectra.experiments.drift import formatted_table, last_round_table, regime_note
    from spectra.results import load_run

    rows = load_run(path).rows
    table = last_round_table(rows)
    show((formatted_table(table) if fmt == "table" else table).reset_index(), fmt)
    warning = regime_note(rows)
    if warning:
        note(warning, fmt)
    note(f"run directory: {path}", fmt)
    note(f"figures: {path / 'figures'}", fmt)


@app.command()
@friendly_errors
def capacity(
    ctx: typer.Context,
    model: str = MODEL, editor: str = EDITOR,
    rounds: int = typer.Option(10, help="Budget: at most this many rounds per arm (rounds x batch size edits)."),
    batch_size: int = typer.Option(20, help="Edits per round."),
    revive: str = typer.Option("both", help="on (REVIVE arms only), off or both (with the off arm)."),
    tau: str = typer.Option("0.1,0.5,0.9", help="REVIVE thresholds in (0, 1), one arm each: a larger tau leaves a "
                            "smaller complement."),
    threshold: float = typer.Option(50.0, help="An arm fails at the first round whose own edits' efficacy (%) falls "
                                    "below this; it then stops."),
    protect: str = PROTECT, protect_dim: int = PROTECT_DIM, placement: str = PLACEMENT, dataset: str = DATASET,
    shuffle_records: bool = SHUFFLE,
    eval_records: int = typer.Option(100, help="Edited records sampled for the efficacy on all edits so far."),
    stats_corpus: Path = STATS_CORPUS, stats: Path = STATS, hparams: Path = HPARAMS, hparams_set: list[str] = HPARAMS_SET,
    tasks: str = TASKS, items_per_task: int = ITEMS, glue_dir: Path = GLUE_DIR, skip_bad_records: bool = SKIP_BAD,
    fmt: str = FORMAT, resume: Path = RESUME,
    device: str = DEVICE, dtype: str = DTYPE, seed: int = SEED, out: Path = OUT, allow_download: bool = ALLOW_DOWNLOAD,
    device_map: str = DEVICE_MAP,
) -> None:
    """Edit until new edits stop working, per tau: how many edits the protected complement absorbs."""
    from spectra.experiments.capacity import CapacityConfig, capacity_table, run_capacity
    from spectra.results import load_run

    check_format(fmt)
    config = CapacityConfig(model=model, device=device, dtype=dtype, seed=seed, out=out, allow_download=allow_download,
                            device_map=device_map, editor=editor, rounds=rounds, batch_size=batch_size, revive=revive,
                            tau=_floats(tau, "--tau"), threshold=threshold, protect=protect, protect_dim=protect_dim,
                            placement=placement, dataset=dataset, shuffle_records=shuffle_records,
                            eval_records=eval_records, stats_corpus=stats_corpus, stats=stats, hparams=hparams,
                            hparams_set=list(hparams_set or []), general=_general(tasks, items_per_task, glue_dir),
                            skip_bad_records=skip_bad_records, resume=resume)
    path = run_capacity(config, given=_edit_options_given(ctx))
    show(capacity_table(load_run(path).rows).round(2), fmt)
    note(f"run directory: {path}", fmt)
    note(f"figures: {path / 'figures'}", fmt)


@app.command()
@friendly_errors
def editability(
    model: str = MODEL, editor: str = EDITOR, dataset: str = DATASET,
    edits: int = typer.Option(10, help="Single edits, each made from the original weights (the dataset's first "
                              "records, or a --seed shuffle with --shuffle-records)."),
    facts: int = typer.Option(50, help="Facts (a seeded sample of the dataset) traced and scored for calibration."),
    noise: float = typer.Option(3.0, help="The trace's noise on the subject's embeddings, in stds of the embedding "
                                "matrix."),
    shuffle_records: bool = SHUFFLE,
    stats_corpus: Path = STATS_CORPUS, stats: Path = STATS, hparams: Path = HPARAMS, hparams_set: list[str] = HPARAMS_SET,
    skip_bad_records: bool = SKIP_BAD, fmt: str = FORMAT,
    device: str = DEVICE, dtype: str = DTYPE, seed: int = SEED, out: Path = OUT, allow_download: bool = ALLOW_DOWNLOAD,
    device_map: str = DEVICE_MAP,
) -> None:
    """Does the model hold facts where the editor writes, and what does one edit cost? (The LLM-like targets.)"""
    from spectra.experiments.editability import EditabilityConfig, editability_table, run_editability
    from spectra.results import load_run

    check_format(fmt)
    config = EditabilityConfig(model=model, device=device, dtype=dtype, seed=seed, out=out,
                               allow_download=allow_download, device_map=device_map, editor=editor, dataset=dataset,
                               edits=edits, facts=facts, noise=noise, shuffle_records=shuffle_records,
                               stats_corpus=stats_corpus, stats=stats, hparams=hparams,
                               hparams_set=list(hparams_set or []), skip_bad_records=skip_bad_records)
    path = run_editability(config)
    show(editability_table(load_run(path).rows), fmt)
    note(f"run directory: {path}", fmt)


@app.command()
@friendly_errors
def plot(run_dir: Path = typer.Argument(..., help="A finished run directory."),
         pdf: bool = typer.Option(False, "--pdf", help="Write every figure as PDF too (PNG only by default).")) -> None:
    """Redraw every figure of a run from its directory alone (no model needed)."""
    from spectra.plots import plot_run

    for figure in plot_run(run_dir, formats=("png", "pdf") if pdf else ("png",)):
        print(figure, flush=True)


@app.command()
@friendly_errors
def data(fmt: str = FORMAT) -> None:
    """Show which standard dataset files are present locally, where to put missing ones, and every edit-set format."""
    import pandas as pd

    from spectra.data.datasets import FORMATS as DATA_FORMATS, local_data, where_to_put

    check_format(fmt)
    show(pd.DataFrame([{"name": s.file.name, "file": s.file.filename, "present": "yes" if s.present else "no",
                        "what it is for": s.file.purpose, "path": str(s.path)} for s in local_data()]), fmt)
    note(where_to_put(), fmt)
    note("\nEdit-set formats (--dataset PATH; detected from the first record's fields), one example record each:", fmt)
    for kind, title, example in DATA_FORMATS:
        note(f"\n{title} [{kind}]:\n{example}", fmt)


def _summarise(path: Path, by: list[str], metric: str, fmt: str, task: str | None = None) -> None:
    """Print a compact table of one metric from a finished run (mean over repeated rows), then the run directory."""
    from spectra.results import load_run

    rows = load_run(path).rows
    rows = rows[rows["metric"] == metric]
    if task is not None and "task" in rows:
        rows = rows[rows["task"] == task]
    if len(rows):
        table = rows.groupby([c for c in by if c in rows], dropna=False)["value"].mean().round(4)
        show(table.rename(metric).reset_index(), fmt)
    note(f"run directory: {path}", fmt)
