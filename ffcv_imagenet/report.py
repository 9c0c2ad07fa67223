"""Time-to-accuracy tables and plots from run folders.

`ffcv-imagenet report RUN_DIR [RUN_DIR ...]` finds every `log.jsonl` under the given folders (a run
folder, or a folder of run folders), and writes:

- a Markdown table, one row per group of runs of the same preset on the same hardware in the
  same precision: runs (n), epochs, GPUs/devices and precision, top-1 and top-5 (mean ± std over
  runs), wall-clock to the end (start-up plus training and validation), time to reach each top-1
  target, mean images/s; when a preset's finished runs span several precisions, one more row
  pools their top-1 and top-5 (the times stay per precision);
- a second table, one row per run: top-1, start-up (launch to the first step), wall-clock,
  images/s, machine (from env.json) and precision, date and the command: the first launch's (from
  its `start` line; params.json's argv for older logs), plus the arguments that later launches of a
  resumed run added (`--training.stop_after_s=...`) and those of the first launch's that a later
  launch left out (its setting went back to the config file's or the default);
  a run whose launches trained in different precisions reads e.g. "bf16+fp32", flagged, and is
  not averaged with runs in one precision;
- `top1_vs_time.png`, `top1_vs_epoch.png` (every run overlaid) and `front.png` (final top-1
  against wall-clock, one point per run, the group mean marked) in `report.out`.

`--report.reference=NAME[,NAME]` adds published results from `references.json` (FFCV's tables,
He et al. 2016, Bag of Tricks) to the first table, each row marked "reference: ..." with its
source, after the runs of its preset and epochs (rows that no run matches come last).

Runs that were cut short or whose logs lack a field are listed, marked as such, never dropped:
a cut-short run gets its own row with "incomplete k/N" and is not averaged with finished runs,
marked "stopped by training.stop_after_s" when its last launch ended itself at a time limit.
"""

import json
import math
import shlex
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ffcv_imagenet.command import Command, Option, Positional
from ffcv_imagenet.config import ConfigError, parse_cli
from ffcv_imagenet.schedules import validates_after

EPOCH_FIELDS = ("epoch", "lr", "resolution", "train_loss", "train_images_per_s", "epoch_s", "elapsed_s")
# null on the epochs that validation.every_n_epochs skips; expected on the others and on the last
VAL_FIELDS = ("top_1", "top_5", "val_loss")
DEFAULT_TARGETS = (0.5, 0.6, 0.7, 0.75)
REFERENCES_PATH = Path(__file__).with_name("references.json")
# Read at import, a few KB: its names are report.reference's choices, which --help lists.
REFERENCES = json.loads(REFERENCES_PATH.read_text(encoding="utf-8"))["references"]
MARKER = "<!-- report:{name} {edge} -->"


@dataclass
class Run:
    """What one run folder's log says, with every gap recorded in `problems`."""

    folder: Path
    preset: str = "?"
    planned_epochs: "int | None" = None
    val_every: int = 1  # validation.every_n_epochs
    world_size: "int | None" = None
    device: str = "?"
    precision: "str | None" = None  # the precision it trained in (params.json, derived.precision)
    startup_s: "float | None" = None
    # start-ups of the sessions that resumed the run: (first epoch that session ran, seconds)
    restarts: list = field(default_factory=list)
    epochs: list = field(default_factory=list)  # epoch records in order, one per epoch
    summary: "dict | None" = None
    evals: list = field(default_factory=list)  # `eval` records (training.eval_only into the folder)
    problems: list = field(default_factory=list)
    machine: str = "?"
    date: str = "?"
    command: str = "?"
    resumed_with: list = field(default_factory=list)  # per later launch: what it added to the first's
    resumed_without: list = field(default_factory=list)  # the first's arguments a later launch lacked

    @property
    def complete(self) -> bool:
        done = len(self.epochs)
        return self.summary is not None and (self.planned_epochs is None or done >= self.planned_epochs)

    @property
    def final(self) -> dict:
        return self.epochs[-1] if self.epochs else {}

    def top1_at_end(self):
        return _get(self.summary, "top_1", _get(self.final, "top_1"))

    def top5_at_end(self):
        return _get(self.summary, "top_5", _get(self.final, "top_5"))

    def real_top1_at_end(self):
        """ReaL top-1 (validation.real_labels) at the end, else of the last eval_only record."""
        last_eval = self.evals[-1] if self.evals else None
        return _get(self.summary, "real_top_1", _get(self.final, "real_top_1",
                                                     _get(last_eval, "real_top_1")))

    def startups_before(self, epoch=None) -> float:
        """Start-up seconds paid before `epoch` ended (None: by the end of the run): the first
        launch's, plus that of every session that resumed the run at or before `epoch`.
        (`elapsed_s` counts training and validation only, summed over sessions.)"""
        resumed = sum(s for first, s in self.restarts
                      if epoch is None or (first is not None and first <= epoch))
        return (self.startup_s or 0.0) + resumed

    def wallclock_s(self):
        """Launch to the end: start-ups plus training/validation wall-clock."""
        elapsed = _get(self.summary, "elapsed_s", _get(self.final, "elapsed_s"))
        if elapsed is None or self.startup_s is None:
            return None
        return elapsed + self.startups_before()

    def time_to(self, target: float):
        """Wall-clock (start-ups included) at the end of the first epoch whose top-1 reaches target."""
        for rec in self.epochs:
            top1, elapsed = rec.get("top_1"), rec.get("elapsed_s")
            if top1 is not None and elapsed is not None and top1 >= target:
                return elapsed + self.startups_before(rec.get("epoch"))
        return None

    def mean_images_per_s(self):
        value = _get(self.summary, "mean_images_per_s")
        if value is not None:
            return value
        rates = [r["train_images_per_s"] for r in self.epochs if r.get("train_images_per_s") is not None]
        return statistics.fmean(rates) if rates else None


