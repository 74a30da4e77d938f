"""Figures for the operator: `/stats`, and the usage CSV of `/export` and `drawbridge usage --csv`."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from bot.store import Store, UsageRow
from bot.texts import money, t


@dataclass(frozen=True, slots=True)
class Period:
    label: str
    jobs: int
    images: int
    spend: float
    by_model: list[tuple[str, int, float]] = field(default_factory=list)  # model, images, usd
    failures: list[tuple[str, int]] = field(default_factory=list)  # error kind, count
    p50: float | None = None
    p95: float | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[k]


async def period(store: Store, label: str, since_day: str) -> Period:
    (totals,) = await store.fetch(
        "SELECT COUNT(*), SUM(CASE WHEN status = 'succeeded' THEN n_images ELSE 0 END), "
        "SUM(cost_usd) FROM jobs WHERE day >= ?",
        (since_day,),
    )
    models = await store.fetch(
        "SELECT model, SUM(n_images), SUM(cost_usd) FROM jobs "
        "WHERE day >= ? AND status = 'succeeded' GROUP BY model ORDER BY SUM(cost_usd) DESC",
        (since_day,),
    )
    failures = await store.fetch(
        "SELECT COALESCE(error_kind, status), COUNT(*) FROM jobs "
        "WHERE day >= ? AND status IN ('failed', 'refused') GROUP BY 1 ORDER BY 2 DESC",
        (since_day,),
    )
    latencies = [
        float(r[0])
        for r in await store.fetch(
            "SELECT finished_at - created_at FROM jobs "
            "WHERE day >= ? AND status = 'succeeded' AND finished_at IS NOT NULL",
            (since_day,),
        )
    ]
    return Period(
        label=label,
        jobs=int(totals[0] or 0),
        images=int(totals[1] or 0),
        spend=round(totals[2] or 0.0, 6),
        by_model=[(str(r[0]), int(r[1] or 0), round(r[2] or 0.0, 6)) for r in models],
        failures=[(str(r[0]), int(r[1])) for r in failures],
        p50=percentile(latencies, 0.5),
        p95=percentile(latencies, 0.95),
    )


def render_period(p: Period, lang: str) -> str:
    """The period as `/stats` shows it, in the admin's language."""
    spend = money(p.spend)
    lines = [t(lang, "stats.period", label=p.label, jobs=p.jobs, images=p.images, spend=spend)]
    if p.p50 is not None and p.p95 is not None:
        lines.append(t(lang, "stats.latency", p50=f"{p.p50:.1f}", p95=f"{p.p95:.1f}"))
    for model, images, usd in p.by_model[:8]:
        lines.append(t(lang, "stats.model", model=model, images=images, spend=money(usd)))
    if p.failures:
        failures = ", ".join(f"{_kind(lang, kind)} {n}" for kind, n in p.failures)
        lines.append(t(lang, "stats.failures", failures=failures))
    return "\n  ".join(lines)


def _kind(lang: str, kind: str) -> str:
    """A failure's kind in the admin's language (as stored, for one this release has no name for)."""
    key = f"kind.{kind}"
    label = t(lang, key)
    return kind if label == key else label


def usage_csv(rows: Sequence[UsageRow]) -> bytes:
    """One line per day, user and model: what `/export` sends and `usage --csv` prints."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["day", "platform", "user_id", "model", "jobs", "succeeded", "images", "cost_usd"]
    )
    for r in rows:
        writer.writerow(
            [
                r.day,
                r.platform,
                r.user_id,
                r.model,
                r.jobs,
                r.succeeded,
                r.images,
                f"{r.cost_usd:.6f}",
            ]
        )
    return buf.getvalue().encode()
