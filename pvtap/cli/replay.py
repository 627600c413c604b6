"""`pvtap replay`: decode every stored raw payload again with today's decoders.

The stores keep each (redacted) payload next to the records decoded from it, so a decoder fix
or a new field reaches old data too. A payload's records are only rewritten when the new decode
differs, so running replay again changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from pvtap.cli._common import NoStores, Progress, find_stores
from pvtap.config import Config
from pvtap.decode import Codec, codec_for
from pvtap.store.local import LocalStore

EXAMPLES = """\
examples:
  pvtap replay                    every store in the data directory
  pvtap replay --store enphase    only data_dir/enphase.sqlite

Payloads that arrive while replay runs are decoded by the running pvtap as usual. A payload
whose decode now fails keeps its raw bytes with the error and loses its records; one that
failed before and decodes now gets its records. Payloads of a protocol with no decoder in this
version are left as they are."""


@dataclass
class ReplaySummary:
    payloads: int = 0
    changed: int = 0
    unchanged: int = 0
    decode_errors: int = 0
    skipped: int = 0  # no decoder for the payload's protocol
    records_before: int = 0
    records_after: int = 0
    no_decoder: set[str] = field(default_factory=set)

    def add(self, other: ReplaySummary) -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, mine | theirs if isinstance(mine, set) else mine + theirs)

    def line(self) -> str:
        text = (f"{self.payloads:,} payloads: {self.changed:,} changed, {self.unchanged:,} unchanged, "
                f"{self.decode_errors:,} decode errors; records {self.records_before:,} -> {self.records_after:,}")
        if self.skipped:
            text += f"; {self.skipped:,} skipped (no decoder for {', '.join(sorted(self.no_decoder))})"
        return text


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "replay", help="decode all stored raw payloads again with the current decoders",
        description="Decode every raw payload kept in the local stores again with this version's\n"
                    "decoders and update the stored records where the result differs. Safe to run\n"
                    "while pvtap is running, and safe to repeat: a second run changes nothing.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", action="append", default=[], metavar="NAME",
                        help="only this store (its file name in the data directory, e.g. enphase; repeatable)")
    parser.add_argument("--progress", action="store_true",
                        help="show progress on stderr even when it is not a terminal")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        paths = find_stores(config.data_dir, args.store)
    except NoStores as exc:
        print(f"pvtap replay: {exc}", file=sys.stderr)
        return 1
    total = ReplaySummary()
    for path in paths:
        summary = ReplaySummary()
        try:
            replay_store(path, summary, progress_forced=args.progress)
        except KeyboardInterrupt:
            print(f"{path.name}: interrupted after {summary.line()}; run replay again to finish",
                  file=sys.stderr)
            return 130
        print(f"{path.name}: {summary.line()}", flush=True)
        total.add(summary)
    if len(paths) > 1:
        print(f"total: {total.line()}")
    return 0


def replay_store(path: Path, summary: ReplaySummary, *, progress_forced: bool = False) -> None:
    """Replay one store file into `summary` (filled in as it goes, so an interrupt can report)."""
    codecs: dict[str, Codec | None] = {}
    with LocalStore(path) as store:
        summary.records_before = summary.records_after = store.count_records()
        # Only what is there now: the running producer decodes anything newer itself.
        pending = store.count_raw()
        progress = Progress(f"replaying {path.name}", pending, enabled=Progress.wanted(progress_forced))
        try:
            for stored in store.raw_payloads():
                if summary.payloads == pending:
                    break
                summary.payloads += 1
                progress.advance()
                protocol = stored.raw.origin.protocol
                if protocol not in codecs:
                    codecs[protocol] = _codec(protocol)
                codec = codecs[protocol]
                if codec is None:
                    summary.skipped += 1
                    summary.no_decoder.add(protocol)
                    continue
                try:
                    records, error = codec.decode_raw(stored.raw), None
                except Exception as exc:  # the same message the live ingest stores
                    records, error = [], f"{type(exc).__name__}: {exc}"
                if error is not None:
                    summary.decode_errors += 1
                if store.replace_records(stored.id, records, error):
                    summary.changed += 1
                else:
                    summary.unchanged += 1
        finally:
            progress.finish()
            summary.records_after = store.count_records()


def _codec(protocol: str) -> Codec | None:
    try:
        return codec_for(protocol)
    except ValueError:  # a protocol this version does not know
        return None
    except ModuleNotFoundError as exc:  # known but its decoder is not in this build
        if exc.name != f"pvtap.decode.{protocol}":
            raise
        return None
