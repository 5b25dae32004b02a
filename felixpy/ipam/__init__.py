"""Calico-compatible block IPAM: pure block logic (:mod:`.block`), pools (:mod:`.pools`), the CAS client
(:mod:`.client`) and a consistency checker (:mod:`.check`)."""

from felixpy.ipam.check import Problem, check_ipam
from felixpy.ipam.client import IPAMClient, IPAMConfig
from felixpy.ipam.errors import (
    AddressInUseError,
    AddressNotInPoolError,
    BlockLimitError,
    BlockNotEmptyError,
    InvalidBlockError,
    IPAMError,
    NoPoolsError,
    PoolExhaustedError,
    PoolNotFoundError,
    StrictAffinityError,
    TooManyConflictsError,
)
from felixpy.ipam.pools import InvalidPoolError, IPPool, ensure_default_pool, parse_pool

__all__ = [
    "AddressInUseError",
    "AddressNotInPoolError",
    "BlockLimitError",
    "BlockNotEmptyError",
    "IPAMClient",
    "IPAMConfig",
    "IPAMError",
    "IPPool",
    "InvalidBlockError",
    "InvalidPoolError",
    "NoPoolsError",
    "PoolExhaustedError",
    "PoolNotFoundError",
    "Problem",
    "StrictAffinityError",
    "TooManyConflictsError",
    "check_ipam",
    "ensure_default_pool",
    "parse_pool",
]
