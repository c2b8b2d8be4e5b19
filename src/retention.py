"""Retention of backup chains: which backups to delete to keep the newest N chains."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from backup import BackupManifest
from backup_store import children_first


def chain_roots(manifests: Iterable[BackupManifest]) -> dict[str, str | None]:
    """Map each backup to the full backup its chain starts from.

    Args:
        manifests: the complete backups.

    Returns:
        Each backup id and its chain's full backup, or None when a backup it
        depends on is missing (a broken chain).
    """
    by_id = {manifest.backup_id: manifest for manifest in manifests}
    roots: dict[str, str | None] = {}
    for backup_id, manifest in by_id.items():
        current: BackupManifest | None = manifest
        seen: set[str] = set()
        while current is not None and current.parent and current.backup_id not in seen:
            seen.add(current.backup_id)
            current = by_id.get(current.parent)
        complete = current is not None and not current.parent
        roots[backup_id] = current.backup_id if complete and current is not None else None
    return roots


def expired(
    manifests: Iterable[BackupManifest],
    keep_chains: int,
    *,
    links: Mapping[str, str] | None = None,
) -> list[str]:
    """Return the backups retention deletes to keep the newest complete chains.

    Chains are counted by their full backup, newest first. Only complete
    chains count and only chains older than the ``keep_chains``-th complete
    one are deleted, whole: a kept backup never loses what it depends on,
    and the newest complete chain always stays. Broken chains (a parent
    missing) are left for the operator to look at. A chain that a backup
    outside ``manifests`` builds on (another deployment's, which continued
    a chain made before manifests named their deployment, or one whose
    manifest this charm cannot use) is kept too.

    Args:
        manifests: the complete backups retention may delete.
        keep_chains: how many complete chains to keep; 0 keeps everything.
        links: each backup's parent, for every backup under the path (see
            S3Client.listing), when ``manifests`` are only some of them.

    Returns:
        The ids to delete, in the order to delete them: each before the
        backups it builds on, newest first otherwise.
    """
    if keep_chains <= 0:
        return []
    manifests = list(manifests)
    roots = chain_roots(manifests)
    complete_roots = sorted({root for root in roots.values() if root}, reverse=True)
    if len(complete_roots) <= keep_chains:
        return []
    doomed_roots = set(complete_roots[keep_chains:])
    doomed = {backup_id for backup_id, root in roots.items() if root in doomed_roots}
    all_links = {manifest.backup_id: manifest.parent for manifest in manifests if manifest.parent}
    all_links.update(links or {})
    needed = _ancestors_of_the_rest(doomed, all_links)
    doomed_roots -= {roots[backup_id] for backup_id in doomed & needed}
    return children_first(
        (backup_id for backup_id, root in roots.items() if root in doomed_roots), all_links
    )


def _ancestors_of_the_rest(doomed: set[str], links: Mapping[str, str]) -> set[str]:
    """Return the backups that the backups not doomed build on.

    Args:
        doomed: the backups to be deleted.
        links: each backup's parent.

    Returns:
        The ids of every parent, grandparent and so on of a backup not doomed.
    """
    needed: set[str] = set()
    for child, parent in links.items():
        if child in doomed:
            continue
        ancestor = parent
        while ancestor and ancestor not in needed:
            needed.add(ancestor)
            ancestor = links.get(ancestor, "")
    return needed


def expire_after_next_full(
    manifests: Iterable[BackupManifest],
    keep_chains: int,
    next_id: str,
    *,
    links: Mapping[str, str] | None = None,
) -> list[str]:
    """Return what retention would delete once the next full backup is made.

    Args:
        manifests: the complete backups retention may delete.
        keep_chains: how many complete chains to keep.
        next_id: the next full backup's id: the time now. It is usually newer
            than every backup, but not when a unit's clock was ahead, and
            retention ranks chains by id.
        links: each backup's parent, for every backup under the path (see expired).

    Returns:
        The ids that the next full backup's retention would delete (never
        its own chain, as after a backup).
    """
    manifests = list(manifests)
    if not manifests:
        return []
    template = manifests[0]
    future = BackupManifest(
        backup_id=next_id,
        created_at="",
        paths=(),
        file_count=0,
        size=0,
        sha256=template.sha256,
        duration=0,
    )
    return [backup_id for backup_id in expired([*manifests, future], keep_chains, links=links)
            if backup_id != next_id]  # fmt: skip
