"""
Figures from training runs: every stage's metrics.jsonl (and SFT's eval_*.jsonl) turned into PNGs.

    python plot.py out/pretrain/phase1 out/pretrain/phase2 out/pretrain/phase3 --out out/plots
    python plot.py out/sft/instruct --out out/plots/sft          # held-out accuracy of the base and the SFT model
    python plot.py out/rl/instruct/metrics.jsonl --out out/plots/rl

A run is a stage's directory or its metrics.jsonl. Runs share one global-step axis (pre-training's phases count
steps globally), and where a later run starts a dashed line marks the boundary.
  training.png   one row per quantity the runs logged: train CE (raw and a moving average) and val loss; RL's
                 reward and per-family pass rate of the rollouts; the learning rate; the expert imbalance
  accuracy.png   held-out greedy accuracy (and pass@1 where sampled) per family over steps, ± one standard error:
                 rlvr's evaluations at its start and end (metrics.jsonl), or SFT's base (eval_base.jsonl, at step
                 0) and final model (eval_{variant}.jsonl, at the run's last step)

Contents: read_run, training_figure, accuracy_figure (each returns a matplotlib Figure, or None when no run logged
what it shows), main. matplotlib is optional, imported only here (Agg, no display), never by a training stage.
"""
import argparse
import glob
import json
import os
from dataclasses import dataclass, field

EVAL_METRICS = ("greedy_acc", "pass@1")  # plotted with their standard errors, `<metric>_se`


@dataclass
class Run:
    name: str
    records: list                               # metrics.jsonl, in order
    evals: dict = field(default_factory=dict)   # step -> {family: eval.family_metrics}

    @property
    def start(self):
        """The global step the run starts from: a training step's record is logged after it (step = steps done),
        an evaluation's at the step it measures."""
        return min((r["step"] - ("lr" in r) for r in self.records), default=0)

    def series(self, key):
        """(steps, values) of the records that have `key` (a "pass_rate/<family>" key reads the nested dict)."""
        top, _, sub = key.partition("/")
        rows = [(r["step"], r[top][sub] if sub else r[top]) for r in self.records
                if r.get(top) is not None and (not sub or sub in r[top])]
        return [s for s, _ in rows], [v for _, v in rows]


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_run(path):
    """A Run from a stage directory or its metrics.jsonl; named after the directory (phase1, instruct, ...)."""
    metrics = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(metrics):
        raise SystemExit(f"plot.py: {metrics} does not exist: give a stage's output directory or its metrics.jsonl")
    run_dir = os.path.dirname(os.path.abspath(metrics))
    try:
        records = _read_jsonl(metrics)
    except json.JSONDecodeError as e:
        raise SystemExit(f"plot.py: {metrics}: line {e.lineno} is not JSON ({e.msg})") from None
    run = Run(os.path.basename(run_dir), records)
    run.evals = {r["step"]: r["eval"] for r in records if isinstance(r.get("eval"), dict)}
    if not run.evals:  # SFT: its base before training and the final model, written by eval.evaluate
        last = max((r["step"] for r in records), default=0)
        for p in sorted(glob.glob(os.path.join(run_dir, "eval_*.jsonl"))):
            if p.endswith("_samples.jsonl"):
                continue
            step = 0 if os.path.basename(p) == "eval_base.jsonl" else last
            run.evals[step] = {r["family"]: r for r in _read_jsonl(p)}
    return run


