"""Where a webhook may be sent: the guard against server-side request forgery.

A ``webhook_url`` is typed by a user, and the service POSTs to it from inside
the cluster's network. Left unchecked, that would let anyone with a key reach
the cloud metadata service, Redis or a private admin page. So a target must
be http or https, and every address its host resolves to must be public,
unless an operator admits the network in ``webhook_allow``.

The check runs at submission (a 400 naming ``webhook_url``) and again before
each delivery, on the addresses the delivery then connects to: the name may
resolve elsewhere by then (DNS rebinding).
"""

import ipaddress
import socket
from typing import NamedTuple
from urllib.parse import urlsplit

from .errors import InvalidRequestError

SCHEMES = {"http": 80, "https": 443}

#: IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64).
NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class ForbiddenTargetError(InvalidRequestError):
    """The URL is not one the service may call; the message says why."""

    code = "invalid_webhook_url"
    param = "webhook_url"


class UnresolvableTargetError(ForbiddenTargetError):
    """The host has no address (now); at delivery this is worth a retry."""


class Target(NamedTuple):
    """A checked URL: its parts and the addresses it may be reached at."""

    scheme: str
    host: str
    port: int
    path: str
    addresses: list


def allowed_networks(cidrs):
    """Parse ``webhook_allow`` entries; raises ValueError naming a bad one."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{cidr!r} is not a network such as 10.0.0.0/8 or fd00::/8") from None
    return networks


def check_url(url, allow=(), resolve=socket.getaddrinfo):
    """Check ``url`` and resolve its host.

    Args:
        allow: networks (from :func:`allowed_networks`) that may be private.
        resolve: ``getaddrinfo``, replaceable in tests.

    Returns:
        The :class:`Target`, with every address the host resolved to.

    Raises:
        ForbiddenTargetError: not http(s), no host, or an address that is
            private, loopback, link-local, multicast or reserved.
        UnresolvableTargetError: the host does not resolve.
    """
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ForbiddenTargetError(f"webhook_url: the scheme must be http or https, not {parts.scheme!r}")
    host = parts.hostname
    if not host:
        raise ForbiddenTargetError("webhook_url: the URL has no host")
    try:
        port = parts.port or SCHEMES[parts.scheme]
    except ValueError:
        raise ForbiddenTargetError("webhook_url: the port is not a number from 0 to 65535") from None
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UnresolvableTargetError(f"webhook_url: the host {host!r} does not resolve ({e})") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    literal = _is_address(host)
    for address in addresses:
        reason = why_forbidden(address, allow)
        if reason:
            shown = host if literal else f"{host!r} resolves to {address}, which"
            raise ForbiddenTargetError(f"webhook_url: {shown} is {reason}; webhooks go to public addresses only"
                                       " (an operator may admit a network with webhook_allow)")
    path = parts.path or "/"
    return Target(parts.scheme, host, port, path + (f"?{parts.query}" if parts.query else ""), addresses)


def why_forbidden(address, allow=()):
    """Why a webhook may not go to ``address``, in words; None if it may.

    IPv6 forms that embed an IPv4 address (mapped ``::ffff:a.b.c.d``, 6to4,
    NAT64) are judged by that IPv4 address.
    """
    if any(address in network for network in allow):
        return None
    embedded = embedded_ipv4(address)
    if embedded is not None:
        reason = why_forbidden(embedded, allow)
        return f"{reason} ({embedded}, inside an IPv6 address)" if reason else None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (such as the cloud metadata service)"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_private:
        return "a private address"
    if address.is_reserved or not address.is_global:
        return "a reserved address"
    return None


def embedded_ipv4(address):
    """The IPv4 address inside an IPv6 one (mapped, 6to4, NAT64), or None."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in prefix for prefix in NAT64_PREFIXES):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _is_address(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
