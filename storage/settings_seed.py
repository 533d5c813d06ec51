"""The parts of the settings file that seed the index on first start: the AE permissions
(``[[dimse.ae_permissions]]``, ``allowed_calling_ae_titles``), the C-MOVE destinations
(``[[dimse.peers]]``) and the CORS origins (``[http] cors_allowed_origins``). Each is copied
once, recorded in ``settings_seed``; afterwards the index is what counts (``hilum ae``, ``hilum
peers``, ``hilum cors``, the admin API), and what an administrator removed stays removed."""

from __future__ import annotations

import logging

from sqlalchemy import exc, select

from config import Settings
from storage.errors import NotFound
from storage.index.database import Index
from storage.index.models import (
    AEPermission,
    CorsOrigin,
    MoveDestination,
    Partition,
    SettingsSeed,
)

log = logging.getLogger(__name__)

AE_PERMISSIONS = "dimse.ae_permissions"
MOVE_DESTINATIONS = "dimse.peers"
CORS_ORIGINS = "http.cors_allowed_origins"
PARTS = (AE_PERMISSIONS, MOVE_DESTINATIONS, CORS_ORIGINS)


def seed_from_settings(index: Index, settings: Settings) -> list[str]:
    """Copy what was not copied yet; the names of the parts copied now. Two processes starting
    together: one copies, the other finds it done."""
    with index.read() as session:
        if len(session.scalars(select(SettingsSeed.name)).all()) == len(PARTS):
            return []  # every start after the first: nothing to write
    try:
        with index.write() as session:
            done = set(session.scalars(select(SettingsSeed.name)).all())
            seeded = []
            dimse = settings.dimse
            if AE_PERMISSIONS not in done:
                for seed in dimse.ae_permission_seeds:
                    if session.get(Partition, seed.partition) is None:
                        raise NotFound(
                            f"[[dimse.ae_permissions]] {seed.ae_title} names partition "
                            f"{seed.partition}, which does not exist: create it with "
                            "`hilum partitions create` first"
                        )
                    session.merge(
                        AEPermission(
                            calling_ae_title=seed.ae_title,
                            partition=seed.partition,
                            store=seed.store,
                            query=seed.query,
                            retrieve=seed.retrieve,
                            networks=list(seed.networks),
                        )
                    )
                session.add(SettingsSeed(name=AE_PERMISSIONS))
                seeded.append(AE_PERMISSIONS)
            if MOVE_DESTINATIONS not in done:
                for peer in dimse.peers:
                    session.merge(
                        MoveDestination(
                            ae_title=peer.ae_title, host=peer.host, port=peer.port, tls=peer.tls
                        )
                    )
                session.add(SettingsSeed(name=MOVE_DESTINATIONS))
                seeded.append(MOVE_DESTINATIONS)
            if CORS_ORIGINS not in done:
                for origin in dict.fromkeys(settings.http.cors_allowed_origins):
                    session.merge(CorsOrigin(origin=origin))
                session.add(SettingsSeed(name=CORS_ORIGINS))
                seeded.append(CORS_ORIGINS)
    except exc.IntegrityError:
        return []  # another process seeded first
    for name in seeded:
        log.info("copied [%s] from the settings into the index (first start)", name)
    return seeded