def _get(record, key, default=None):
    if not record:
        return default
    value = record.get(key)
    return default if value is None else value


def _lookup(params: dict, dotted: str):
    """Find `section.key` in params.json, nested or flat, or None."""
    if dotted in params:
        return params[dotted]
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_run(folder: Path) -> Run:
    """Parse `folder/log.jsonl` (and params.json, env.json when present) into a Run."""
    run = Run(folder=folder)
    _read_params(run, folder / "params.json")
    env_path = folder / "env.json"
    if env_path.exists():
        try:
            run.machine = describe_machine(json.loads(env_path.read_text()))
        except (json.JSONDecodeError, AttributeError) as e:
            run.problems.append(f"env.json unreadable ({e})")
    launches = _read_log(run, folder / "log.jsonl")
    _read_launches(run, launches)
    _record_gaps(run, stopped=launches["stopped"])
    return run


def _read_params(run: Run, path: Path) -> None:
    """Planned epochs, validation interval, preset, precision and command from params.json."""
    if not path.exists():
        run.problems.append("no params.json")
        return
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        params = {}
        run.problems.append(f"params.json unreadable ({e})")
    epochs = _lookup(params, "training.epochs")
    run.planned_epochs = int(epochs) if epochs is not None else None
    every = _lookup(params, "validation.every_n_epochs")
    run.val_every = int(every) if isinstance(every, int) and every >= 1 else 1
    preset = _lookup(params, "config_file") or _lookup(params, "preset")
    if preset:
        run.preset = Path(str(preset)).stem
    precision = _lookup(params, "derived.precision")
    run.precision = str(precision) if precision else None
    argv = _lookup(params, "argv")
    if isinstance(argv, list):
        run.command = _train_command(argv)


def _read_log(run: Run, path: Path) -> dict:
    """The log's epochs (the last line of each), summary and first start-up into `run`; returns
    what the launches' start lines say: {"precisions", "argvs" (in order; logs written before
    start lines carried argv have none), "stopped" (whether the last launch ended itself at
    training.stop_after_s)}."""
    by_epoch, launches = {}, {"precisions": [], "argvs": [], "stopped": False}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            run.problems.append(f"log.jsonl line {line_no} is not JSON (cut off while writing?)")
            continue
        kind = record.get("type", "epoch" if "epoch" in record else None)
        if kind in ("stopped", "failed"):  # how the last launch ended, unless another followed
            launches["stopped"] = _end_reason(record)
        elif kind in ("start", "epoch"):
            launches["stopped"] = False
        if kind == "start":
            _read_start(run, record, launches)
        elif kind == "epoch":
            by_epoch[record.get("epoch")] = record  # a resumed run rewrites an epoch: keep the last
        elif kind == "eval":
            run.evals.append(record)
        elif kind == "summary":
            run.summary = record
            if record.get("preset"):
                run.preset = Path(str(record["preset"])).stem
            if run.startup_s is None:
                run.startup_s = record.get("startup_s")
    run.epochs = [by_epoch[k] for k in sorted(by_epoch, key=lambda e: (e is None, e))]
    return launches


