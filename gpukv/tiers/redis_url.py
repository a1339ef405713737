"""Redis / Valkey URLs for the remote tier: scheme check, password masking, a bounded client.

URLs (redis-py syntax; the password is masked in every message and log line)::

    redis://[[user]:password@]host:port/db    TCP, optional ACL user / password
    rediss://...?ssl_ca_certs=/path/ca.pem    TLS (also ssl_cert_reqs, ssl_check_hostname, ...)
    unix:///path/redis.sock?db=0              Unix socket
    redis+cluster://host:port                 Redis / Valkey cluster via redis.cluster.RedisCluster
    rediss+cluster://, valkey[s]://, valkey[s]+cluster://   same, TLS / aliases

``connect`` gives a client whose connect and socket reads/writes are bounded by ``timeout_s``,
with redis-py retries off, after one successful PING.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis
import redis.exceptions as rexc
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

# The server is unreachable, stalled or mid-failover: mark the tier down, never raise to callers.
DOWN_ERRORS = (rexc.ConnectionError, rexc.TimeoutError, rexc.InvalidResponse,
               rexc.ClusterError, rexc.RedisClusterException)
_SCHEMES = {"redis": "redis", "rediss": "rediss", "unix": "unix", "valkey": "redis",
            "valkeys": "rediss"}


def mask_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def connect(url: str, timeout_s: float) -> redis.Redis | RedisCluster:
    """A client for ``url`` with bounded sockets and no retries, after a successful PING.

    Raises ``ValueError`` naming the masked URL for an unknown scheme, failed authentication, an
    unreachable server (within ``timeout_s``) or an error reply to the PING.
    """
    masked = mask_url(url)
    scheme, sep, rest = url.partition("://")
    cluster = scheme.endswith("+cluster")
    scheme = _SCHEMES.get(scheme.removesuffix("+cluster"))
    if not sep or scheme is None or (cluster and scheme == "unix"):
        raise ValueError(f"remote URL {masked!r}: scheme must be one of redis://, rediss://, "
                         "unix://, redis+cluster://, rediss+cluster:// (valkey[s]:// alike)")
    url = f"{scheme}://{rest}"
    # Query parameters of the URL (e.g. ?socket_timeout=) override these, as in redis-py.
    options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                   retry=Retry(NoBackoff(), 0))
    client = None
    try:
        client = (RedisCluster if cluster else redis.Redis).from_url(url, **options)
        client.ping()
    except (rexc.AuthenticationError, rexc.AuthenticationWrongNumberOfArgsError,
            rexc.NoPermissionError) as exc:
        reason = (f"authentication failed ({type(exc).__name__}: {exc}); check the user/password "
                  "in the URL")
    except DOWN_ERRORS as exc:
        reason = f"server unreachable within {timeout_s} s ({type(exc).__name__}: {exc})"
    except (rexc.ResponseError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    else:
        return client
    if client is not None:
        client.close()
    raise ValueError(f"remote URL {masked!r}: {reason}")
