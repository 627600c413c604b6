"""`pvtap deadletters`: list the records InfluxDB rejected, and send them again."""

from __future__ import annotations

import argparse
import json
import sys

from pvtap.config import Config
from pvtap.records import from_ns
from pvtap.store.delivery import DeliveryLog, read_deadletters
from pvtap.store.local import store_paths


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "deadletters", help="list records InfluxDB rejected (400/422/413) and requeue them",
        description="Records InfluxDB rejected one by one (after splitting the batch) are kept here with the "
                    "server's message, and so are records pvtap could not write exactly (a field changing type, "
                    "a name line protocol cannot carry). Fix the cause (e.g. the bucket's schema), then requeue "
                    "them: the running forwarder sends them again.")
    parser.add_argument("--store", action="append", default=[], metavar="NAME",
                        help="only this store (e.g. relay); repeatable")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    lister = actions.add_parser("list", help="list dead letters (the default)")
    lister.add_argument("--limit", type=int, default=None, help="at most this many per store")
    lister.add_argument("--json", action="store_true", help="one JSON object per dead letter")
    requeue = actions.add_parser("requeue", help="queue dead letters for another delivery attempt")
    requeue.add_argument("ids", nargs="*", type=int,
                         help="dead-letter ids (as listed); needs --store with several stores")
    requeue.add_argument("--all", action="store_true", help="every dead letter")
    parser.set_defaults(func=run, action="list", limit=None, json=False)


def run(args: argparse.Namespace, config: Config) -> int:
    wanted = {name.removesuffix(".sqlite") for name in args.store}
    paths = [p for p in store_paths(config.data_dir) if not wanted or p.stem in wanted]
    if not paths:
        print(f"no local stores in {config.data_dir}" + (" matching --store" if wanted else ""), file=sys.stderr)
        return 1 if wanted else 0
    if args.action == "requeue":
        return _requeue(args, paths)
    total = 0
    for path in paths:
        letters = read_deadletters(path, args.limit)
        total += len(letters)
        for d in letters:
            r = d.record
            if args.json:
                print(json.dumps({"store": path.name, "id": d.id, "record_id": d.record_id, "status": d.status,
                                  "message": d.message, "line": d.line, "requeued": d.requeued,
                                  "rejected_ns": d.rejected_ns, "measurement": r.measurement,
                                  "time_ns": r.time_ns, "tags": dict(r.tags), "fields": dict(r.fields)},
                                 sort_keys=True))
                continue
            when = from_ns(d.rejected_ns).isoformat(timespec="seconds").replace("+00:00", "Z")
            who = f"HTTP {d.status}" if d.status else "pvtap"
            flag = "  [requeued]" if d.requeued else ""
            print(f"{path.name} #{d.id}  record #{d.record_id}  rejected {when} by {who}{flag}")
            print(f"    {d.message}")
            print(f"    {d.line or _describe(r)}")
    if not args.json:
        print(f"{total} dead letters" + (" (pvtap deadletters requeue --all to send them again)" if total else ""),
              file=sys.stderr)
    return 0


def _requeue(args: argparse.Namespace, paths: list) -> int:
    if not args.all and not args.ids:
        print("pvtap deadletters requeue: give dead-letter ids or --all", file=sys.stderr)
        return 2
    if args.ids and len(paths) > 1:
        print("pvtap deadletters requeue: ids are per store; add --store NAME", file=sys.stderr)
        return 2
    marked = 0
    for path in paths:
        delivery = DeliveryLog(path)
        try:
            marked += delivery.requeue(args.ids, all_=args.all)
        finally:
            delivery.close()
    print(f"requeued {marked} dead letters; the forwarder sends them again (pvtap status shows progress)")
    return 0


def _describe(r) -> str:
    tags = ",".join(f"{k}={v}" for k, v in sorted(r.tags.items()))
    return f"{r.measurement}{',' + tags if tags else ''} {json.dumps(dict(r.fields))} {r.time_ns}"
