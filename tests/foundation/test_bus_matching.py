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

# a program: ("sub", filter) adds a subscription, ("msg", topic) delivers a message
steps = st.lists(st.one_of(st.tuples(st.just("sub"), topic_filters()), st.tuples(st.just("msg"), topics)),
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


@given(st.lists(topic_filters(), min_size=1, max_size=8), st.lists(topics, min_size=1, max_size=20))
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
