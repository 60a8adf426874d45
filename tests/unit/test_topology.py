"""The topology plan: queue names, x-arguments, bindings and declaration order (DESIGN.md)."""

from typing import Any

import pytest

from cuebx import ConfigurationError, Cuebx, Retry
from cuebx.topology import (
    ArgumentDifference,
    QueueRoute,
    Topology,
    dead_letter_queue_name,
    describe_differences,
    diff,
    plan,
    retry_queue_name,
)


@pytest.fixture
def app() -> Cuebx:
    return Cuebx("memory://")


def names(topology: Topology) -> list[str]:
    return [q.name for q in topology.queues]


def test_a_queue_with_two_retries_gets_the_main_queue_two_tiers_and_a_dead_letter_queue(
    app: Cuebx,
) -> None:
    @app.task(queue="emails", retries=["30s", "5m"])
    async def send(email: str) -> None: ...

    topology = app.topology()

    assert topology.exchange == "cuebx"
    assert names(topology) == ["emails.dlq", "emails.retry.30s", "emails.retry.5m", "emails"]
    assert topology.queue("emails").arguments == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "emails.dlq",
    }
    assert topology.queue("emails.retry.30s").arguments == {
        "x-message-ttl": 30_000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "emails",
    }
    assert topology.queue("emails.retry.5m").arguments == {
        "x-message-ttl": 300_000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "emails",
    }
    assert topology.queue("emails.dlq").arguments == {}


def test_the_main_queue_records_its_tasks_tiers_and_dead_letter_queue(app: Cuebx) -> None:
    @app.task(queue="emails", retries=["30s", "5m"])
    async def send(email: str) -> None: ...

    main = app.topology().queue("emails")

    assert main.role == "main"
    assert main.routing_keys == ("emails",)
    assert main.tasks == ("send",)
    assert main.retry_tiers == ("emails.retry.30s", "emails.retry.5m")
    assert main.dead_letter_queue == "emails.dlq"
    assert [q.name for q in app.topology().main_queues] == ["emails"]


def test_a_sub_second_retry_gets_a_millisecond_tier(app: Cuebx) -> None:
    @app.task(queue="fast", retries=["250ms"])
    async def ping() -> None: ...

    tier = app.topology().queue("fast.retry.250ms")
    assert tier.role == "retry"
    assert tier.arguments["x-message-ttl"] == 250


def test_a_compound_retry_delay_gets_its_canonical_label(app: Cuebx) -> None:
    @app.task(queue="q", retries=[90, "1h30m"])
    async def job() -> None: ...

    assert names(app.topology()) == ["q.dlq", "q.retry.1m30s", "q.retry.1h30m", "q"]


def test_retry_every_times_gives_one_tier_used_for_every_retry(app: Cuebx) -> None:
    @app.task(queue="q", retries=Retry(every="1m", times=3))
    async def job() -> None: ...

    assert names(app.topology()) == ["q.dlq", "q.retry.1m", "q"]
    assert job.retry_policy.tiers == ("q.retry.1m",) * 3


def test_repeated_delays_in_a_list_share_one_tier(app: Cuebx) -> None:
    @app.task(queue="q", retries=["30s", "30s", "5m", "30s"])
    async def job() -> None: ...

    assert app.topology().queue("q").retry_tiers == ("q.retry.30s", "q.retry.5m")
    assert job.retry_policy.tiers == ("q.retry.30s", "q.retry.30s", "q.retry.5m", "q.retry.30s")


@pytest.mark.parametrize("retries", [None, []])
def test_a_task_without_retries_gets_no_tiers(app: Cuebx, retries: list[str] | None) -> None:
    @app.task(queue="q", retries=retries)
    async def job() -> None: ...

    assert names(app.topology()) == ["q.dlq", "q"]
    assert app.topology().queue("q").retry_tiers == ()


