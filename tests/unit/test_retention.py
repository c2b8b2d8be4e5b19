"""src/retention.py: which backups retention deletes. Pure functions of manifests."""

from __future__ import annotations

import pytest

import backup_store
import retention
from backup import BackupManifest

NEXT_FULL = "99999999T999999Z"


def _full(backup_id: str) -> BackupManifest:
    return BackupManifest(
        backup_id=backup_id,
        created_at="2025-01-01T00:00:00+00:00",
        paths=("/data/homeserver.yaml",),
        file_count=1,
        size=10,
        sha256="ab" * 32,
        duration=0.1,
    )


def _incremental(backup_id: str, parent: str) -> BackupManifest:
    return BackupManifest(
        backup_id=backup_id,
        created_at="2025-01-01T00:00:00+00:00",
        paths=("/data/homeserver.yaml",),
        file_count=1,
        size=10,
        sha256="ab" * 32,
        duration=0.1,
        backup_type="incremental",
        parent=parent,
    )


# Three complete chains, oldest first, and backups whose chains are broken or cyclic.
#   A1 <- A2                 (oldest chain)
#   B1 <- B2 <- B3
#   C1                       (newest chain)
#   (X0 missing) <- X1 <- X2  broken
#   P <- Q <- P              cyclic
CHAIN_A = [_full("20250101T000000Z"), _incremental("20250102T000000Z", "20250101T000000Z")]
CHAIN_B = [
    _full("20250201T000000Z"),
    _incremental("20250202T000000Z", "20250201T000000Z"),
    _incremental("20250203T000000Z", "20250202T000000Z"),
]
CHAIN_C = [_full("20250301T000000Z")]
BROKEN = [
    _incremental("20241201T000000Z", "20241130T000000Z"),
    _incremental("20241202T000000Z", "20241201T000000Z"),
]
CYCLIC = [
    _incremental("20241101T000000Z", "20241102T000000Z"),
    _incremental("20241102T000000Z", "20241101T000000Z"),
]


def _ids(manifests: list[BackupManifest]) -> list[str]:
    """The ids, newest first (the order retention returns)."""
    return sorted((manifest.backup_id for manifest in manifests), reverse=True)


# --- chain_roots ----------------------------------------------------------------------------


def test_chain_roots_complete_chains():
    """Every backup of a complete chain maps to the chain's full backup."""
    roots = retention.chain_roots([*CHAIN_A, *CHAIN_B, *CHAIN_C])

    assert roots == {
        **{manifest.backup_id: "20250101T000000Z" for manifest in CHAIN_A},
        **{manifest.backup_id: "20250201T000000Z" for manifest in CHAIN_B},
        "20250301T000000Z": "20250301T000000Z",
    }


def test_chain_roots_any_order():
    """The order of the manifests does not matter (list_backups gives newest first)."""
    manifests = [*CHAIN_A, *CHAIN_B, *CHAIN_C, *BROKEN]

    assert retention.chain_roots(reversed(manifests)) == retention.chain_roots(manifests)


@pytest.mark.parametrize(
    "manifests",
    [
        pytest.param(BROKEN, id="parent-missing"),
        pytest.param(CYCLIC, id="cyclic"),
        pytest.param([_incremental("20241001T000000Z", "20241001T000000Z")], id="own-parent"),
        pytest.param(
            [
                _incremental("20241001T000000Z", "20241003T000000Z"),
                _incremental("20241002T000000Z", "20241001T000000Z"),
                _incremental("20241003T000000Z", "20241002T000000Z"),
            ],
            id="three-cycle",
        ),
    ],
)
def test_chain_roots_broken_or_cyclic(manifests: list[BackupManifest]):
    """A backup whose chain does not reach a full backup has no root (None), and no loop."""
    roots = retention.chain_roots([*CHAIN_A, *manifests])

    assert {backup_id: roots[backup_id] for backup_id in _ids(manifests)} == dict.fromkeys(
        _ids(manifests)
    )
    # The complete chain beside them is unaffected.
    assert roots[CHAIN_A[1].backup_id] == CHAIN_A[0].backup_id


def test_chain_roots_empty():
    """No backups, no roots."""
    assert retention.chain_roots([]) == {}


# --- expired ----------------------------------------------------------------------------------

