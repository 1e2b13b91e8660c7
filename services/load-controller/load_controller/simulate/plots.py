"""Plots of a simulation run with matplotlib (PNG and SVG): currents per node against the fuse, cars."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from load_controller.simulate.engine import Result
from load_controller.solver import PHASE_NAMES

PHASE_COLORS = ("#8c564b", "#222222", "#7f7f7f")  # L1 brown, L2 black, L3 grey (the German wire colours)


def _mpl() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    return plt, mdates


def _times(res: Result) -> list[datetime]:
    return [(res.start + timedelta(seconds=k * res.dt)).astimezone(res.tz) for k in res.records.k]


def _spans(res: Result, pick: Any) -> list[tuple[datetime, datetime]]:
    """Time spans in which ``pick(record index)`` holds."""
    rec = res.records
    ts = _times(res)
    end = (res.start + timedelta(seconds=res.n_steps * res.dt)).astimezone(res.tz)
    out: list[tuple[datetime, datetime]] = []
    begin = None
    for i in range(len(rec.k)):
        on = pick(i)
        if on and begin is None:
            begin = ts[i]
        elif not on and begin is not None:
            out.append((begin, ts[i]))
            begin = None
    if begin is not None:
        out.append((begin, end))
    return out


def _axis_time(ax: Any, res: Result, mdates: Any) -> None:
    days = res.n_steps * res.dt / 86400
    fmt = "%H:%M" if days <= 1.01 else "%a %H:%M"
    ax.xaxis.set_major_formatter(mdates.DateFormatter(fmt, tz=res.tz))
    ax.set_xlim(res.start.astimezone(res.tz), (res.start + timedelta(seconds=res.n_steps * res.dt)).astimezone(res.tz))
    ax.grid(True, alpha=0.3)


def _shade(ax: Any, res: Result, first: bool) -> None:
    curt = _spans(res, lambda i: bool(res.records.curtail[i][0]))
    floor = _spans(res, lambda i: res.records.curtail[i][2])
    for n, (a, b) in enumerate(curt):
        ax.axvspan(a, b, color="#ff7f0e", alpha=0.12, lw=0, label="operator limit" if first and n == 0 else None)
    for n, (a, b) in enumerate(floor):
        ax.axvspan(a, b, color="#d62728", alpha=0.12, lw=0, label="at the §14a floor" if first and n == 0 else None)


def plot_nodes(res: Result, path: Path, title: str = "") -> list[Path]:
    """Per node of the circuit tree: the current per phase over time against its limit, curtailments shaded,
    violations marked."""
    plt, mdates = _mpl()
    rec = res.records
    topo = res.topo
    nodes = [nd for nd in topo.nodes if any(x < math.inf for x in nd.limits) or nd.index == 0]
    ts = _times(res)
    end = (res.start + timedelta(seconds=res.n_steps * res.dt)).astimezone(res.tz)
    xs = [*ts, end]
    fig, axes = plt.subplots(len(nodes), 1, figsize=(11, 2.6 * len(nodes) + 0.6), sharex=True, squeeze=False)
    for row, nd in enumerate(nodes):
        ax = axes[row][0]
        _shade(ax, res, row == 0)
        top = 0.0
        for j in range(3):
            col = nd.index * 3 + j
            ys = [r[col] for r in rec.node_a]
            ys.append(ys[-1] if ys else 0.0)
            top = max(top, max(ys, default=0.0))
            ax.step(xs, ys, where="post", color=PHASE_COLORS[j], lw=1.0, label=PHASE_NAMES[j] if row == 0 else None)
        lims = nd.limits
        if lims[0] == lims[1] == lims[2] and lims[0] < math.inf:
            ax.axhline(lims[0], color="#d62728", ls="--", lw=1.2, label="fuse" if row == 0 else None)
            top = max(top, lims[0])
        else:
            for j in range(3):
                if lims[j] < math.inf:
                    ax.axhline(lims[j], color=PHASE_COLORS[j], ls="--", lw=1.0)
                    top = max(top, lims[j])
        bad = [v for v in res.violations if v.where.startswith(f"node:{nd.id}:")]
        if bad:
            ax.plot([v.at.astimezone(res.tz) for v in bad], [v.value for v in bad], "x", color="#d62728",
                    ms=8, label="violation")
        ax.set_ylim(min(0.0, min((min(r[nd.index * 3:nd.index * 3 + 3]) for r in rec.node_a), default=0.0)) * 1.1,
                    top * 1.12 + 1)
        ax.set_ylabel("A")
        ax.set_title(f"{nd.id}" + (" (grid connection)" if nd.index == 0 else ""), loc="left", fontsize=10)
        _axis_time(ax, res, mdates)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.suptitle(title or f"{res.cfg.site.name}: current per phase and node", x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, path, plt)


def plot_cars(res: Result, path: Path, title: str = "") -> list[Path]:
    """Per EVSE with cars: the current the car draws and the grant, and the state of charge."""
    plt, mdates = _mpl()
    rec = res.records
    ports = [i for i, port in enumerate(res.plant.ports) if port.stays]
    if not ports:
        ports = list(range(len(res.plant.ports)))[:1]
    ts = _times(res)
    end = (res.start + timedelta(seconds=res.n_steps * res.dt)).astimezone(res.tz)
    xs = [*ts, end]
    stays = res.stays
    fig, axes = plt.subplots(max(1, len(ports)), 1, figsize=(11, 2.2 * max(1, len(ports)) + 0.6), sharex=True,
                             squeeze=False)
    for row, i in enumerate(ports):
        ax = axes[row][0]
        _shade(ax, res, row == 0)
        e = res.topo.evses[i] if res.topo.evses else None
        draw = [r[i] for r in rec.draw] if e else []
        grant = [r[i] if rec.stay[n][i] >= 0 else math.nan for n, r in enumerate(rec.grant)] if e else []
        if e:
            ax.step(xs, [*draw, draw[-1] if draw else 0.0], where="post", color="#1f77b4", lw=1.2,
                    label="car draws (A per phase)" if row == 0 else None)
            ax.step(xs, [*grant, grant[-1] if grant else math.nan], where="post", color="#2ca02c", lw=0.9, ls="--",
                    label="granted" if row == 0 else None)
            ax.set_ylim(0, e.max_a * 1.15)
        ax.set_ylabel("A")
        ax2 = ax.twinx()
        soc_x: list[datetime] = []
        soc_y: list[float] = []
        for n in range(len(rec.k)):
            s = rec.stay[n][i] if e else -1
            if s < 0:
                if soc_y and not math.isnan(soc_y[-1]):
                    soc_x.append(ts[n])
                    soc_y.append(math.nan)
                continue
            st = stays[s]
            soc_x.append(ts[n])
            soc_y.append(100 * (st.car.soc_start + res.plant.units_wh(rec.units[n][i]) / 1000 / st.car.capacity_kwh))
            nxt = rec.stay[n + 1][i] if n + 1 < len(rec.k) else None
            if nxt != s:  # the stay ends here: its final state of charge at its departure
                t_end = xs[n + 1]
                soc_x.append(t_end)
                soc_y.append(100 * (st.car.soc_start + res.plant.units_wh(st.delivered) / 1000 / st.car.capacity_kwh))
        ax2.plot(soc_x, soc_y, color="#9467bd", lw=1.2, label="state of charge" if row == 0 else None)
        ax2.set_ylim(0, 105)
        ax2.set_ylabel("SoC %")
        cars = sorted({stays[s].car.id for s in range(len(stays)) if stays[s].evse == i})
        ax.set_title(f"{e.id if e else ''}: {', '.join(cars) or 'no car'}", loc="left", fontsize=10)
        _axis_time(ax, res, mdates)
        if row == 0:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            fig.legend(h1 + h2, l1 + l2, loc="upper right", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(title or f"{res.cfg.site.name}: cars", x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, path, plt)


def _save(fig: Any, path: Path, plt: Any) -> list[Path]:
    out = []
    for ext in ("png", "svg"):
        p = path.with_suffix(f".{ext}")
        fig.savefig(p, dpi=110 if ext == "png" else None, metadata={"Date": None} if ext == "svg" else None)
        out.append(p)
    plt.close(fig)
    return out