def _read_start(run: Run, record: dict, launches: dict) -> None:
    if run.startup_s is None:  # the first launch's
        run.startup_s = record.get("startup_s")
        run.date = str(record.get("time") or "?")[:10]
    elif record.get("startup_s") is not None:  # a session that resumed the run
        run.restarts.append((record.get("resumed_from_epoch"), record["startup_s"]))
    if isinstance(record.get("argv"), list):
        launches["argvs"].append([str(a) for a in record["argv"]])
    if record.get("precision") and record["precision"] not in launches["precisions"]:
        launches["precisions"].append(record["precision"])
    run.world_size = record.get("world_size", run.world_size)
    run.device = record.get("device", run.device) or run.device


def _read_launches(run: Run, launches: dict) -> None:
    """The command that started the run, what its resumes added and dropped, and the precision
    (or precisions, when a resume on another machine changed it)."""
    argvs, precisions = launches["argvs"], launches["precisions"]
    if argvs:
        run.command = _train_command(argvs[0])
        run.resumed_with = [[a for a in argv if a not in argvs[0]] for argv in argvs[1:]]
        first = _cli_values(argvs[0])
        later = [_cli_values(argv) for argv in argvs[1:]]
        run.resumed_without = list(dict.fromkeys(
            f"--{name}={value}" for values in later for name, value in first.items() if name not in values))
    if len(precisions) > 1:  # resumed on a machine where precision=auto picked another one
        run.precision = "+".join(precisions)
        run.problems.append("precision changed between launches: " + " -> ".join(precisions))
    elif precisions and run.precision is None:
        run.precision = precisions[0]


def _end_reason(record: dict) -> str:
    if record.get("type") == "failed":
        return f"failed: {record.get('reason', 'unknown')} at epoch {record.get('epoch')}"
    if record.get("reason") == "SIGTERM":
        return "stopped by SIGTERM"
    return "stopped by training.stop_after_s"


def _record_gaps(run: Run, *, stopped) -> None:
    """Missing fields (validation ones only where the run validated), start-up, epochs."""
    missing = {k for rec in run.epochs for k in EPOCH_FIELDS if rec.get(k) is None}
    numbered = [rec["epoch"] for rec in run.epochs if isinstance(rec.get("epoch"), int)]
    planned = run.planned_epochs if run.planned_epochs is not None else max(numbered, default=-1) + 1
    for rec in run.epochs:
        number = rec.get("epoch")
        if not isinstance(number, int) or validates_after(number, epochs=planned, every=run.val_every):
            missing |= {k for k in VAL_FIELDS if rec.get(k) is None}
    missing = sorted(missing)
    if missing:
        run.problems.append("missing " + ", ".join(missing))
    if run.startup_s is None:
        run.problems.append("missing startup_s")
    if not run.complete:
        planned = run.planned_epochs if run.planned_epochs is not None else "?"
        run.problems.insert(0, f"incomplete {len(run.epochs)}/{planned} epochs"
                               + (f", {stopped}" if stopped else ""))


def _cli_values(argv) -> dict:
    """{'section.key': value} of a launch's arguments, parsed as `train` parses them; {} for an
    argument list this version cannot parse (a flag it no longer knows)."""
    try:
        return parse_cli(argv, known=())[1]  # no hint wanted: it would import every module
    except ConfigError:
        return {}


def _train_command(argv) -> str:
    return "ffcv-imagenet train " + shlex.join(str(a) for a in argv)


def describe_machine(env: dict) -> str:
    """'8 × NVIDIA H100 80GB HBM3' or '2-core CPU (AMD EPYC, AVX2)' from a run's env.json (the
    vector extension when recorded: one CPU name covers parts with and without AVX-512)."""
    names = env.get("device_names") or []
    if env.get("device_count") and names:
        return f"{env['device_count']} × {names[0]}"
    cores = env.get("cpu_count")
    about = ", ".join(str(x) for x in (env.get("cpu_model"), env.get("cpu_capability")) if x)
    text = f"{cores}-core CPU" if cores else "CPU"
    return f"{text} ({about})" if about else text


