"""streamer.guard's pure parts with fixed values: the server's tests and the soak harness share them."""

import pytest
from aiohttp.test_utils import make_mocked_request

from streamer.guard import Access, json_depth, loads, normal_origin, server_names


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('["[[[[", "]]"]', 1),  # brackets inside strings do not count
        ('["a\\"[[[", 2]', 1),  # nor after an escaped quote
        ("[" * 40 + "]" * 40, 40),
        ("[[]][[[]]]", 3),
    ],
)
def test_json_depth(text, depth):
    assert json_depth(text) == depth


def test_loads_refuses_deep_nesting_nan_and_non_json_by_name():
    assert loads('{"type": "cut"}', "control message") == {"type": "cut"}
    assert loads("[" * 32 + "]" * 32, "x") is not None
    with pytest.raises(ValueError, match=r"^body nests 33 levels deep; at most 32 are allowed$"):
        loads("[" * 33 + "]" * 33, "body")
    with pytest.raises(ValueError, match="nests 100000 levels deep"):  # checked before parsing: no RecursionError
        loads("[" * 100_000, "body")
    with pytest.raises(ValueError, match="Infinity is not a JSON number"):
        loads('{"strength": Infinity}', "control message")
    with pytest.raises(ValueError, match=r"^control message is not JSON: Expecting value at position 0$"):
        loads("oops", "control message")
    with pytest.raises(ValueError, match=r"body is not allowed: .*digits"):
        loads("1" * 5000, "body")


def test_server_names():
    assert server_names("127.0.0.1") == {"127.0.0.1", "localhost"}
    assert server_names("::1") == {"::1", "localhost"}
    assert server_names("192.0.2.7") == {"192.0.2.7"}
    assert server_names("192.0.2.7", extra=["Studio.Example"]) == {"192.0.2.7", "studio.example"}
    wildcard = server_names("0.0.0.0", interfaces=["192.0.2.7", "198.51.100.1"])
    assert {"192.0.2.7", "198.51.100.1", "127.0.0.1", "localhost"} <= wildcard and "0.0.0.0" in wildcard


def test_normal_origin():
    assert normal_origin("HTTPS://Studio.Example:8443/") == "https://studio.example:8443"
    for bad in ("studio.example", "ftp://x", "https://x/path", "null"):
        with pytest.raises(ValueError, match=f"--allow-origin={bad!r} is not allowed"):
            normal_origin(bad)


def refusal(access, **headers):
    refused = access.refuse(make_mocked_request("POST", "/api/offer", headers=headers))
    return None if refused is None else refused.status


def test_access_same_origin_and_named_hosts():
    access = Access(server_names("127.0.0.1"), frozenset({"https://studio.example"}))
    assert refusal(access) is None  # curl, scripts, aiortc: no Host check without one, no Origin
    assert refusal(access, Host="127.0.0.1:8080") is None
    assert refusal(access, Host="localhost:8080", Origin="http://localhost:8080") is None
    assert refusal(access, Host="127.0.0.1:8080", Origin="http://127.0.0.1:9999") == 403  # another port
    assert refusal(access, Host="127.0.0.1:8080", Origin="http://evil.example") == 403
    assert refusal(access, Host="127.0.0.1:8080", Origin="null") == 403
    assert refusal(access, Host="127.0.0.1:8080", Origin="https://studio.example") is None
    assert refusal(access, Host="evil.example:8080", Origin="http://evil.example:8080") == 421  # DNS rebinding
    assert refusal(access, Host="127.0.0.1.evil.example") == 421
    assert refusal(access, Host="[::1]:8080") == 421  # bound to IPv4 loopback only


def test_a_prompt_must_be_text_that_encodes():
    from pipeline.types import UserParams

    assert UserParams(prompt="phare à l'aube 🌊").prompt.endswith("🌊")
    with pytest.raises(ValueError, match=r"'\\ud800' at position 3 is not a character \(a lone surrogate\)"):
        UserParams(prompt="sea\ud800")
