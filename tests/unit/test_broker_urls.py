"""Several broker URLs: how they are given, read and checked (no broker needed)."""

from __future__ import annotations

import pytest

from cuebx import ConfigurationError, Cuebx
from cuebx.settings import split_urls

A = "amqp://guest:guest@h1:5672/"
B = "amqp://guest:guest@h2:5672/"
C = "amqps://app:s3cret@h3:5671/prod"


def test_a_list_of_urls_names_the_nodes_and_url_stays_the_first() -> None:
    settings = Cuebx([A, B, C]).settings
    assert settings.urls == (A, B, C)
    assert settings.url == A


def test_one_url_is_a_list_of_one() -> None:
    assert Cuebx(A).settings.urls == (A,)


def test_the_environment_variable_takes_urls_separated_by_commas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUEBX_BROKER_URL", f"{A}, {B},{C}")
    settings = Cuebx().settings
    assert settings.urls == (A, B, C)
    assert settings.url == A


def test_an_argument_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUEBX_BROKER_URL", f"{A},{B}")
    assert Cuebx([C]).settings.urls == (C,)


@pytest.mark.parametrize(
    ("text", "urls"),
    [
        (f"{A},{B}", (A, B)),
        (f" {A} ,\t{B} ", (A, B)),
        # A comma inside a password is not a separator: no scheme follows it.
        ("amqp://u:pa,ss@h1/,amqp://u:x@h2/", ("amqp://u:pa,ss@h1/", "amqp://u:x@h2/")),
        ("memory://", ("memory://",)),
    ],
)
def test_a_comma_separates_urls_only_before_another_scheme(
    text: str, urls: tuple[str, ...]
) -> None:
    assert split_urls(text) == urls


def test_each_url_scheme_is_checked_and_named_masked() -> None:
    with pytest.raises(ConfigurationError) as info:
        Cuebx([A, "redis://user:pw@h/0"])
    assert str(info.value) == (
        "Cuebx: broker URL 'redis://user:***@h/0' has scheme 'redis'; use one of: amqp, "
        "amqps, memory"
    )


def test_memory_takes_no_other_url() -> None:
    with pytest.raises(ConfigurationError) as info:
        Cuebx(["memory://", C])
    message = str(info.value)
    assert "memory:// runs in process and takes no other URL" in message
    assert "'amqps://app:***@h3:5671/prod'" in message
    assert "s3cret" not in message
    with pytest.raises(ConfigurationError, match="takes no other URL"):
        Cuebx("memory://,memory://")


@pytest.mark.parametrize("urls", [[], [A, ""], [A, None]])
def test_an_empty_list_or_an_empty_url_is_refused(urls: list[str]) -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"^Cuebx: (the list of broker URLs is empty|a broker URL must be a non-empty string)",
    ):
        Cuebx(urls)


def test_the_app_repr_shows_the_first_url_masked() -> None:
    assert repr(Cuebx([C, A])) == "<Cuebx amqps://app:***@h3:5671/prod tasks=[]>"


def test_the_amqp_broker_gets_every_url() -> None:
    from cuebx.brokers.amqp import AmqpBroker

    broker = Cuebx([A, B]).broker
    assert isinstance(broker, AmqpBroker)
    assert broker.urls == (A, B)
    assert broker.node_url == A  # before connecting: the first