def find_runs(paths) -> list:
    """Every run folder (holding log.jsonl) at or under the given paths, in sorted order."""
    runs = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run folder")
        logs = [path / "log.jsonl"] if (path / "log.jsonl").exists() else sorted(path.rglob("log.jsonl"))
        if not logs:
            raise FileNotFoundError(f"{path}: no log.jsonl in it or below it")
        runs.extend(load_run(log.parent) for log in logs)
    return runs


def _group_key(run: Run):
    # Finished runs of one preset on one kind of hardware, in one precision, are averaged (bf16
    # and fp32 runs of a preset differ in speed); cut-short runs stand alone.
    return (run.preset, run.world_size, run.device, run.precision, run.planned_epochs,
            "complete" if run.complete else str(run.folder))


def _pool_key(run):
    # bf16 and fp32 runs of a preset follow one recipe: finished runs of a preset on the same
    # number of devices of one kind are also pooled across precisions, for top-1 and top-5 only.
    return (run.preset, run.world_size, run.device, run.planned_epochs) if run.complete else None


def _pooled_row(members, n_columns) -> list:
    """The extra row for one preset whose finished runs trained in more than one precision."""
    first = members[0]
    counts = Counter(run.precision or "?" for run in members)
    precisions = " + ".join(f"{p} ×{n}" for p, n in counts.items())
    cells = [first.preset, str(len(members)), _epochs_cell(first.planned_epochs, members),
             _devices(first.world_size, first.device, f"all ({precisions})"),
             _mean_std([r.top1_at_end() for r in members], _pct),
             _mean_std([r.top5_at_end() for r in members], _pct)]
    cells += ["—"] * (n_columns - len(cells) - 1)
    return cells + ["accuracy over every precision; times in the rows per precision"]


def _epochs_cell(planned, members) -> str:
    """The planned number of epochs; without one (an old log), the most epochs a member logged."""
    return str(planned if planned is not None else max(len(r.epochs) for r in members))


def _devices(world, device, precision) -> str:
    text = f"{world if world is not None else '?'} × {device}"
    return f"{text}, {precision}" if precision else text


def _mean_std(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.fmean(values))} ± {fmt(statistics.stdev(values))}"


def _pct(x):
    return f"{100 * x:.2f}%"


def _minutes(s):
    return f"{s / 60:.1f} min"


def _rate(x):
    return f"{x:,.0f}"


def _md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def references(names) -> list:
    """The rows of the named entries of references.json, each with its entry's label, devices
    and source, in the order named."""
    return [{**row, **{k: REFERENCES[name][k] for k in ("label", "devices", "source")}}
            for name in names for row in REFERENCES[name]["rows"]]


def _place_references(rows, order) -> tuple:
    """({group key: reference rows to print after it}, the rows no group matches): a row goes
    after the last group of one of its presets, with its epochs when it states them."""
    after, unmatched = {}, []
    for ref in rows:
        keys = [key for key in order if key[0] in ref["presets"]
                and (ref["epochs"] is None or key[4] == ref["epochs"])]
        if keys:
            after.setdefault(keys[-1], []).append(ref)
        else:
            unmatched.append(ref)
    return after, unmatched


def _reference_row(ref, header: list) -> list:
    """A published result, in the table's columns (by name), marked as such, its source in the notes."""
    def given(key, fmt):
        return fmt(ref[key]) if ref.get(key) is not None else "—"

    cells = {"preset": f"reference: {ref['label']}", "epochs": str(ref["epochs"] or "—"),
             "devices": ref["devices"] or "—", "top-1": given("top_1", _pct), "top-5": given("top_5", _pct),
             "wall-clock": given("wallclock_min", lambda m: f"{m:.1f} min")}
    what = f"{ref['what']}; " if ref.get("what") else ""
    return [cells.get(name, "—") for name in header[:-1]] + [f"published, not run here: {what}{ref['source']}"]


def _group_row(key, members, targets, real: list) -> list:
    preset, world, device, precision, planned, _ = key
    reached = []
    for t in targets:
        times = [r.time_to(t) for r in members]
        hit = [x for x in times if x is not None]
        cell = _mean_std(hit, _minutes) if hit else "not reached"
        if hit and len(hit) < len(times):
            cell += f" ({len(hit)}/{len(times)} runs)"
        reached.append(cell)
    notes = sorted({p for r in members for p in r.problems})
    return [preset, str(len(members)), _epochs_cell(planned, members), _devices(world, device, precision),
            _mean_std([r.top1_at_end() for r in members], _pct),
            _mean_std([r.top5_at_end() for r in members], _pct),
            *[_mean_std([r.real_top1_at_end() for r in members], _pct) for _ in real],
            _mean_std([r.wallclock_s() for r in members], _minutes),
            *reached,
            _mean_std([r.mean_images_per_s() for r in members], _rate),
            "; ".join(notes) if notes else ""]


