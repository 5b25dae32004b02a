"""IPAM failures surfaced to callers (the CNI handler turns them into CNI errors).

Datastore failures (:class:`felixpy.datastore.api.DatastoreError`, e.g. ``Unavailable``) are *not*
wrapped: the caller decides whether they mean "try again later".
"""

from __future__ import annotations


class IPAMError(Exception):
    """Base class of every IPAM failure."""


class NoPoolsError(IPAMError):
    """No IP pool qualifies for the request (none exist, none enabled, none select this node/use)."""


class PoolNotFoundError(IPAMError):
    """A pool that the caller asked for by name or CIDR does not exist or is disabled."""


class PoolExhaustedError(IPAMError):
    """The qualifying pools have no free address this node may use."""


class BlockLimitError(PoolExhaustedError):
    """This node already owns ``maxBlocksPerHost`` blocks and they are full."""


class AddressInUseError(IPAMError):
    """``assign_ip`` of an address that is already allocated."""


class AddressNotInPoolError(IPAMError):
    """``assign_ip`` of an address outside every enabled pool."""


class StrictAffinityError(IPAMError):
    """``assign_ip`` into a block affine to another node while strict affinity is on."""


class BlockNotEmptyError(IPAMError):
    """Releasing a block affinity that was required to be empty, but the block still has allocations."""


class InvalidBlockError(IPAMError):
    """An IPAMBlock resource is malformed (bad CIDR, lists of the wrong length, bad indexes)."""


class TooManyConflictsError(IPAMError):
    """Gave up after the retry budget of compare-and-swap conflicts (excessive concurrent IPAM writes)."""
