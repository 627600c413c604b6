"""Write or check grafana/ from pvtap/dashboards (`scripts/gen-dashboards [--check]`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pvtap.dashboards import files

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
DESCRIPTION = "Write grafana/ from pvtap/dashboards; --check only says whether it is up to date."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that grafana/ is up to date")
    args = parser.parse_args(argv)
    wanted = files()
    stale = [path for path, text in wanted.items()
             if not (GRAFANA / path).is_file() or (GRAFANA / path).read_text(encoding="utf-8") != text]
    extra = [str(p.relative_to(GRAFANA)) for p in GRAFANA.rglob("*") if p.is_file()
             and str(p.relative_to(GRAFANA)) not in wanted] if GRAFANA.is_dir() else []
    if args.check:
        for path in stale:
            print(f"grafana/{path} is out of date: run .venv/bin/python scripts/gen-dashboards", file=sys.stderr)
        for path in extra:
            print(f"grafana/{path} is not generated: remove it, or generate it from pvtap/dashboards", file=sys.stderr)
        return 1 if stale or extra else 0
    for path in stale:
        target = GRAFANA / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(wanted[path], encoding="utf-8")
        print(f"wrote grafana/{path}")
    for path in extra:
        (GRAFANA / path).unlink()
        print(f"removed grafana/{path}")
    print(f"grafana/: {len(wanted)} files, {len(stale)} rewritten")
    return 0
