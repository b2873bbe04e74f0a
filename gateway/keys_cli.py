"""`npuserve keys`: manage the gateway's API key file (`npuserve gateway --api-keys FILE`).

    npuserve keys add --file keys.toml --name web --tenant acme --max-streams 32
    npuserve keys hash < key.txt        # the entry's hash for a key you made yourself
    npuserve keys list --file keys.toml

`add` makes a random key, appends its hash to the file and prints the key once, on stdout: the
file never holds it. Running gateways pick the change up within a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.config import env


def register(subparsers: Any) -> None:
    """Add the `keys` subcommand to the root parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "keys", help="add, hash and list the gateway's API keys",
        description="Manage the API key file the gateway reads with --api-keys.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    default_file = env("API_KEYS", "")

    add = sub.add_parser("add", help="make a key, append its hash to the file, print it once")
    add.add_argument("--file", default=default_file, required=not default_file,
                     help="the key file (NPUSERVE_API_KEYS); created if missing")
    add.add_argument("--name", required=True, help="the key's name, in logs and metrics")
    add.add_argument("--tenant", default="",
                     help="whose requests these are (default: the name)")
    add.add_argument("--role", choices=("caller", "admin"), default="caller",
                     help="caller (default), or admin: may cancel any tenant's requests")
    add.add_argument("--max-streams", type=int, default=0,
                     help="concurrent streams across the fleet (default 0: no limit)")
    add.add_argument("--tokens-per-minute", type=int, default=0,
                     help="prompt + completion tokens per minute (default 0: no limit)")
    add.add_argument("--max-priority", type=int, default=None,
                     help="highest priority it may use (default: 9 for admin, 5 for caller)")
    add.set_defaults(handler=_add)

    hash_ = sub.add_parser("hash", help="print the file entry's hash of a key read from stdin")
    hash_.set_defaults(handler=_hash)

    list_ = sub.add_parser("list", help="the keys in the file (names, tenants, roles, limits)")
    list_.add_argument("--file", default=default_file, required=not default_file,
                       help="the key file (NPUSERVE_API_KEYS)")
    list_.set_defaults(handler=_list)


def _add(args: argparse.Namespace) -> int:
    from gateway.api_keys import (
        DEFAULT_CALLER_MAX_PRIORITY,
        Caller,
        Role,
        append_key,
        hash_key,
        new_key,
    )

    role = Role(args.role)
    priority = args.max_priority
    if priority is None:
        priority = 9 if role is Role.ADMIN else DEFAULT_CALLER_MAX_PRIORITY
    caller = Caller(name=args.name, tenant=args.tenant or args.name, role=role,
                    max_streams=args.max_streams, tokens_per_minute=args.tokens_per_minute,
                    max_priority=priority)
    key = new_key()
    append_key(Path(args.file), caller, hash_key(key))
    print(key)
    print(f"npuserve keys: added {caller.name!r} (tenant {caller.tenant!r}, {role.value}) to "
          f"{args.file}; the key above is shown only now", file=sys.stderr)
    return 0


def _hash(args: argparse.Namespace) -> int:
    from gateway.api_keys import hash_key

    key = sys.stdin.readline().strip()
    if not key:
        print("npuserve keys hash: give the key on stdin", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def _list(args: argparse.Namespace) -> int:
    from gateway.api_keys import KeyStore

    store = KeyStore(args.file)
    for caller in store.callers():
        limits = (f"max_streams={caller.max_streams or '-'} "
                  f"tokens_per_minute={caller.tokens_per_minute or '-'} "
                  f"max_priority={caller.max_priority}")
        print(f"{caller.name}\ttenant={caller.tenant}\t{caller.role.value}\t{limits}")
    return 0