ALL = [*CHAIN_A, *CHAIN_B, *CHAIN_C]


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        pytest.param(1, _ids([*CHAIN_A, *CHAIN_B]), id="keep-1"),
        pytest.param(2, _ids(CHAIN_A), id="keep-2"),
        pytest.param(3, [], id="keep-3"),
        pytest.param(10, [], id="keep-more-than-there-are"),
        pytest.param(0, [], id="zero-keeps-all"),
        pytest.param(-1, [], id="negative-keeps-all"),
    ],
)
def test_expired_keeps_the_newest_chains(keep: int, expected: list[str]):
    """The newest N complete chains stay; older chains go whole, listed newest first."""
    assert retention.expired(ALL, keep) == expected


@pytest.mark.parametrize("keep", [1, 2])
def test_expired_never_the_newest_chain(keep: int):
    """With a single complete chain, nothing is deleted, however small N is."""
    assert retention.expired(CHAIN_B, keep) == []


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_expired_whole_chains_only(keep: int):
    """A chain is kept or deleted as a whole: a kept backup never loses what it depends on."""
    doomed = set(retention.expired(ALL, keep))

    for chain in (CHAIN_A, CHAIN_B, CHAIN_C):
        ids = {manifest.backup_id for manifest in chain}
        assert ids <= doomed or not ids & doomed
    kept = [manifest for manifest in ALL if manifest.backup_id not in doomed]
    kept_ids = {manifest.backup_id for manifest in kept}
    assert all(manifest.parent in kept_ids for manifest in kept if manifest.parent)
    assert CHAIN_C[0].backup_id in kept_ids


@pytest.mark.parametrize("keep", [1, 2])
def test_expired_leaves_broken_chains_alone(keep: int):
    """Backups whose chain is broken or cyclic are left for the operator, and do not count."""
    manifests = [*BROKEN, *CYCLIC, *ALL]

    doomed = retention.expired(manifests, keep)

    assert doomed == retention.expired(ALL, keep)
    assert not set(doomed) & set(_ids([*BROKEN, *CYCLIC]))


def test_expired_counts_only_complete_chains():
    """A broken chain newer than every complete one does not push a complete one out."""
    newer_broken = [_incremental("20250401T000000Z", "20250331T000000Z")]

    assert retention.expired([*CHAIN_B, *newer_broken], 1) == []
    assert retention.expired([*CHAIN_A, *CHAIN_B, *newer_broken], 1) == _ids(CHAIN_A)


def test_expired_accepts_an_iterator():
    """The manifests may be any iterable, read once."""
    assert retention.expired(iter(ALL), 2) == _ids(CHAIN_A)


# --- expire_after_next_full ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manifests", "keep", "expected"),
    [
        pytest.param(ALL, 1, _ids(ALL), id="keep-1-everything-goes"),
        pytest.param(ALL, 2, _ids([*CHAIN_A, *CHAIN_B]), id="keep-2"),
        pytest.param(ALL, 3, _ids(CHAIN_A), id="keep-3"),
        pytest.param(ALL, 4, [], id="keep-4"),
        pytest.param(ALL, 0, [], id="zero-keeps-all"),
        pytest.param([], 1, [], id="no-backups"),
        pytest.param([*BROKEN, *CHAIN_C], 1, _ids(CHAIN_C), id="broken-stays"),
        pytest.param(BROKEN, 1, [], id="only-broken"),
    ],
)
def test_expire_after_next_full(manifests: list[BackupManifest], keep: int, expected: list[str]):
    """What the next full backup's retention would delete: one more chain counts as newest."""
    result = retention.expire_after_next_full(manifests, keep, NEXT_FULL)

    assert result == expected
    assert NEXT_FULL not in result


def test_expire_after_next_full_is_expired_with_one_more_full():
    """It is exactly what expired says once the next full backup exists."""
    for keep in range(5):
        assert retention.expire_after_next_full(iter(ALL), keep, NEXT_FULL) == retention.expired(
            [*ALL, _full(NEXT_FULL)], keep
        )


