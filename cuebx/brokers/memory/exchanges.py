"""The memory broker's exchanges: RabbitMQ's four routing rules, as pure functions.

An `Exchange` holds its bindings and answers which of them a message matches; the broker
follows exchange-to-exchange bindings and alternate exchanges from there (see
`MemoryBroker`). The matching rules are RabbitMQ's:

- ``direct``: the binding key equals the routing key.
- ``topic``: keys and patterns are words separated by dots (``""`` is no word at all,
  ``"a."`` is ``a`` and an empty word); ``*`` matches exactly one word, ``#`` zero or more.
- ``headers``: the binding's arguments other than ``x-`` ones are compared with the
  message's headers other than ``x-`` ones; ``x-match: all`` (the default) needs every one
  present and equal, ``any`` at least one.
- ``fanout``: every binding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cuebx.topology import Binding, DestinationType, ExchangeType

__all__ = ["Exchange", "Route", "headers_match", "topic_matches"]


@dataclass(frozen=True, slots=True)
class Route:
    """A binding as the memory broker keeps it: where it leads, and what it matches on."""

    destination: str
    destination_type: DestinationType
    routing_key: str
    arguments: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, binding: Binding) -> Route:
        return cls(
            binding.destination,
            binding.destination_type,
            binding.routing_key,
            tuple(binding.arguments.items()),
        )


@dataclass(eq=False, slots=True)
class Exchange:
    """One exchange: its type, arguments and bindings (a set, in the order they were made)."""

    name: str
    type: ExchangeType
    arguments: dict[str, Any] = field(default_factory=dict)
    routes: dict[Route, None] = field(default_factory=dict)

    @property
    def alternate(self) -> str | None:
        """The ``alternate-exchange``: where what this exchange routes nowhere goes."""
        value = self.arguments.get("alternate-exchange")
        return value if isinstance(value, str) else None

    def bind(self, route: Route) -> None:
        """Add a binding; binding the same thing twice is one binding, as in RabbitMQ."""
        self.routes[route] = None

    def unbind(self, destination: str, destination_type: DestinationType) -> None:
        """Forget every binding to a destination (it was deleted)."""
        for route in [r for r in self.routes if r.destination == destination]:
            if route.destination_type == destination_type:
                del self.routes[route]

    def match(self, routing_key: str, headers: Mapping[str, Any]) -> list[Route]:
        """Return the bindings a message with this routing key and these headers takes."""
        if self.type == "fanout":
            return list(self.routes)
        if self.type == "direct":
            return [r for r in self.routes if r.routing_key == routing_key]
        if self.type == "topic":
            return [r for r in self.routes if topic_matches(r.routing_key, routing_key)]
        return [r for r in self.routes if headers_match(dict(r.arguments), headers)]


def _words(key: str) -> tuple[str, ...]:
    # RabbitMQ splits on every dot; an empty key has no words at all.
    return tuple(key.split(".")) if key else ()


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Tell whether a topic binding `pattern` matches `routing_key`, as RabbitMQ does.

    ``*`` matches exactly one word and ``#`` zero or more; other words match themselves.
    """
    return _match(_words(pattern), _words(routing_key))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    # Glob matching over words ('#' as a glob's '*', '*' as its '?'): on a mismatch, go
    # back to the last '#' and let it take one more word.
    p = w = 0
    hash_at, resume = -1, 0
    while w < len(words):
        if p < len(pattern) and pattern[p] == "#":
            hash_at, resume = p, w
            p += 1
        elif p < len(pattern) and pattern[p] in ("*", words[w]):
            p += 1
            w += 1
        elif hash_at >= 0:
            p, resume = hash_at + 1, resume + 1
            w = resume
        else:
            return False
    return all(word == "#" for word in pattern[p:])


def headers_match(arguments: Mapping[str, Any], headers: Mapping[str, Any]) -> bool:
    """Tell whether a headers binding with `arguments` matches a message's `headers`.

    ``x-match`` is ``all`` (the default) or ``any``; ``all-with-x`` and ``any-with-x``
    compare ``x-`` headers too. Otherwise names starting with ``x-`` take no part, on
    either side, which is why cuebx routes delays on a header named ``cuebx-delay-to``.
    """
    mode = arguments.get("x-match", "all")
    with_x = mode in ("all-with-x", "any-with-x")
    wanted = [
        (name, value)
        for name, value in arguments.items()
        if name != "x-match" and (with_x or not name.startswith("x-"))
    ]
    found = [name in headers and _same(headers[name], value) for name, value in wanted]
    if mode in ("any", "any-with-x"):
        return any(found)
    return all(found)


def _same(a: Any, b: Any) -> bool:
    # Erlang compares the values, and true is an atom, not the integer 1.
    return isinstance(a, bool) == isinstance(b, bool) and a == b
