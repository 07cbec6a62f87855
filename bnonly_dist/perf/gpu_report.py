"""The GPU check's report: what each part measured, as report.md (for people) and report.json.

A part that timed out still gives what it printed: the bench prints each variant's line and
each largest batch as soon as it is known, and the DALI part its RESULT line.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

MAX_BATCH_LINE = re.compile(r"^(\S+): largest batch that fits (\d+)$", re.M)


def bench_result(part: dict, path: Path) -> dict | None:
    """The bench's JSON report; for a part that timed out, the largest batches found so far."""
    if part["status"] == "passed" and path.is_file():
        return json.loads(path.read_text())
    found = {variant: int(batch) for variant, batch in MAX_BATCH_LINE.findall(part.get("stdout", ""))}
    return {"partial": True, "max_batch": found} if found else None


def result_line(part: dict) -> dict | None:
    found = [line[7:] for line in part.get("stdout", "").splitlines() if line.startswith("RESULT ")]
    return json.loads(found[0]) if found else None


def markdown(report: dict) -> str:
    env = report["environment"]
    title = "GPU check rehearsal on the CPU" if report.get("rehearsal") else "GPU check"
    lines = [f"# {title}, {env['date']}", "",
             f"{env['device']} on {env['host']} ({env['cpus']} CPUs); torch {env['torch']} (CUDA {env['cuda']}), "
             f"Python {env['python']}. Budget {report['budget_s']:.0f} s with a margin of {report['margin_s']} s.",
             "Modules: " + ", ".join(f"{m} {'yes' if ok else 'MISSING'}" for m, ok in report["modules"].items()),
             f"Essential parts (marked *) {'passed' if report['essential_passed'] else 'did NOT all pass'}.", "",
             "| part | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {p['name']}{' *' if p.get('essential') else ''} | {p['status']} | {p['seconds']} | "
              f"{p['detail'].replace('|', '/')} |" for p in report["parts"]]
    for part in report["parts"]:
        if part["name"].startswith("bench") and part["status"] in ("passed", "timed out"):
            lines += ["", f"## {part['name']}{' (timed out: what it printed)' if part['status'] != 'passed' else ''}", "",
                      "`" + " ".join(part["command"][1:]) + "`", "", "```", part["stdout"].strip(), "```"]
    for decode, rate in report["dali"].items():
        if rate and "images_per_s" in rate:
            lines.append(f"\nDALI {rate['decode']} decode alone ({decode} part): {rate['images_per_s']:.0f} img/s "
                         f"({rate['threads']} threads, batch {rate['batch']}, {rate['batches']} timed batches)")
    return "\n".join(lines) + "\n"