def test_expired_keeps_a_chain_that_another_deployment_builds_on():
    """A chain made before manifests named their deployment counts as every deployment's.

    When deployment A continued such a chain and deployment B shares the path,
    B's retention must not delete the chain under A's newest backup.
    """
    legacy_full, legacy_incremental = (
        _full("20250101T000000Z"),
        _incremental("20250102T000000Z", "20250101T000000Z"),
    )
    a_incremental = _incremental("20250103T000000Z", "20250102T000000Z")  # A's, not B's
    b_full = _full("20250104T000000Z")
    b_own = [b_full, legacy_incremental, legacy_full]
    links = {m.backup_id: m.parent for m in [b_full, a_incremental, *b_own] if m.parent}

    assert retention.expired(b_own, 1) == ["20250102T000000Z", "20250101T000000Z"]
    assert retention.expired(b_own, 1, links=links) == []
    assert retention.expire_after_next_full(b_own, 2, NEXT_FULL, links=links) == []


def test_expired_keeps_a_chain_that_an_unusable_manifest_builds_on():
    """A newer charm's incremental (its manifest unusable here) still protects its parent."""
    own = [_full("20250104T000000Z"), _full("20250101T000000Z")]

    assert retention.expired(own, 1) == ["20250101T000000Z"]
    assert retention.expired(own, 1, links={"20250102T000000Z": "20250101T000000Z"}) == []


def test_expired_with_everything_still_deletes_what_no_one_else_needs():
    """Other deployments' backups spare only the chains they build on."""
    others = [_full("20250105T000000Z"), _incremental("20250106T000000Z", "20250105T000000Z")]
    own = [_full("20250104T000000Z"), _full("20250103T000000Z"), _full("20250101T000000Z")]
    own.append(_incremental("20250102T000000Z", "20250101T000000Z"))

    links = {m.backup_id: m.parent for m in [*own, *others] if m.parent}
    assert retention.expired(own, 1, links=links) == [
        "20250103T000000Z",
        "20250102T000000Z",
        "20250101T000000Z",
    ]


# --- a unit's clock that was ahead -----------------------------------------------------------
# FULL was made with the clock right; AHEAD on it by a unit whose clock was years
# ahead; AFTER on AHEAD once the clock was right again (it builds on the newest).
FULL, AHEAD, AFTER = "20250101T000000Z", "20300101T000000Z", "20250102T000000Z"
SKEWED = [_full(FULL), _incremental(AHEAD, FULL), _incremental(AFTER, AHEAD)]


def test_expired_deletes_each_backup_before_its_parent_whatever_the_ids():
    """Retention deletes in the order it returns: dependants first, not the newest id first."""
    result = retention.expired([*SKEWED, _full("20250201T000000Z")], 1)

    assert result == [AFTER, AHEAD, FULL]


def test_expire_after_next_full_with_a_clock_that_was_ahead():
    """Predicted with the id the next backup gets now, it never names that backup itself.

    It matches what retention does after that backup, which never deletes
    the new backup's own chain, even when an older chain has a newer id.
    """
    now = "20250105T000000Z"
    manifests = [_full(AHEAD), _full(FULL)]

    predicted = retention.expire_after_next_full(manifests, 1, now)

    after_backup = [b for b in retention.expired([*manifests, _full(now)], 1) if b != now]
    assert predicted == after_backup == [FULL]


@pytest.mark.parametrize(
    ("ids", "links", "expected"),
    [
        pytest.param(["b", "c", "a"], {}, ["c", "b", "a"], id="unrelated-newest-first"),
        pytest.param(["a", "b", "c"], {"b": "a", "c": "b"}, ["c", "b", "a"], id="a-chain"),
        pytest.param(["a", "z", "b"], {"z": "a", "b": "z"}, ["b", "z", "a"], id="parent-newer"),
        pytest.param(["a", "b", "c"], {"c": "a", "b": "c"}, ["b", "c", "a"], id="child-older"),
        pytest.param(["a", "b"], {"a": "b", "b": "a"}, ["a", "b"], id="a-cycle-once-each"),
        pytest.param(["a"], {"a": "a"}, ["a"], id="its-own-parent"),
        pytest.param(["b"], {"b": "a"}, ["b"], id="parent-not-deleted"),
    ],
)
def test_children_first(ids: list[str], links: dict[str, str], expected: list[str]):
    """Each backup comes before the one it builds on; otherwise newest first."""
    assert backup_store.children_first(ids, links) == expected
