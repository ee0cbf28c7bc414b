"""`python -m webui loras list|rename|duplicate|delete|restore|trash|note|tag`: the adapter library from the
command line, the same operations (webui.adapters.library) the LoRA panel offers.

These work on the files alone. A server using the same folder keeps any adapter it has loaded in memory, so
renaming or deleting one from here never breaks a running model; stop using it there first if it is active.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from webui.adapters import library
from webui.adapters.report_cache import DiskCache, status_of
from webui.errors import LoraDeckError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ops = parser.add_subparsers(dest="op", required=True)

    def op(name, help_text):
        p = ops.add_parser(name, help=help_text)
        p.add_argument("--loras-dir", default="loras")
        return p

    ls = op("list", "list the adapters (name, rank, alpha, size, date, base, tags, notes)")
    ls.add_argument("--search", default="", help="words that must all appear in the name, tags or notes")
    ls.add_argument("--base", default="", help="only adapters whose config names this base model")
    ls.add_argument("--status", choices=library.STATUSES, default=None,
                    help="only adapters whose last cached report (from the app, for any base) says so")
    ls.add_argument("--sort", choices=library.SORTS, default="name", help="date, rank and size: largest first")
    ls.add_argument("--json", action="store_true", help="print JSON (one object per adapter)")
    p = op("rename", "rename an adapter (its notes and tags go with it)")
    p.add_argument("name")
    p.add_argument("new_name")
    p = op("duplicate", "copy an adapter under a new name")
    p.add_argument("name")
    p.add_argument("new_name")
    p = op("delete", "move adapters to the trash (loras/.trash; `restore` brings them back)")
    p.add_argument("names", nargs="+")
    p = op("restore", "bring an adapter back from the trash")
    p.add_argument("item", help="a trash id (see `trash`) or an adapter name (its latest deletion)")
    p.add_argument("--as", dest="as_name", default=None, help="restore under another name")
    p = op("trash", "list the trash")
    p.add_argument("--empty", action="store_true", help="erase everything in the trash for good")
    p = op("note", "set an adapter's notes ('' clears them)")
    p.add_argument("name")
    p.add_argument("text")
    p = op("tag", "add tags to an adapter (or --remove them, or --set exactly these)")
    p.add_argument("name")
    p.add_argument("tags", nargs="*")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--remove", action="store_true")
    mode.add_argument("--set", action="store_true", help="replace all tags with these (none: clear)")


def _cached_statuses(loras_dir: Path, entries) -> dict[str, str]:
    """The newest-known status per adapter from the app's report cache (whatever base it was checked on)."""
    records = DiskCache(loras_dir).read()
    out = {}
    for e in entries:
        recs = [v for k, v in records.items() if k.rsplit("|", 1)[0] == e.name and v.get("signature") == e.signature]
        out[e.name] = status_of(recs[-1]) if recs else "pending"
    return out


def run(args) -> int:
    d = Path(args.loras_dir)
    try:
        if args.op == "list":
            entries = library.scan(d)
            statuses = _cached_statuses(d, entries)
            rows = library.select(entries, args.search, args.base, args.status or "", args.sort, statuses)
            if args.json:
                print(json.dumps([{**e.to_dict(), "status": statuses[e.name]} for e in rows], indent=2))
            else:
                for e in rows:
                    date = datetime.datetime.fromtimestamp(e.mtime).strftime("%Y-%m-%d %H:%M")
                    rank = f"r={e.rank} α={e.alpha:g}" if e.rank else e.kind
                    extra = "".join([f"  #{' #'.join(e.tags)}" if e.tags else "", f"  — {e.notes}" if e.notes else ""])
                    print(f"{e.name:32} {rank:14} {e.size / 1e6:8.2f} MB  {date}  {statuses[e.name]:12} "
                          f"{e.base or '-'}{extra}")
                if not rows:
                    print(f"(no adapters in {d} match)" if entries else f"(no adapters in {d})", file=sys.stderr)
        elif args.op == "rename":
            print(library.rename(d, args.name, args.new_name))
        elif args.op == "duplicate":
            print(library.duplicate(d, args.name, args.new_name))
        elif args.op == "delete":
            for name in args.names:
                t = library.delete(d, name)
                print(f"{name} → trash ({t.id}); undo: restore {t.id}")
        elif args.op == "restore":
            print(library.restore(d, args.item, args.as_name))
        elif args.op == "trash":
            if args.empty:
                print(f"erased {library.empty_trash(d)} adapter(s)")
            for t in library.trash(d):
                print(f"{t.id:48} {t.name:32} deleted {datetime.datetime.fromtimestamp(t.deleted):%Y-%m-%d %H:%M}")
        elif args.op == "note":
            library.set_notes(d, args.name, args.text)
        elif args.op == "tag":
            tags = library.set_tags(d, args.name, args.tags, add=not (args.remove or args.set), remove=args.remove)
            print(" ".join(tags))
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