def test_tasks_sharing_a_queue_share_the_sorted_union_of_their_tiers(app: Cuebx) -> None:
    @app.task(queue="q", retries=["5m", "30s"])
    async def one() -> None: ...

    @app.task(queue="q", retries=["1h", "30s"])
    async def two() -> None: ...

    @app.task(queue="q")
    async def three() -> None: ...

    topology = app.topology()
    assert names(topology) == ["q.dlq", "q.retry.30s", "q.retry.5m", "q.retry.1h", "q"]
    assert topology.queue("q").tasks == ("one", "two", "three")
    assert one.retry_policy.tiers == ("q.retry.5m", "q.retry.30s")
    assert two.retry_policy.tiers == ("q.retry.1h", "q.retry.30s")


def test_tiers_are_sorted_by_delay_not_by_name() -> None:
    topology = plan([QueueRoute("t", "q", (300_000, 30_000, 1_500, 250, 3_600_000))])

    assert topology.queue("q").retry_tiers == (
        "q.retry.250ms",
        "q.retry.1s500ms",
        "q.retry.30s",
        "q.retry.5m",
        "q.retry.1h",
    )


def test_dead_letter_false_gives_no_dead_letter_arguments_and_no_dlq(app: Cuebx) -> None:
    @app.task(queue="q", retries=["30s"], dead_letter=False)
    async def job() -> None: ...

    topology = app.topology()
    assert names(topology) == ["q.retry.30s", "q"]
    assert topology.queue("q").arguments == {}
    assert topology.queue("q").dead_letter_queue is None
    # The tier still returns expired messages to the main queue.
    assert topology.queue("q.retry.30s").arguments["x-dead-letter-routing-key"] == "q"


def test_a_shared_dead_letter_queue_cannot_serve_classic_and_quorum_queues(app: Cuebx) -> None:
    @app.task(queue="a", dead_letter="shared")
    async def first() -> None: ...

    with pytest.raises(ConfigurationError) as caught:

        @app.task(queue="b", dead_letter="shared", queue_type="quorum")
        async def second() -> None: ...

    assert "dead-letter queue 'shared' is shared by classic and quorum queues" in str(caught.value)
    assert list(app.tasks) == ["first"]  # the refused task was not registered


def test_a_named_dead_letter_queue_is_shared_by_several_queues(app: Cuebx) -> None:
    @app.task(queue="a", dead_letter="shared")
    async def one() -> None: ...

    @app.task(queue="b", dead_letter="shared")
    async def two() -> None: ...

    topology = app.topology()
    assert names(topology) == ["shared", "a", "b"]
    assert topology.queue("shared").role == "dead-letter"
    for queue in ("a", "b"):
        assert topology.queue(queue).arguments == {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "shared",
        }
        assert topology.queue(queue).dead_letter_queue == "shared"


def test_dead_letter_queue_names_follow_the_dead_letter_option() -> None:
    assert dead_letter_queue_name("emails", True) == "emails.dlq"
    assert dead_letter_queue_name("emails", "graveyard") == "graveyard"
    assert dead_letter_queue_name("emails", False) is None
    assert retry_queue_name("emails", 90_000) == "emails.retry.1m30s"


def test_quorum_queues_get_quorum_arguments_and_the_delivery_limit_on_the_main_queue() -> None:
    app = Cuebx("memory://", queue_type="quorum", delivery_limit=7)

    @app.task(queue="q", retries=["30s"])
    async def job() -> None: ...

    topology = app.topology()
    assert topology.queue("q").arguments == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "q.dlq",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": 7,
    }
    assert topology.queue("q.retry.30s").arguments == {
        "x-queue-type": "quorum",
        "x-message-ttl": 30_000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "q",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert topology.queue("q.dlq").arguments == {"x-queue-type": "quorum"}


def test_a_quorum_queue_gets_the_default_delivery_limit_of_ten(app: Cuebx) -> None:
    @app.task(queue="q", queue_type="quorum")
    async def job() -> None: ...

    assert app.topology().queue("q").arguments["x-delivery-limit"] == 10


def test_a_quorum_queue_without_a_delivery_limit_setting_gets_none() -> None:
    app = Cuebx("memory://", queue_type="quorum", delivery_limit=None)

    @app.task(queue="q")
    async def job() -> None: ...

    assert "x-delivery-limit" not in app.topology().queue("q").arguments


def test_queue_type_on_one_task_makes_only_its_queue_quorum(app: Cuebx) -> None:
    @app.task(queue="durable", queue_type="quorum")
    async def one() -> None: ...

    @app.task(queue="plain")
    async def two() -> None: ...

    topology = app.topology()
    assert topology.queue("durable").arguments["x-queue-type"] == "quorum"
    assert topology.queue("durable.dlq").arguments == {"x-queue-type": "quorum"}
    assert "x-queue-type" not in topology.queue("plain").arguments
    assert "x-delivery-limit" not in topology.queue("plain").arguments


def test_a_classic_task_overrides_a_quorum_app_default() -> None:
    app = Cuebx("memory://", queue_type="quorum")

    @app.task(queue="q", queue_type="classic")
    async def job() -> None: ...

    assert app.topology().queue("q").arguments == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "q.dlq",
    }


