"""Plotting for `badger demo`: one function per paper figure, numpy arrays in, a PNG out.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``),
never through pyplot, so nothing here touches a global backend or opens a window. Each
figure carries a title (what is plotted, with our setting) and a caption (what the
paper reports for the figure it reproduces).

Errors are the guessing game's 3 x MSE: 1.0 is chance (guess all zeros).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

# Colours after the paper's Fig. 6: orange outputs, green inputs, red targets, blue messages.
C_OUT, C_IN, C_TGT, C_MSG = "#ff7f0e", "#2ca02c", "#d62728", "#1f77b4"
C_AGENT, C_OPT, C_MEAN, C_CHANCE, C_OTHER = "#1f77b4", "#d62728", "#555555", "#000000", "#9467bd"
DPI = 110


def subplots(nrows: int = 1, ncols: int = 1, *, figsize, dpi: float | None = None, **kw):
    """(figure, axes): a grid of axes on the Agg canvas, as ``pyplot.subplots`` gives, but with no
    pyplot (no global backend, no window, nothing to close). Every plot of the project uses it."""
    fig = _figure(*figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **kw)


def save_png(fig: Figure, path: str | Path, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path`` as PNG (folders made; ``dpi`` None: the figure's own)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi or "figure", format="png")
    return path


def _figure(w: float, h: float, dpi: float | None = None) -> Figure:
    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _caption(fig: Figure, text: str, width: int = 150, y: float = 0.005):
    fig.text(0.5, y, "\n".join(textwrap.wrap(text, width)), ha="center", va="bottom", fontsize=8.5,
             style="italic", color="#333333")


def _save(fig: Figure, path: str | Path, dpi: int | None) -> Path:
    """The demo figures' PNG: ``save_png`` at the demo's resolution unless given."""
    return save_png(fig, path, dpi or DPI)


def label_axes(ax, *, xlabel: str, ylabel: str | None = None, title: str | None = None, legend: str | None = None,
               legend_size: float = 8.0, grid: bool = True):
    """Axis labels, title, grid and legend of one panel."""
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if grid:
        ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend_size, loc=legend, framealpha=0.92)


def _band(ax, x, per_episode, color, lo=25, hi=75):
    """Shade the inter-quartile range of per-episode errors [T, E] (if given)."""
    if per_episode is None or per_episode.shape[1] < 4:
        return
    q_lo, q_hi = np.percentile(per_episode, [lo, hi], axis=1)
    ax.fill_between(x, np.maximum(q_lo, 1e-8), q_hi, color=color, alpha=0.15, linewidth=0)


# --- Fig. 6 -------------------------------------------------------------------------------


def fig6_rollouts(path, *, outputs, targets, inputs, messages, caption: str, title: str, dpi=None) -> Path:
    """Ten rollouts: outputs (orange), inputs (green), targets (red) and messages (blue, dashed).

    outputs, inputs: [T, R, d]; targets: [R, d]; messages: [T, R, N, Dm] (each expert's
    message, projected on the first principal component of all messages shown).
    """
    T, R, d = outputs.shape
    N = messages.shape[2]
    flat = messages.reshape(-1, messages.shape[-1]).astype(np.float64)
    mu = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat - mu, full_matrices=False)
    proj = (messages - mu) @ vt[0]  # [T, R, N]
    cols = min(5, R)
    rows = int(np.ceil(R / cols))
    fig = _figure(3.0 * cols, 3.6 * rows + 1.2)
    outer = fig.add_gridspec(rows, 1, hspace=0.22, top=0.86, bottom=0.1 + 0.02 * rows, left=0.05, right=0.99)
    x = np.arange(T)
    styles = ["-", "--", ":", "-.", (0, (3, 1, 1, 1))]
    span = float(np.max(np.abs(outputs))) * 1.08 + 0.1
    mspan = float(np.max(np.abs(proj))) * 1.1 + 1e-6
    for r in range(R):
        i, j = divmod(r, cols)
        if j == 0:
            inner = outer[i].subgridspec(2, cols, height_ratios=[3, 1.2], hspace=0.08, wspace=0.28)
        ax = fig.add_subplot(inner[0, j])
        axm = fig.add_subplot(inner[1, j], sharex=ax)
        for k in range(d):
            ls = styles[k % len(styles)]
            ax.plot(x, inputs[:, r, k], color=C_IN, lw=0.9, alpha=0.7, ls=ls)
            ax.plot(x, outputs[:, r, k], color=C_OUT, lw=1.6, ls=ls, marker=".", ms=3)
            ax.axhline(targets[r, k], color=C_TGT, lw=1.0, ls=ls)
        ax.set_ylim(-span, span)
        ax.set_title(f"rollout {r + 1}", fontsize=9)
        ax.tick_params(labelbottom=False, labelsize=7)
        ax.axvline(T - 1, color="#bbbbbb", lw=0.8, zorder=0)
        for e in range(N):
            axm.plot(x, proj[:, r, e], color=C_MSG, ls="--", lw=1.0, alpha=1.0 - 0.6 * e / max(1, N - 1))
        axm.set_ylim(-mspan, mspan)
        axm.tick_params(labelsize=7)
        if i == rows - 1:
            axm.set_xlabel("inner step", fontsize=8)
        if j == 0:
            ax.set_ylabel("value", fontsize=8)
            axm.set_ylabel("message", fontsize=8)
    handles = [Line2D([], [], color=C_OUT, lw=1.8, marker=".", label="agent output"),
               Line2D([], [], color=C_TGT, lw=1.2, label="target"),
               Line2D([], [], color=C_IN, lw=1.0, label="input: feedback (output - target) to expert 0"),
               Line2D([], [], color=C_MSG, lw=1.0, ls="--", label=f"message of each of the {N} experts (1st PC)")]
    handles += [Line2D([], [], color="#777777", lw=1.0, ls=styles[k % len(styles)], label=f"dim {k}")
                for k in range(d)]
    fig.legend(handles=handles, loc="upper center", ncol=4 + min(d, 4), fontsize=8.5, bbox_to_anchor=(0.5, 0.935),
               frameon=False)
    fig.suptitle(title, fontsize=12, y=0.985)
    _caption(fig, caption, width=190)
    return _save(fig, path, dpi)


# --- Fig. 7 -------------------------------------------------------------------------------


def fig7_dimensions(path, *, dims, agent, agent_sem, mean_solution, optimizer, optimizer_name: str,
                    trained: tuple[int, int], caption: str, title: str, dpi=None) -> Path:
    """Final-step error vs the number of dimensions d, with chance and mean-solution lines."""
    dims = np.asarray(dims)
    fig = _figure(8.0, 5.6)
    ax = fig.add_axes([0.1, 0.24, 0.86, 0.66])
    ax.axhline(1.0, color=C_CHANCE, lw=1.8, label="chance (guess 0): 1.0 in expectation")
    ax.plot(dims, mean_solution, color=C_MEAN, lw=1.6, ls="--", label="mean solution (all outputs = target mean)")
    if optimizer is not None:
        ax.plot(dims, optimizer, color=C_OPT, lw=1.2, ls=":", marker="s", ms=4, label=f"tuned {optimizer_name}")
    ax.errorbar(dims, agent, yerr=agent_sem, color=C_AGENT, lw=2.0, marker="o", ms=6, capsize=3,
                label="Badger agent (ours)")
    lo, hi = trained
    top = max(1.0, np.max(agent), np.max(mean_solution)) * 1.32
    ax.set_ylim(0, top)
    if lo < hi:
        ax.axvspan(lo, hi, color="#2ca02c", alpha=0.1, label=f"trained d in [{lo}, {hi}]")
    else:
        ax.axvline(lo, color="#2ca02c", lw=6, alpha=0.3, label=f"trained d = {lo}")
    ax.set_xticks(dims)
    ax.set_xlabel("number of dimensions d")
    ax.set_ylabel("error at the last inner step (3 x MSE)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper left", ncol=2)
    _caption(fig, caption, width=110)
    return _save(fig, path, dpi)


# --- Fig. 8 -------------------------------------------------------------------------------


def fig8_communication(path, *, route, route_mean, push_mean, caption: str, title: str, dpi=None) -> Path:
    """Routing attention among the experts over the inner loop.

    route: [T, N, N] weights of one episode (receiver x sender); route_mean: [T, N, N] the
    mean over episodes; push_mean: [T, d, N] mean output <- expert attention.
    """
    T, N, _ = route.shape
    d = push_mean.shape[1]
    cols = min(T, 10)
    rows = int(np.ceil(T / cols))
    fig = _figure(1.25 * cols + 2.2, 1.45 * rows + 5.2)
    gs = fig.add_gridspec(rows + 2, cols + 1, height_ratios=[1] * rows + [1.25, 0.85], width_ratios=[1] * cols + [0.12],
                          hspace=0.55, wspace=0.2, top=0.9, bottom=0.16, left=0.09, right=0.93)
    im = None
    for t in range(T):
        i, j = divmod(t, cols)
        ax = fig.add_subplot(gs[i, j])
        im = ax.imshow(route[t], vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"step {t}", fontsize=8)
        ax.set_xticks(range(N))
        ax.set_yticks(range(N))
        ax.tick_params(labelsize=6, length=0)
        if j == 0:
            ax.set_ylabel("receiver", fontsize=7)
        if i == rows - 1:
            ax.set_xlabel("sender", fontsize=7)
    cax = fig.add_subplot(gs[:rows + 1, cols])
    fig.colorbar(im, cax=cax).set_label("routing attention weight", fontsize=8)

    # Every receiver <- sender pair over the steps (mean over episodes), and the push weights.
    ax = fig.add_subplot(gs[rows, :cols])
    pairs = route_mean.reshape(T, N * N).T
    ax.imshow(pairs, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(N * N))
    ax.set_yticklabels([f"{r}<-{s}" for r in range(N) for s in range(N)], fontsize=6 if N <= 4 else 4)
    ax.set_ylabel("receiver<-sender", fontsize=8)
    ax.set_title("mean over episodes: routing weight of each pair per step", fontsize=9)
    ax.tick_params(labelbottom=False, labelsize=7)
    ax2 = fig.add_subplot(gs[rows + 1, :cols], sharex=ax)
    im2 = ax2.imshow(push_mean.reshape(T, d * N).T, vmin=0, vmax=1, cmap="magma", aspect="auto",
                     interpolation="nearest")
    cb2 = fig.colorbar(im2, cax=fig.add_subplot(gs[rows + 1, cols]))
    cb2.set_label("push weight", fontsize=8)
    cb2.ax.tick_params(labelsize=7)
    ax2.set_yticks(range(d * N))
    ax2.set_yticklabels([f"out {k}<-{e}" for k in range(d) for e in range(N)], fontsize=6 if d * N <= 12 else 4)
    ax2.set_title("mean over episodes: which expert drives each output (membrane push weights)", fontsize=9)
    ax2.set_xlabel("inner step")
    ax2.set_xticks(range(T))
    ax2.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=12, y=0.975)
    fig.text(0.5, 0.925, "one episode, each step: who listens to whom (rows: receiving expert, columns: sender)",
             ha="center", fontsize=9)
    _caption(fig, caption, width=150)
    return _save(fig, path, dpi)


# --- Fig. 9 -------------------------------------------------------------------------------


def fig9_convergence(path, *, agent, agent_episodes, optimizer, optimizer_label: str, mean_solution: float,
                     chance: float, caption: str, title: str, other=None, other_label: str = "", dpi=None) -> Path:
    """Error by inner step, log scale: the agent vs the tuned optimizer (and baselines)."""
    T = len(agent)
    x = np.arange(T)
    fig = _figure(8.0, 5.6)
    ax = fig.add_axes([0.1, 0.24, 0.86, 0.66])
    _band(ax, x, agent_episodes, C_AGENT)
    ax.plot(x, agent, color=C_AGENT, lw=2.2, marker="o", ms=4, label="Badger agent (ours), IQR shaded")
    ax.plot(x, optimizer, color=C_OPT, lw=1.6, marker="s", ms=3.5, label=optimizer_label)
    if other is not None:
        ax.plot(x, other, color=C_OTHER, lw=1.2, ls="-.", alpha=0.8, label=other_label)
    ax.axhline(chance, color=C_CHANCE, lw=1.4, label="chance (guess 0)")
    ax.axhline(mean_solution, color=C_MEAN, lw=1.4, ls="--", label="mean solution")
    ax.set_yscale("log")
    ax.set_xlabel("inner step t (the guess made after t feedbacks)")
    ax.set_ylabel("error (3 x MSE), log scale")
    ax.set_xticks(x if T <= 25 else np.linspace(0, T - 1, 11).astype(int))
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8.5, loc="upper right", framealpha=0.92)
    _caption(fig, caption, width=110)
    return _save(fig, path, dpi)


# --- growing -----------------------------------------------------------------------------


def growing(path, *, experts, curves: dict, chance: dict, mean_solution: dict, trained: tuple[int, int],
            hot: dict, add_step: int, hot_note: str, caption: str, title: str, dpi=None) -> Path:
    """Left: final error vs the number of experts N (log x). Right: error by step when experts
    are hot-added mid-episode.

    curves: {label: (final [len N], sem [len N])}; chance / mean_solution: {label: float};
    hot: {label: error by step [T]}.
    """
    fig = _figure(13.0, 5.6)
    ax = fig.add_axes([0.06, 0.25, 0.41, 0.63])
    colors = [C_AGENT, C_OTHER, "#17becf", "#8c564b"]
    for (label, (final, sem)), c in zip(curves.items(), colors):
        ax.errorbar(experts, final, yerr=sem, color=c, lw=2, marker="o", capsize=3, label=f"agent, {label}")
        ax.axhline(mean_solution[label], color=c, lw=1.1, ls="--", alpha=0.8, label=f"mean solution, {label}")
    if chance:
        ax.axhline(float(np.mean(list(chance.values()))), color=C_CHANCE, lw=1.4, label="chance")
    lo, hi = trained
    if lo < hi:
        ax.axvspan(lo, hi, color="#2ca02c", alpha=0.1, label=f"trained N in [{lo}, {hi}]")
    else:
        ax.axvline(lo, color="#2ca02c", lw=6, alpha=0.3, label=f"trained N = {lo}")
    ax.set_xscale("log")
    ax.set_xticks(experts)
    ax.set_xticklabels([str(n) for n in experts])
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("number of experts N (same policy, no retraining)")
    ax.set_ylabel("error at the last inner step (3 x MSE), log scale")
    ax.set_title("growing: more experts than ever seen in training", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="center right")

    ax2 = fig.add_axes([0.56, 0.25, 0.41, 0.63])
    styles = [("-", "o"), ("--", "^"), (":", "v"), ("-.", "s")]
    for (label, curve), (ls, mk), c in zip(hot.items(), styles, [C_AGENT, C_OPT, "#2ca02c", C_OTHER]):
        ax2.plot(np.arange(len(curve)), curve, ls=ls, marker=mk, ms=3.5, lw=1.6, color=c, label=label)
    ax2.axvline(add_step - 0.5, color="#888888", lw=1.2)
    ax2.text(add_step - 0.4, 0.02, " experts added", transform=ax2.get_xaxis_transform(), va="bottom",
             fontsize=8.5, color="#555555")
    ax2.set_yscale("log")
    ax2.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax2.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("inner step")
    ax2.set_ylabel("error (3 x MSE), log scale")
    ax2.set_title(hot_note, fontsize=10)
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=12, y=0.975)
    _caption(fig, caption, width=190)
    return _save(fig, path, dpi)


# --- few-shot classification ------------------------------------------------------------------

C_BASELINES = {"nearest_class_mean": "#d62728", "one_nearest_neighbour": "#2ca02c",
               "online_logistic_regression": "#9467bd", "chance": C_CHANCE}


def fewshot_learning(path, *, curves: dict, agent_label: str, scores: np.ndarray, labels: np.ndarray,
                     caption: str, title: str, smooth: int = 1, xlabel: str = "examples seen (labels given so far)",
                     dpi=None) -> Path:
    """Left: accuracy of the prediction made before each label is given, by examples seen, the agent
    (``curves[agent_label]``) against the baselines on the same episodes. Right: one episode step by
    step: the agent's score for each class (rows) at each step, the true label marked (white
    dot: the agent's argmax was right, black x: wrong).

    curves: {name: accuracy by step [T]}; scores: [T, C]; labels: [T]."""
    fig = _figure(13.0, 5.6)
    ax = fig.add_axes([0.06, 0.25, 0.45, 0.63])
    for name, acc in curves.items():
        acc = np.asarray(acc, np.float64)
        if smooth > 1 and len(acc) > smooth:
            k = np.ones(smooth) / smooth
            acc = np.concatenate([acc[: smooth - 1], np.convolve(acc, k, mode="valid")])
        x = np.arange(len(acc))
        if name == agent_label:
            ax.plot(x, acc, color=C_AGENT, lw=2.4, label=name, zorder=5)
        elif name == "chance":
            ax.plot(x, acc, color=C_CHANCE, lw=1.2, ls=":", label="chance")
        else:
            ax.plot(x, acc, color=C_BASELINES.get(name, C_OTHER), lw=1.5, label=name.replace("_", " "))
    ax.set_ylim(0, 1.02)
    label_axes(ax, xlabel=xlabel, ylabel="accuracy of the prediction before the label",
               title="online accuracy, mean over episodes", legend="lower right", legend_size=8.5)

    ax2 = fig.add_axes([0.58, 0.25, 0.38, 0.63])
    T, C = scores.shape
    z = scores - scores.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    ax2.imshow(prob.T, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest",
               extent=(-0.5, T - 0.5, C - 0.5, -0.5))
    right = scores.argmax(axis=1) == labels
    t = np.arange(T)
    ax2.scatter(t[right], labels[right], s=22, c="white", edgecolors="#1f77b4", zorder=3, label="true label, right")
    ax2.scatter(t[~right], labels[~right], s=26, c="black", marker="x", zorder=3, label="true label, wrong")
    ax2.set_yticks(range(C))
    label_axes(ax2, xlabel="inner step (one example each)", ylabel="class (episode label)", grid=False,
               title="one episode from scratch: softmax of the agent's scores", legend="upper right")
    fig.suptitle(title, fontsize=12, y=0.975)
    _caption(fig, caption, width=190)
    return _save(fig, path, dpi)
