"""The bus remembers, per topic, which subscriptions a topic matches (``Bus._matching``): the answer must
stay paho's ``topic_matches_sub`` for every filter and topic (``+``, ``#``, ``$`` topics not matched by a
leading wildcard), in subscription order, also after subscriptions are added between messages."""

from __future__ import annotations

from datetime import timedelta

import paho.mqtt.client as mqtt
from hypothesis import given, settings
from hypothesis import strategies as st

from chargegate import bus as busmod
from chargegate import payloads as p
from chargegate.bus import Bus, BusSettings, Message
from chargegate.topics import Registry

LEVELS = st.sampled_from(["a", "b", "c", "$SYS", "$x", "", "evse", "wb1", "status"])
FILTER_LEVELS = st.one_of(LEVELS, st.just("+"))


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(FILTER_LEVELS, min_size=0, max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    return "/".join(levels)


topics = st.lists(LEVELS, min_size=1, max_size=5).map("/".join)

# a program: ("sub", filter) adds a subscription (with wildcards or an exact topic: the bus keeps those apart),
# ("msg", topic) delivers a message
steps = st.lists(st.one_of(st.tuples(st.just("sub"), topic_filters()), st.tuples(st.just("sub"), topics),
                           st.tuples(st.just("msg"), topics)),
                 min_size=1, max_size=40)


def new_bus() -> Bus:
    return Bus("load-controller", Registry(), BusSettings())


@settings(max_examples=400, deadline=None)
@given(steps)
def test_dispatch_matches_paho(program: list[tuple[str, str]]) -> None:
    bus = new_bus()
    filters: list[str] = []
    got: list[tuple[int, str]] = []
    for kind, arg in program:
        if kind == "sub":
            index = len(filters)
            filters.append(arg)
            bus.subscribe_raw(arg, lambda topic, payload, retained, index=index: got.append((index, topic)))
        else:
            got.clear()
            bus._dispatch(arg, b"x", False)
            expected = [(i, arg) for i, f in enumerate(filters) if mqtt.topic_matches_sub(f, arg)]
            assert got == expected, (filters, arg)
            # and again, from the cache
            got.clear()
            bus._dispatch(arg, b"x", False)
            assert got == expected, (filters, arg)


@given(st.lists(topic_filters() | topics, min_size=1, max_size=8), st.lists(topics, min_size=1, max_size=20))
def test_matching_is_paho_in_subscription_order(filters: list[str], seen: list[str]) -> None:
    bus = new_bus()
    for f in filters:
        bus.subscribe_raw(f, lambda *a: None)
    for topic in seen + seen:
        assert [s.filter for s in bus._matching(topic)] == [f for f in filters if mqtt.topic_matches_sub(f, topic)]


def test_cache_is_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(busmod, "MATCH_CACHE_SIZE", 10)
    bus = new_bus()
    bus.subscribe_raw("x/+", lambda *a: None)
    for i in range(25):
        assert len(bus._matching(f"x/{i}")) == 1
        assert len(bus._matches) <= 10
    assert bus._matching("y/1") == ()


def test_typed_subscriptions_through_the_cache() -> None:
    bus = new_bus()
    reg = bus.registry
    statuses: list[Message] = []
    setpoints: list[Message] = []
    bus.subscribe("evse.status", statuses.append)
    topic = reg.topic("evse.setpoint", evse_id="wb1")
    sp = p.Setpoint(evse_id="wb1", current_a=10, phases=3, valid_until=p.utcnow() + timedelta(seconds=10), seq=1)
    bus._dispatch(topic, sp.to_json(), True)
    assert statuses == [] and setpoints == []
    bus.subscribe("evse.setpoint", setpoints.append, evse_id="wb1")  # added later: the cached answer is dropped
    bus._dispatch(topic, sp.to_json(), True)
    assert [m.payload for m in setpoints] == [sp] and setpoints[0].params == {"evse_id": "wb1"}
    assert setpoints[0].retained
    bus._dispatch(reg.topic("evse.setpoint", evse_id="wb2"), sp.to_json(), False)
    assert len(setpoints) == 1


def _setpoint(evse: str, amps: float = 10) -> bytes:
    return p.Setpoint(evse_id=evse, current_a=amps, phases=3, valid_until=p.utcnow() + timedelta(seconds=10),
                      seq=1).to_json()


def test_per_evse_subscriptions_and_unsubscribe() -> None:
    """A service that follows its own EVSEs subscribes each by its own topic: every message goes to the
    subscriptions of its topic and the matching wildcards, in subscription order; ``unsubscribe`` drops that
    EVSE's subscriptions only (and tells the broker only when no other subscription uses the filter)."""
    bus = new_bus()
    reg = bus.registry
    got: list[tuple[str, str]] = []
    bus.subscribe("evse.setpoint", lambda m: got.append(("wb1", m.params["evse_id"])), evse_id="wb1")
    bus.subscribe("evse.setpoint", lambda m: got.append(("any", m.params["evse_id"])))
    bus.subscribe("evse.setpoint", lambda m: got.append(("wb2", m.params["evse_id"])), evse_id="wb2")
    bus.subscribe("evse.setpoint", lambda m: got.append(("wb1 again", m.params["evse_id"])), evse_id="wb1")
    for evse in ("wb1", "wb2", "wb3"):
        bus._dispatch(reg.topic("evse.setpoint", evse_id=evse), _setpoint(evse), False)
    assert got == [("wb1", "wb1"), ("any", "wb1"), ("wb1 again", "wb1"), ("any", "wb2"), ("wb2", "wb2"),
                   ("any", "wb3")]
    got.clear()
    assert bus.unsubscribe("evse.setpoint", evse_id="wb1") == 2
    assert bus.unsubscribe("evse.setpoint", evse_id="wb1") == 0
    assert bus.unsubscribe("evse.status", evse_id="wb2") == 0  # another topic's filter: nothing to drop
    for evse in ("wb1", "wb2"):
        bus._dispatch(reg.topic("evse.setpoint", evse_id=evse), _setpoint(evse), False)
    assert got == [("any", "wb1"), ("any", "wb2"), ("wb2", "wb2")]
    got.clear()
    # subscribed again after the unsubscribe: last in order
    bus.subscribe("evse.setpoint", lambda m: got.append(("wb1 new", m.params["evse_id"])), evse_id="wb1")
    bus._dispatch(reg.topic("evse.setpoint", evse_id="wb1"), _setpoint("wb1"), False)
    assert got == [("any", "wb1"), ("wb1 new", "wb1")]


def test_unsubscribe_tells_the_broker_when_the_filter_is_unused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    bus = new_bus()
    sent: list[str] = []
    monkeypatch.setattr(bus._client, "subscribe", lambda *a, **k: (0, 1))
    monkeypatch.setattr(bus._client, "unsubscribe", lambda f: sent.append(f))
    bus.connected.set()
    bus.subscribe("evse.setpoint", lambda m: None, evse_id="wb1")
    bus.subscribe_raw(bus.registry.subscription("evse.setpoint", evse_id="wb1"), lambda *a: None)
    bus.unsubscribe("evse.setpoint", evse_id="wb1")
    assert sent == []  # the raw subscription of the same filter is still there
    bus.subscribe("evse.setpoint", lambda m: None, evse_id="wb2")
    bus.unsubscribe("evse.setpoint", evse_id="wb2")
    assert sent == [bus.registry.subscription("evse.setpoint", evse_id="wb2")]


def test_resubscribe_on_connect_in_few_packets(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """After a (re)connect every filter is subscribed again, in SUBSCRIBE packets of up to SUBSCRIBE_CHUNK
    filters (a poller instance of a car park follows hundreds of EVSEs, two topics each)."""
    monkeypatch.setattr(busmod, "SUBSCRIBE_CHUNK", 3)
    bus = new_bus()
    for i in range(7):
        bus.subscribe("evse.setpoint", lambda m: None, evse_id=f"wb{i}")
    bus.subscribe("evse.status", lambda m: None)
    packets: list[list[tuple[str, int]]] = []
    monkeypatch.setattr(bus._client, "subscribe", lambda topics, *a, **k: packets.append(topics) or (0, 1))
    bus._subscribe_all(bus._client, {s.filter for s in bus._subs})
    assert [len(x) for x in packets] == [3, 3, 2]
    assert sorted(f for x in packets for f, _ in x) == sorted({s.filter for s in bus._subs})
    assert {q for x in packets for _, q in x} == {1}
