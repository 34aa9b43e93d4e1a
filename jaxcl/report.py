"""Results of a run: ``results.json``, plots and printed tables."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np


def save_results(workdir: str | Path, results: dict, name: str = "results.json") -> Path:
    path = Path(workdir) / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(path)
    return path


def load_results(workdir: str | Path) -> dict:
    """``results.json`` of a run, or ``summary.json`` of a multi-seed run."""
    path = Path(workdir) / "results.json"
    if not path.exists() and (Path(workdir) / "summary.json").exists():
        path = Path(workdir) / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{workdir}: no results.json (has the run finished?)")
    return json.loads(path.read_text())


def plot(workdir: str | Path, R: Sequence[Sequence[float]], title: str = "", band=None) -> list[Path]:
    """``accuracy_matrix.png`` (heatmap of R) and ``task_accuracy.png`` (each task's
    accuracy as tasks are learned); ``band``: the matrices of several seeds (R their
    mean), drawn as each task's min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = np.asarray(R, dtype=float)
    rows, tasks = R.shape
    out = []
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * tasks, 0.8 + 0.5 * rows))
    im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(rows):
        for j in range(tasks):
            ax.text(j, i, f"{100 * R[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if R[i, j] < 0.6 else "black")
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(tasks))
    ax.set_yticks(range(rows))
    ax.set_title(title or "accuracy matrix", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    out.append(Path(workdir) / "accuracy_matrix.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for j in range(tasks):
        line, = ax.plot(range(j, rows), R[j:, j], marker="o", ms=3, label=f"task {j}")
        if band is not None:
            B = np.asarray(band, dtype=float)
            ax.fill_between(range(j, rows), B[:, j:, j].min(0), B[:, j:, j].max(0), color=line.get_color(), alpha=0.2)
    ax.plot(range(rows), [R[i, : i + 1].mean() for i in range(rows)], "k--", lw=2, label="mean (seen)")
    ax.set_xlabel("after training task")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "accuracy of each task", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out.append(Path(workdir) / "task_accuracy.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out


def matrix_table(R: Sequence[Sequence[float]]) -> str:
    R = np.asarray(R, dtype=float)
    head = "after \\ on " + " ".join(f"{j:>6d}" for j in range(R.shape[1]))
    lines = [head]
    for i, row in enumerate(R):
        lines.append(f"task {i:<6d}" + " ".join(f"{100 * v:6.1f}" for v in row))
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    """A run's results, or a multi-seed summary (mean +- std over seeds)."""
    r = results
    if "settings" in r:
        return sweep_table(r)
    if "seeds" in r:
        return seeds_table(r)
    p = r.get("params", {})
    lines = [
        f"{r['benchmark']}  method={r['method']}  scenario={r['scenario']}  tasks={r['num_tasks']}  model={r.get('model', '')}",
        "",
        "accuracy matrix (%, row i: after training task i; column j: task j)",
        matrix_table(r["accuracy_matrix"]),
        "",
        f"ACC {100 * r['acc']:.2f}%   BWT {100 * r['bwt']:+.2f}   FWT {100 * r['fwt']:+.2f}   "
        f"forgetting {100 * r['forgetting']:.2f}",
        f"params: backbone {p.get('backbone', 0):,}  head per task {p.get('head_per_task', 0):,}"
        + "".join(f"  {k} per task {v:,}" for k, v in p.get("extra_per_task", {}).items())
        + "".join(f"  {k} {v:,}" for k, v in p.get("extra_shared", {}).items()),
        f"wall {r['wall_s']:.1f} s   train {r['train_s']:.1f} s   {r['steps_per_s']:.1f} steps/s",
    ]
    return "\n".join(lines)


def seeds_table(s: dict) -> str:
    lines = [
        f"{s['benchmark']}  method={s['method']}  scenario={s['scenario']}  tasks={s['num_tasks']}  "
        f"model={s.get('model', '')}  seeds={s['seeds']} (one program)",
        "",
        "mean accuracy matrix over seeds (%)",
        matrix_table(s["accuracy_matrix"]),
        "",
        f"{'seed':>6} {'ACC%':>7} {'BWT':>7} {'FWT':>7} {'forget':>7}",
    ]
    for seed, v in s["per_seed"].items():
        lines.append(f"{seed:>6} {100 * v['acc']:7.2f} {100 * v['bwt']:+7.2f} {100 * v['fwt']:+7.2f} "
                     f"{100 * v['forgetting']:7.2f}")
    lines.append(f"{'mean':>6} {100 * s['acc']:7.2f} {100 * s['bwt']:+7.2f} {100 * s['fwt']:+7.2f} "
                 f"{100 * s['forgetting']:7.2f}")
    lines.append(f"{'std':>6} {100 * s['acc_std']:7.2f} {100 * s['bwt_std']:7.2f} {100 * s['fwt_std']:7.2f} "
                 f"{100 * s['forgetting_std']:7.2f}")
    lines.append(f"wall {s['wall_s']:.1f} s   train {s['train_s']:.1f} s")
    return "\n".join(lines)


def sweep_table(s: dict) -> str:
    """One row per setting of a sweep: mean (+- std over seeds) of ACC, BWT, FWT, forgetting."""
    lines = [f"{s['benchmark']}  method={s['method']}  scenario={s['scenario']}  sweep={s['sweep']}  "
             f"seeds={s['seeds']}  ({s['runs_in_program']} runs in one program)", ""]
    width = max(len("setting"), *(len(_setting(x["setting"])) for x in s["settings"]))
    lines.append(f"{'setting':<{width}} {'ACC%':>14} {'BWT':>14} {'FWT':>14} {'forget':>14}")
    for x in s["settings"]:
        cells = [f"{100 * x[k]:.2f} +- {100 * x[k + '_std']:.2f}" for k in ("acc", "bwt", "fwt", "forgetting")]
        lines.append(f"{_setting(x['setting']):<{width}} " + " ".join(f"{c:>14}" for c in cells))
    lines.append(f"wall {s['wall_s']:.1f} s   train {s['train_s']:.1f} s")
    return "\n".join(lines)


def _setting(setting: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in setting.items())


def compare_table(runs: Sequence[tuple[str, dict]]) -> str:
    """One row per run: where, benchmark, method, scenario, ACC, BWT, FWT, forgetting, time."""
    cols = ("run", "benchmark", "method", "scenario", "tasks", "ACC%", "BWT", "FWT", "forget", "wall_s")
    flat = []
    for where, r in runs:
        if "settings" in r:  # a sweep: one row per setting (mean +- std over its seeds)
            flat += [(f"{where}/{_setting(x['setting'])}", {**x, "num_tasks": r["num_tasks"]}) for x in r["settings"]]
        else:
            flat.append((where, r))
    rows = []
    for where, r in flat:
        pm = (lambda k, f: f"{100 * r[k]:{f}} +- {100 * r[k + '_std']:.2f}") if "seeds" in r else \
            (lambda k, f: f"{100 * r[k]:{f}}")
        rows.append((str(where), r["benchmark"], r["method"], r["scenario"], str(r["num_tasks"]),
                     pm("acc", ".2f"), pm("bwt", "+.2f"), pm("fwt", "+.2f"), pm("forgetting", ".2f"),
                     f"{r['wall_s']:.0f}"))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)] if rows else [len(c) for c in cols]
    fmt = "  ".join(f"{{:<{w}}}" if i < 5 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*cols)] + [fmt.format(*row) for row in rows])
