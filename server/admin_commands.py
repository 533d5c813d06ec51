"""``hilum partitions``, ``hilum ae``, ``hilum peers`` and ``hilum cors``: run-time
administration of the partitions, the DIMSE AE permissions, the C-MOVE destinations and the
CORS origins, stored in the index.

A change applies to the associations that start after it (CORS: within ``ORIGINS_TTL_S``
seconds), in every process, without a restart. The settings file seeds AE permissions,
destinations and CORS origins on first start only.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Iterator

from config import Settings
from server.context import cli_context
from storage.ae_permissions import (
    AEPermissionEntry,
    list_ae_permissions,
    networks,
    remove_ae_permission,
    set_ae_permission,
)
from storage.archive import open_archive
from storage.audit import AuditEvent, security_change_entry
from storage.cors_origins import add_cors_origin, list_cors_origins, remove_cors_origin
from storage.index.database import Index
from storage.move_destinations import (
    MoveDestinationEntry,
    list_move_destinations,
    remove_move_destination,
    set_move_destination,
)
from storage.partitions import (
    add_partition_ae_title,
    ae_title,
    create_partition,
    list_partitions,
    remove_partition_ae_title,
)
from storage.settings_seed import seed_from_settings


@contextlib.contextmanager
def _index(
    settings: Settings, args: argparse.Namespace, event: AuditEvent, *, seed: bool = True
) -> Iterator[Index]:
    """The index; ``seed``: the settings file's AE permissions and C-MOVE destinations copied
    first, if not yet (not for ``hilum partitions``: the partitions they name come first).
    A change (any sub-command but ``list``) is recorded in the audit trail before it is made,
    as the command line that asks for it (these commands take no secret)."""
    archive = open_archive(settings, connections=1)
    try:
        if seed:
            seed_from_settings(archive.index, settings)
        command = next(v for k, v in vars(args).items() if k.endswith("_command"))
        if command != "list":
            archive.record(
                cli_context(f"hilum {args.command} {command}"),
                security_change_entry(event, command, shlex.join(sys.argv[1:])[:500]),
            )
        yield archive.index
    finally:
        archive.close()


def cmd_partitions(settings: Settings, args: argparse.Namespace) -> int:
    with _index(settings, args, AuditEvent.PARTITION_CHANGE, seed=False) as index:
        if args.partitions_command == "create":
            entry = create_partition(
                index, args.name, args.ae_title, reserved_ae_title=settings.dimse.ae_title
            )
            titles = ", ".join(entry.ae_titles) or "none (reached over DICOMweb only)"
            print(f"partition {entry.name} created; DIMSE called AE titles: {titles}")
            return 0
        if args.partitions_command == "add-ae-title":
            add_partition_ae_title(
                index, args.name, args.title, reserved_ae_title=settings.dimse.ae_title
            )
            print(f"partition {args.name} is reached through {args.title} too")
            return 0
        if args.partitions_command == "remove-ae-title":
            remove_partition_ae_title(index, args.name, ae_title(args.title))
            print(f"partition {args.name} is no longer reached through {args.title}")
            return 0
        for entry in list_partitions(index):
            called: tuple[str, ...] = (settings.dimse.ae_title,) if entry.name == "default" else ()
            print(f"{entry.name}\t{','.join(called + entry.ae_titles) or '-'}")
    return 0


def cmd_ae(settings: Settings, args: argparse.Namespace) -> int:
    with _index(settings, args, AuditEvent.CONFIG_CHANGE) as index:
        if args.ae_command == "add":
            entry = AEPermissionEntry(
                ae_title(args.title), args.partition, args.store, args.query, args.retrieve,
                networks(args.network),
            )  # fmt: skip
            added = set_ae_permission(index, entry)
            print(
                f"{'added' if added else 'replaced'}: {entry.calling_ae_title} in partition "
                f"{entry.partition}: {entry.services}"
                f"{' from ' + ', '.join(entry.networks) if entry.networks else ''}"
            )
            return 0
        if args.ae_command == "remove":
            removed = remove_ae_permission(index, ae_title(args.title), args.partition)
            print(f"removed {removed} permission(s) of {args.title}")
            return 0
        entries = list_ae_permissions(index)
        if not entries:
            print("no AE permissions: any calling AE is accepted while [server] host is "
                  "loopback or [dimse] accept_any_calling_ae = true")  # fmt: skip
        for e in entries:
            print(f"{e.calling_ae_title}\t{e.partition}\t{e.services}\t"
                  f"{','.join(e.networks) or 'any address'}")  # fmt: skip
    return 0


def cmd_peers(settings: Settings, args: argparse.Namespace) -> int:
    with _index(settings, args, AuditEvent.CONFIG_CHANGE) as index:
        if args.peers_command == "add":
            entry = MoveDestinationEntry(ae_title(args.title), args.host, args.port, args.tls)
            added = set_move_destination(index, entry)
            print(f"{'added' if added else 'replaced'}: {entry.ae_title} at "
                  f"{entry.host}:{entry.port}{' (DICOM TLS)' if entry.tls else ''}")  # fmt: skip
            return 0
        if args.peers_command == "remove":
            remove_move_destination(index, ae_title(args.title))
            print(f"removed move destination {args.title}")
            return 0
        for d in list_move_destinations(index):
            print("\t".join([d.ae_title, f"{d.host}:{d.port}", "TLS" if d.tls else "no TLS"]))
    return 0


def cmd_cors(settings: Settings, args: argparse.Namespace) -> int:
    with _index(settings, args, AuditEvent.CONFIG_CHANGE) as index:
        if args.cors_command == "add":
            added = add_cors_origin(index, args.origin)
            print(f"{args.origin} {'listed' if added else 'was listed already'}"
                  f"{WILDCARD_NOTE if args.origin.strip() == '*' else ''}")  # fmt: skip
            return 0
        if args.cors_command == "remove":
            remove_cors_origin(index, args.origin)
            print(f"{args.origin} no longer listed")
            return 0
        for origin in list_cors_origins(index):
            print(origin)
    return 0


WILDCARD_NOTE = " (any page may read, never with credentials; ignored while [auth] is on)"


def add_admin_commands(commands: argparse._SubParsersAction) -> list[argparse._SubParsersAction]:
    """The four command groups; their sub-command groups (for the shared --config)."""
    partitions = commands.add_parser("partitions", help="partitions (tenants) and their AE titles")
    p_commands = partitions.add_subparsers(dest="partitions_command", required=True)
    create = p_commands.add_parser("create", help="create a partition")
    create.add_argument("name", help="a-z, 0-9, '-', '_' (part of URLs and blob keys)")
    create.add_argument("--ae-title", action="append", default=[], metavar="AE",
                        help="a Called AE Title selecting this partition (repeatable)")  # fmt: skip
    p_commands.add_parser("list", help="list partitions and their AE titles")
    add_title = p_commands.add_parser("add-ae-title", help="one more Called AE Title")
    add_title.add_argument("name")
    add_title.add_argument("title")
    remove_title = p_commands.add_parser(
        "remove-ae-title", help="a Called AE Title no longer selects the partition"
    )
    remove_title.add_argument("name")
    remove_title.add_argument("title")

    ae = commands.add_parser("ae", help="DIMSE AE permissions (calling AE titles)")
    ae_commands = ae.add_subparsers(dest="ae_command", required=True)
    ae_commands.add_parser("list", help="list AE permissions")
    add = ae_commands.add_parser(
        "add",
        help="allow a calling AE title services in a partition (replaces its entry); "
        "none given: C-ECHO only",
    )
    add.add_argument("title", help="the calling AE title")
    add.add_argument("--partition", default="default")
    add.add_argument("--store", action="store_true", help="C-STORE")
    add.add_argument("--query", action="store_true", help="C-FIND")
    add.add_argument("--retrieve", action="store_true", help="C-MOVE and C-GET")
    add.add_argument("--network", action="append", default=[], metavar="CIDR",
                     help="only from this network (repeatable); none: any address")  # fmt: skip
    remove = ae_commands.add_parser("remove", help="remove a calling AE title's permissions")
    remove.add_argument("title")
    remove.add_argument("--partition", help="only in this partition (default: every one)")

    peers = commands.add_parser("peers", help="C-MOVE destinations")
    peer_commands = peers.add_subparsers(dest="peers_command", required=True)
    peer_commands.add_parser("list", help="list C-MOVE destinations")
    add_peer = peer_commands.add_parser("add", help="add or replace a C-MOVE destination")
    add_peer.add_argument("title", help="its AE title (the Move Destination)")
    add_peer.add_argument("--host", required=True)
    add_peer.add_argument("--port", type=int, required=True)
    add_peer.add_argument("--tls", action="store_true", help="DICOM TLS ([dimse] tls_*)")
    remove_peer = peer_commands.add_parser("remove", help="remove a C-MOVE destination")
    remove_peer.add_argument("title")

    cors = commands.add_parser("cors", help="origins whose browser pages may call the HTTP API")
    cors_commands = cors.add_subparsers(dest="cors_command", required=True)
    cors_commands.add_parser("list", help="list the CORS origins")
    add_origin = cors_commands.add_parser("add", help="list an origin (e.g. https://viewer.org)")
    add_origin.add_argument("origin", help='scheme://host[:port], or "*" (read-only, auth off)')
    remove_origin = cors_commands.add_parser("remove", help="no longer list an origin")
    remove_origin.add_argument("origin")
    return [p_commands, ae_commands, peer_commands, cors_commands]


ADMIN_COMMANDS = {"partitions": cmd_partitions, "ae": cmd_ae, "peers": cmd_peers, "cors": cmd_cors}