def make_table(runs, targets=DEFAULT_TARGETS, reference_rows=()) -> str:
    """The Markdown table: one row per group of finished runs, one per cut-short run, and after
    the groups of a preset that trained in several precisions, one row pooling their accuracy;
    `reference_rows` (from `references`) after the runs they match, the others at the end."""
    groups, pools = {}, {}
    for run in runs:
        groups.setdefault(_group_key(run), []).append(run)
        if _pool_key(run) is not None:
            pools.setdefault(_pool_key(run), []).append(run)
    order = list(groups)
    pooled_after = {}  # a pool that spans several groups gets its row after the last of them
    for pool, members in pools.items():
        keys = {_group_key(r) for r in members}
        if len(keys) > 1:
            pooled_after[max(keys, key=order.index)] = pool
    real = _any_real(runs)
    header = ["preset", "runs", "epochs", "devices", "top-1", "top-5", *real, "wall-clock"]
    header += [f"to {_pct(t).replace('.00', '')}" for t in targets]
    header += ["img/s", "notes"]
    rows = [_md_row(header), "|" + "---|" * len(header)]
    references_after, unmatched = _place_references(reference_rows, order)
    for key, members in groups.items():
        rows.append(_md_row(_group_row(key, members, targets, real)))
        if key in pooled_after:
            rows.append(_md_row(_pooled_row(pools[pooled_after[key]], len(header))))
        rows += [_md_row(_reference_row(ref, header)) for ref in references_after.get(key, ())]
    rows += [_md_row(_reference_row(ref, header)) for ref in unmatched]
    return "\n".join(rows) + "\n"


def _any_real(runs) -> list:
    """The ReaL top-1 column's header, when some run measured it (validation.real_labels)."""
    return ["ReaL top-1"] if any(r.real_top1_at_end() is not None for r in runs) else []


def _startups(run) -> str:
    """The first launch's start-up, and the resumed sessions' when there were any."""
    if run.startup_s is None:
        return "—"
    text = f"{run.startup_s:.1f} s"
    if run.restarts:
        resumed = sum(s for _, s in run.restarts)
        text += f" + {resumed:.1f} s ({len(run.restarts)} resume{'s' if len(run.restarts) > 1 else ''})"
    return text


def _command_cell(run) -> str:
    if run.command == "?":
        return "?"
    text = f"`{run.command}`"
    if any(run.resumed_with):  # each resumed launch in order: "with `A`, then `B`"
        added = [f"`{shlex.join(args)}`" if args else "nothing added" for args in run.resumed_with]
        text += f" (resumed with {', then '.join(added)})"
    if run.resumed_without:
        text += f" (resumed without `{shlex.join(run.resumed_without)}`)"
    return text


def make_runs_table(runs) -> str:
    """One row per run: what a reader needs to repeat it and to judge its figures."""
    real = _any_real(runs)
    header = ["run", "preset", "top-1", *real, "start-up", "wall-clock", "img/s", "machine", "date",
              "command"]
    rows = [_md_row(header), "|" + "---|" * len(header)]
    for run in runs:
        top1, wall, rate = run.top1_at_end(), run.wallclock_s(), run.mean_images_per_s()
        rows.append(_md_row([
            run.folder.name + ("" if run.complete else " (incomplete)"), run.preset,
            _pct(top1) if top1 is not None else "—",
            *[_pct(run.real_top1_at_end()) if run.real_top1_at_end() is not None else "—" for _ in real],
            _startups(run),
            _minutes(wall) if wall is not None else "—",
            _rate(rate) if rate is not None else "—",
            f"{run.machine}, {run.precision}" if run.precision else run.machine,
            run.date, _command_cell(run),
        ]))
    return "\n".join(rows) + "\n"


