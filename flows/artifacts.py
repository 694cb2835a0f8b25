"""Prefect artifacts of a finished run: what an operator sees in the UI for each scheduled run.

A markdown summary (samples done, quarantined, time, throughput), a table of the quarantined cells and
links to the cube and the report. Published from the flow's own run (they need its run context); a failure
to publish is logged and never fails the run whose data is already written.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("copgen.artifacts")


def _key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:64] or "copgen"


def _href(url: str) -> str:
    return url if "://" in url else f"file://{url}"


def summary_markdown(job: str, summary: dict[str, Any], elapsed_s: float, samples_run: int) -> str:
    rate = samples_run / elapsed_s if elapsed_s > 0 else 0.0
    done = summary.get("samples_done", summary.get("samples"))
    total = summary.get("samples_total", summary.get("samples"))
    lines = [
        f"# copgen {job}: run `{summary.get('run_id')}`",
        "",
        "| | |",
        "|---|---|",
        f"| samples done | {done} of {total} |",
        f"| samples processed this run | {samples_run} |",
        f"| quarantined | {summary.get('quarantined', 0)} |",
        f"| time | {elapsed_s:.1f} s |",
        f"| throughput | {rate:.2f} samples/s |",
    ]
    for label, url in _links(summary).items():
        lines.append(f"| {label} | [{url}]({_href(url)}) |")
    return "\n".join(lines) + "\n"


def _links(summary: dict[str, Any]) -> dict[str, str]:
    links = {}
    if summary.get("cube"):
        links["cube"] = summary["cube"]
    for label, url in (summary.get("conditions") or {}).items():
        links[f"cube ({label})"] = url
    if summary.get("report"):
        links["report"] = summary["report"]
    return links


def publish(job: str, summary: dict[str, Any], elapsed_s: float, samples_run: int) -> None:
    """Create the run's artifacts (inside a flow run)."""
    try:
        from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

        create_markdown_artifact(summary_markdown(job, summary, elapsed_s, samples_run),
                                 key=_key(f"{job}-summary"), description=f"copgen {job} run summary")
        rows = [{k: q.get(k) for k in ("grid_cell", "patch", "modality", "reason")}
                for q in summary.get("quarantine") or []]
        create_table_artifact(rows, key=_key(f"{job}-quarantine"),
                              description="quarantined samples of this run")
        for label, url in _links(summary).items():
            create_link_artifact(_href(url), link_text=label, key=_key(f"{job}-{label}"),
                                 description=f"copgen {job}: {label}")
    except Exception as exc:  # the data is written; a UI extra must not fail the run
        log.warning("could not publish the run's Prefect artifacts: %s", exc)