def test_max_priority_goes_on_classic_main_queues_only() -> None:
    app = Cuebx("memory://", max_priority=5)

    @app.task(queue="classic", retries=["30s"])
    async def one() -> None: ...

    @app.task(queue="quorum", queue_type="quorum")
    async def two() -> None: ...

    topology = app.topology()
    assert topology.queue("classic").arguments["x-max-priority"] == 5
    assert "x-max-priority" not in topology.queue("classic.retry.30s").arguments
    assert "x-max-priority" not in topology.queue("classic.dlq").arguments
    assert "x-max-priority" not in topology.queue("quorum").arguments


def test_without_max_priority_no_queue_gets_x_max_priority(app: Cuebx) -> None:
    @app.task(queue="q", priority=3)
    async def job() -> None: ...

    assert all("x-max-priority" not in q.arguments for q in app.topology().queues)


def test_extra_routing_keys_bind_the_main_queue_after_its_own_name(app: Cuebx) -> None:
    @app.task(queue="q", routing_keys=["orders.created", "orders.paid"])
    async def one() -> None: ...

    @app.task(queue="q", routing_keys=["orders.paid", "legacy"])
    async def two() -> None: ...

    assert app.topology().queue("q").routing_keys == (
        "q",
        "orders.created",
        "orders.paid",
        "legacy",
    )


def test_a_single_string_routing_key_is_one_key_not_its_letters(app: Cuebx) -> None:
    @app.task(queue="q", routing_keys="legacy")
    async def job() -> None: ...

    assert app.topology().queue("q").routing_keys == ("q", "legacy")


def test_tiers_and_dead_letter_queues_have_no_bindings(app: Cuebx) -> None:
    @app.task(queue="q", retries=["30s"])
    async def job() -> None: ...

    topology = app.topology()
    assert topology.queue("q.retry.30s").routing_keys == ()
    assert topology.queue("q.dlq").routing_keys == ()


def test_the_exchange_name_is_the_app_setting() -> None:
    app = Cuebx("memory://", exchange="jobs")

    @app.task
    async def job() -> None: ...

    assert app.topology().exchange == "jobs"


def test_dead_letter_queues_and_tiers_are_declared_before_any_main_queue() -> None:
    topology = plan(
        [
            QueueRoute("a", "first", (30_000,)),
            QueueRoute("b", "second", (5_000,), dead_letter="shared"),
            QueueRoute("c", "third", (60_000,), dead_letter=False),
        ]
    )

    roles = [q.role for q in topology.queues]
    assert roles == ["dead-letter"] * 2 + ["retry"] * 3 + ["main"] * 3
    assert names(topology) == [
        "first.dlq",
        "shared",
        "first.retry.30s",
        "second.retry.5s",
        "third.retry.1m",
        "first",
        "second",
        "third",
    ]
    declared: set[str] = set()
    for spec in topology.queues:
        target = spec.arguments.get("x-dead-letter-routing-key")
        if target is not None and spec.role == "main":
            assert target in declared, f"{spec.name} dead-letters to {target}, not declared yet"
        declared.add(spec.name)