def make_plots(runs, out_dir: Path) -> list:
    """Write the three PNG plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    presets = sorted({r.preset for r in runs})
    colours = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(presets)}
    paths = []

    for x_key, x_label, name in (("time", "wall-clock since launch (min)", "top1_vs_time.png"),
                                 ("epoch", "epoch", "top1_vs_epoch.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        labelled = set()
        for run in runs:
            points = [(r, r.get("top_1")) for r in run.epochs if r.get("top_1") is not None]
            if x_key == "time":
                xs = [((r.get("elapsed_s") or math.nan) + run.startups_before(r.get("epoch"))) / 60
                      for r, _ in points]
            else:
                xs = [r.get("epoch", i) + 1 for i, (r, _) in enumerate(points)]
            ys = [100 * y for _, y in points]
            label = run.preset if run.preset not in labelled else None
            labelled.add(run.preset)
            ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=colours[run.preset], label=label,
                    ls="-" if run.complete else "--", alpha=0.85)
        ax.set_xlabel(x_label)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"top-1 against {x_key} ({len(runs)} run{'s' if len(runs) != 1 else ''}; dashed = cut short)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        paths.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for preset in presets:
        members = [r for r in runs if r.preset == preset and r.complete
                   and r.wallclock_s() is not None and r.top1_at_end() is not None]
        if not members:
            continue
        xs = [r.wallclock_s() / 60 for r in members]
        ys = [100 * r.top1_at_end() for r in members]
        ax.scatter(xs, ys, color=colours[preset], alpha=0.5, s=18)
        ax.scatter([statistics.fmean(xs)], [statistics.fmean(ys)], color=colours[preset], marker="D",
                   s=50, edgecolor="black", label=f"{preset} (n={len(members)})")
    ax.set_xlabel("wall-clock to the end, start-up included (min)")
    ax.set_ylabel("final top-1 (%)")
    ax.set_title("time against accuracy (one dot per run, diamond = mean)")
    ax.grid(alpha=0.3)
    if presets:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "front.png")
    plt.close(fig)
    paths.append(out_dir / "front.png")
    return paths


def update_readme(readme: Path, section: str, text: str) -> None:
    """Replace what stands between the section's start and end markers in `readme`."""
    start, end = (MARKER.format(name=section, edge=e) for e in ("start", "end"))
    content = readme.read_text()
    if start not in content or end not in content or content.index(start) > content.index(end):
        raise ValueError(f"{readme}: markers for section {section!r} not found; add the lines\n{start}\n{end}")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text.rstrip()}\n{end}{tail}")


COMMAND = Command("report", "report", __doc__.split("\n\n")[0].split(": ", 1)[-1], {
    "targets": Option(float, DEFAULT_TARGETS, "top-1 targets for the time-to-accuracy columns, "
                      "fractions or percents (0.7 or 70)", low=0.0, high=100.0, many=True),
    "out": Option(str, "", "folder for the table (report.md) and the plots (default: the first RUN)",
                  path=True),
    "plots": Option(bool, True, "draw the plots (0: the table only)"),
    "readme": Option(str, "", "also write the table into this Markdown file, between "
                     "<!-- report:SECTION start --> and <!-- report:SECTION end -->", path=True),
    "section": Option(str, "results", "marker name for report.readme"),
    "readme_runs": Option(bool, True, "report.readme also gets the table of every run (0: the group "
                          "table only; report.md keeps both)"),
    "reference": Option(str, (), "add these published results (references.json) beside the runs "
                        "of their preset and epochs", choices=tuple(REFERENCES), many=True),
}, positional=Positional("runs", "RUN", "run folders (holding log.jsonl) or folders of them", many=True))


def fractions(targets) -> tuple:
    """Targets given as fractions or percents (70 = 0.7), as fractions."""
    return tuple(t / 100 if t > 1 else t for t in targets)


def main(argv=None) -> int:
    try:
        args = COMMAND.parse(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        return COMMAND.refuse(e)
    try:
        runs = find_runs(args.runs)
    except FileNotFoundError as e:
        print(f"ffcv-imagenet report: {e}", file=sys.stderr)
        return 2
    groups = make_table(runs, fractions(args.targets), references(args.reference))
    table = groups + "\n" + make_runs_table(runs)
    out_dir = Path(args.out or args.runs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(table)
    print(table)
    if args.plots:
        for path in make_plots(runs, out_dir):
            print(f"plot: {path}")
    if args.readme:
        try:
            update_readme(Path(args.readme), args.section, table if args.readme_runs else groups)
        except (ValueError, FileNotFoundError) as e:
            print(f"ffcv-imagenet report: {e}", file=sys.stderr)
            return 2
        print(f"table written into {args.readme} (section {args.section!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
