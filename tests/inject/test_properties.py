"""Properties of injection over generated input (Hypothesis): any pod-shaped input is either
refused as Unsupported or injected; a second pass never changes an injected pod; and the
webhook's review answers every JSON body with a 400 (BadReview) or an allowed response,
never an exception."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.inject import pod as podlib
from sidecar.inject.webhook import BadReview, Injector

NAMES = st.sampled_from(["app", "web", "sidecar", "connection-sidecar", "worker", "init"])
ENV_NAMES = st.sampled_from(["HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "LOG", "X"])
env = st.lists(st.fixed_dictionaries({"name": ENV_NAMES, "value": st.text(max_size=5)}),
               max_size=4)  # fmt: skip
container = st.fixed_dictionaries(
    {"name": NAMES, "image": st.just("img:1")},
    optional={"env": env, "ports": st.lists(st.fixed_dictionaries(
        {"containerPort": st.sampled_from([80, 8080, 15020, 15001])}), max_size=2)},
)  # fmt: skip
annotations = st.dictionaries(
    st.sampled_from(["connection-sidecar.io/inject", "connection-sidecar.io/config",
                     "connection-sidecar.io/proxy-env", "prometheus.io/port", "team"]),
    st.sampled_from(["true", "false", "cm", "9102", "x"]), max_size=3)  # fmt: skip
pods = st.fixed_dictionaries(
    {"metadata": st.fixed_dictionaries({}, optional={"annotations": annotations}),
     "spec": st.fixed_dictionaries(
         {"containers": st.lists(container, min_size=1, max_size=3,
                                 unique_by=lambda c: c["name"])},
         optional={"initContainers": st.lists(container, max_size=2,
                                              unique_by=lambda c: c["name"]),
                   "terminationGracePeriodSeconds": st.integers(0, 600),
                   "restartPolicy": st.sampled_from(["Always", "OnFailure", "Never"]),
                   "hostNetwork": st.booleans()})},
)  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=pods, native=st.booleans(), config_map=st.sampled_from([None, "cm"]))
def test_injecting_twice_changes_nothing(pod: dict[str, Any], native: bool,
                                         config_map: str | None) -> None:  # fmt: skip
    s = podlib.Settings(native=native, config_map=config_map)
    frozen = copy.deepcopy(pod)
    try:
        once = podlib.inject(pod, s)
    except podlib.Unsupported:
        return
    assert pod == frozen
    assert once.result in podlib.RESULTS
    twice = podlib.inject(once.pod, s)
    assert twice.pod == once.pod
    if once.result == podlib.INJECTED:
        assert (twice.result, twice.reason) == (podlib.ALREADY_INJECTED, "unchanged")

    def ours(p: dict[str, Any]) -> int:
        spec = p["spec"]
        names = [c["name"] for c in [*spec.get("initContainers", []), *spec["containers"]]]
        return names.count(podlib.CONTAINER)

    if once.result == podlib.INJECTED:
        assert (ours(pod), ours(once.pod)) == (0, 1)
    else:
        assert ours(once.pod) == ours(pod)


@settings(max_examples=300, deadline=None)
@given(obj=json_values | pods, kind=json_values | st.just({"group": "", "kind": "Pod"}),
       extra=st.dictionaries(st.sampled_from(["operation", "subResource", "namespace"]),
                             json_values, max_size=2))  # fmt: skip
def test_review_never_raises_anything_but_bad_review(obj: Any, kind: Any,
                                                     extra: dict[str, Any]) -> None:  # fmt: skip
    injector = Injector(podlib.Settings())
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": kind, "operation": "CREATE", "object": obj,
                        **extra}}  # fmt: skip
    try:
        answer = injector.review(body, require_opt_in=False)
    except BadReview:
        return
    response = answer["response"]
    assert response["uid"] == "u" and response["allowed"] is True
    if "patch" in response:
        import base64
        import json

        ops = json.loads(base64.b64decode(response["patch"]))
        jsonpatch.apply_patch(obj, ops)  # applies cleanly to the object it was made for