def test_all_queues_are_listed_once(app: Cuebx) -> None:
    @app.task(queue="a", retries=["30s"], dead_letter="shared")
    async def one() -> None: ...

    @app.task(queue="b", retries=["30s"], dead_letter="shared")
    async def two() -> None: ...

    queue_names = names(app.topology())
    assert len(queue_names) == len(set(queue_names))


@pytest.mark.parametrize(
    ("option", "first", "second"),
    [
        ("queue_type", "quorum", "classic"),
        ("prefetch", 5, 10),
        ("dead_letter", True, False),
        ("dead_letter", "shared", True),
    ],
)
def test_tasks_on_one_queue_that_disagree_raise_naming_the_queue_and_both_tasks(
    app: Cuebx, option: str, first: object, second: object
) -> None:
    @app.task(queue="work", **{option: first})
    async def alpha() -> None: ...

    with pytest.raises(ConfigurationError) as info:

        @app.task(queue="work", **{option: second})
        async def beta() -> None: ...

    message = str(info.value)
    assert "'work'" in message
    assert "'alpha'" in message
    assert "'beta'" in message
    assert option in message
    assert list(app.tasks) == ["alpha"]


def test_a_task_that_leaves_an_option_unset_agrees_with_one_that_sets_it(app: Cuebx) -> None:
    @app.task(queue="q", prefetch=5, queue_type="quorum")
    async def one() -> None: ...

    @app.task(queue="q")
    async def two() -> None: ...

    main = app.topology().queue("q")
    assert main.prefetch == 5
    assert main.arguments["x-queue-type"] == "quorum"


def test_plan_names_disagreeing_tasks_directly() -> None:
    with pytest.raises(ConfigurationError, match=r"queue 'q'.*'a'.*prefetch=1.*'b'.*prefetch=2"):
        plan([QueueRoute("a", "q", prefetch=1), QueueRoute("b", "q", prefetch=2)])


def test_a_main_queue_named_like_another_queues_dlq_is_refused(app: Cuebx) -> None:
    @app.task(queue="emails")
    async def send() -> None: ...

    with pytest.raises(ConfigurationError, match=r"'emails\.dlq'"):

        @app.task(queue="emails.dlq")
        async def drain() -> None: ...

    assert list(app.tasks) == ["send"]


def test_a_main_queue_named_like_a_retry_tier_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"'q\.retry\.30s'"):
        plan([QueueRoute("a", "q", (30_000,)), QueueRoute("b", "q.retry.30s")])


def test_a_dead_letter_queue_named_like_its_own_main_queue_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="'q'"):
        plan([QueueRoute("a", "q", dead_letter="q")])


def test_asking_for_a_queue_outside_the_topology_names_it(app: Cuebx) -> None:
    @app.task(queue="q")
    async def job() -> None: ...

    with pytest.raises(KeyError, match="'nope'"):
        app.topology().queue("nope")


def test_the_topology_follows_tasks_registered_after_it_was_computed(app: Cuebx) -> None:
    @app.task(queue="a")
    async def one() -> None: ...

    assert names(app.topology()) == ["a.dlq", "a"]

    @app.task(queue="b", retries=["5s"])
    async def two() -> None: ...

    assert names(app.topology()) == ["a.dlq", "b.dlq", "b.retry.5s", "a", "b"]


def test_an_app_without_tasks_plans_only_the_exchange(app: Cuebx) -> None:
    topology = app.topology()
    assert topology.exchange == "cuebx"
    assert topology.queues == ()


# -- diff: what RabbitMQ compares when a queue is declared again ---------------------------

TTL = {"x-message-ttl": 1000, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "q"}
QUORUM = {"x-queue-type": "quorum", "x-delivery-limit": 10}