def _figure(rows, title):
    """A Figure of `rows` panels stacked on one step axis; matplotlib imported here, drawn with Agg (no display)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(8, 1.2 + 2.2 * rows), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(title)
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _boundaries(runs, axes):
    """A dashed line where each run after the earliest begins (pre-training's phase boundaries), named on top."""
    starts = sorted((run.start, run.name) for run in runs if run.records)
    for step, name in starts[1:]:
        for ax in axes:
            ax.axvline(step, color="0.5", linestyle="--", linewidth=0.8, gid="boundary")
        axes[0].annotate(name, (step, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                         textcoords="offset points", va="top", fontsize=8, color="0.35")


def _moving_average(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def training_figure(runs):
    """Loss / reward, learning rate and expert imbalance of the runs over steps (None when nothing of it was logged)."""
    has = lambda key: any(run.series(key)[0] for run in runs)  # noqa: E731
    families = sorted({f for run in runs for r in run.records for f in r.get("pass_rate") or {}})
    panels = [p for p, present in (("loss", has("ce") or has("val_loss")), ("reward", has("reward")),
                                   ("lr", has("lr")), ("imbalance", has("imbalance"))) if present]
    if not panels:
        return None
    fig, axes = _figure(len(panels), " + ".join(run.name for run in runs))
    ax_of = dict(zip(panels, axes))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        if "loss" in ax_of:
            steps, ce = run.series("ce")
            if steps:
                ax_of["loss"].plot(steps, ce, color=color, alpha=0.3, linewidth=0.8)
                ax_of["loss"].plot(steps, _moving_average(ce, max(1, len(ce) // 25)), color=color,
                                   label=f"{run.name} train CE")
            steps, val = run.series("val_loss")
            if steps:
                ax_of["loss"].plot(steps, val, "o--", color=color, markersize=4, label=f"{run.name} val loss")
        if "reward" in ax_of:
            ax = ax_of["reward"]
            ax.plot(*run.series("reward"), color="k", label=f"{run.name} reward")
            for i, f in enumerate(families):
                ax.plot(*run.series(f"pass_rate/{f}"), color=f"C{i % 10}", alpha=0.7, linewidth=0.8,
                        label=f"{f} pass rate")
        if "lr" in ax_of:
            ax_of["lr"].plot(*run.series("lr"), color=color)
        if "imbalance" in ax_of:
            ax_of["imbalance"].plot(*run.series("imbalance"), color=color)
    for name, ylabel in (("loss", "loss (nats/token)"), ("reward", "reward / pass rate"), ("lr", "learning rate"),
                         ("imbalance", "max / mean expert load")):
        if name in ax_of:
            ax_of[name].set_ylabel(ylabel)
    for name in ("loss", "reward"):
        if name in ax_of:
            ax_of[name].legend(fontsize=7, ncol=2)
    _boundaries(runs, axes)
    return fig


def accuracy_figure(runs):
    """Held-out accuracy per family over steps with ± 1 standard error bars (None when no run was evaluated)."""
    metrics = [m for m in EVAL_METRICS if any(m in fm for run in runs for ev in run.evals.values()
                                               for fm in ev.values())]
    if not metrics:
        return None
    fig, axes = _figure(len(metrics), "held-out accuracy: " + " + ".join(run.name for run in runs if run.evals))
    families = sorted({f for run in runs for ev in run.evals.values() for f in ev})
    for ax, metric in zip(axes, metrics):
        for run in runs:
            for i, f in enumerate(families):
                points = [(s, ev[f][metric], ev[f].get(f"{metric}_se", 0.0)) for s, ev in sorted(run.evals.items())
                          if f in ev and metric in ev[f]]
                if points:
                    steps, ys, ses = zip(*points)
                    ax.errorbar(steps, ys, yerr=ses, fmt="o-", color=f"C{i % 10}", capsize=3, markersize=4,
                                label=f if len(runs) == 1 else f"{run.name} {f}")
        ax.set_ylabel(f"{metric} (± SE)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, ncol=2)
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", help="stage output directories or metrics.jsonl files")
    ap.add_argument("--out", default="out/plots", help="directory for the PNGs")
    args = ap.parse_args(argv)
    runs = sorted((read_run(p) for p in args.runs), key=lambda run: run.start)
    os.makedirs(args.out, exist_ok=True)
    written = {}
    for name, fig in (("training", training_figure(runs)), ("accuracy", accuracy_figure(runs))):
        if fig is not None:
            written[name] = os.path.join(args.out, f"{name}.png")
            fig.savefig(written[name], dpi=100)
            print(f"wrote {written[name]}")
    if not written:
        raise SystemExit(f"plot.py: nothing to plot in {', '.join(args.runs)} (no losses, rewards or evaluations)")
    return written


if __name__ == "__main__":
    main()