DIFF_CASES: list[tuple[str, dict[str, Any], dict[str, Any], list[tuple[str, Any, Any]]]] = [
    ("the same arguments differ in nothing", TTL, dict(TTL), []),
    ("no arguments on either side differ in nothing", {}, {}, []),
    (
        "another TTL differs in the TTL only",
        TTL,
        {**TTL, "x-message-ttl": 2000},
        [("x-message-ttl", 1000, 2000)],
    ),
    (
        "an argument the queue lacks differs from none",
        {"x-max-priority": 5},
        {},
        [("x-max-priority", 5, None)],
    ),
    (
        "an argument cuebx does not want differs from none",
        {},
        {"x-max-priority": 5},
        [("x-max-priority", None, 5)],
    ),
    (
        "every differing argument is listed in name order",
        {"x-message-ttl": 1, "x-dead-letter-routing-key": "a"},
        {"x-message-ttl": 2, "x-dead-letter-routing-key": "b"},
        [("x-dead-letter-routing-key", "a", "b"), ("x-message-ttl", 1, 2)],
    ),
    ("a missing queue type is classic", {"x-queue-type": "classic"}, {}, []),
    (
        "a classic queue is not a quorum queue",
        {"x-queue-type": "quorum"},
        {},
        [("x-queue-type", "quorum", "classic")],
    ),
    ("a classic queue ignores the delivery limit", {"x-delivery-limit": 10}, {}, []),
    (
        "a quorum queue compares the delivery limit",
        QUORUM,
        {**QUORUM, "x-delivery-limit": 3},
        [("x-delivery-limit", 10, 3)],
    ),
    (
        "the existing queue's type chooses the arguments compared",
        QUORUM,
        {"x-queue-type": "classic"},
        [("x-queue-type", "quorum", "classic")],
    ),
    (
        "a stream compares its retention",
        {"x-queue-type": "stream", "x-max-age": "7D"},
        {"x-queue-type": "stream", "x-max-age": "1D", "x-message-ttl": 5},
        [("x-max-age", "7D", "1D")],
    ),
    (
        "an unknown queue type compares every argument",
        {"x-queue-type": "delayed", "x-custom": 1},
        {"x-queue-type": "delayed", "x-custom": 2},
        [("x-custom", 1, 2)],
    ),
    (
        "true is not 1",
        {"x-single-active-consumer": True},
        {"x-single-active-consumer": 1},
        [("x-single-active-consumer", True, 1)],
    ),
    (
        "an integer is not a float",
        {"x-message-ttl": 1000},
        {"x-message-ttl": 1000.0},
        [("x-message-ttl", 1000, 1000.0)],
    ),
    ("arguments RabbitMQ ignores do not count", {"x-custom": 1}, {"x-custom": 2}, []),
]


@pytest.mark.parametrize(
    ("wanted", "current", "expected"),
    [case[1:] for case in DIFF_CASES],
    ids=[case[0] for case in DIFF_CASES],
)
def test_diff_compares_queue_arguments_as_rabbitmq_does(
    wanted: dict[str, Any], current: dict[str, Any], expected: list[tuple[str, Any, Any]]
) -> None:
    differences = diff(wanted, current)

    assert [(d.argument, d.wanted, d.current) for d in differences] == expected
    for (_, mine, theirs), difference in zip(expected, differences, strict=True):
        assert type(difference.wanted) is type(mine)
        assert type(difference.current) is type(theirs)


def test_the_differences_of_a_plan_and_itself_are_none() -> None:
    topology = plan([QueueRoute("t", "q", retry_delays_ms=(5_000,))], queue_type="quorum")

    assert all(diff(spec.arguments, spec.arguments) == () for spec in topology.queues)


def test_differences_are_described_one_by_one_and_joined_with_semicolons() -> None:
    differences = [
        ArgumentDifference("x-message-ttl", 1000, 2000),
        ArgumentDifference("x-queue-type", "quorum", "classic"),
        ArgumentDifference("x-overflow", "reject-publish", None),
    ]

    assert describe_differences(differences) == (
        "argument 'x-message-ttl': cuebx wants 1000, the broker has 2000; "
        "argument 'x-queue-type': cuebx wants 'quorum', the broker has 'classic'; "
        "argument 'x-overflow': cuebx wants 'reject-publish', the broker has none"
    )
    assert describe_differences([]) == ""
