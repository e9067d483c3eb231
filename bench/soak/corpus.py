"""The control-message fuzz corpus: a fixed list of hostile messages, the same for the same seed.

Every message must get an answer (``{"type": "ack"|"error", ...}``) on the "control" channel; one
over ``CONTROL_LIMIT`` bytes may get its channel closed instead (after an error reply). The fixed
cases cover each category once; ``size`` more are drawn at random from the categories with ``seed``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
from dataclasses import dataclass

CONTROL_LIMIT = 16384  # bytes: the server's control message limit
WIRES = ("text", "binary", "raw")  # raw: sent as text (PPID 51) but the bytes need not be UTF-8


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    payload: str | bytes
    wire: str = "text"
    expect: str | None = None  # the answer it must get ("ack" or "error"); None: any answer
    names: str = ""  # what an error answer's message must name (the field), if anything

    @property
    def size(self) -> int:
        return len(self.payload.encode("utf-8", "surrogatepass") if isinstance(self.payload, str) else self.payload)

    @property
    def over_limit(self) -> bool:
        return self.size > CONTROL_LIMIT


def prompt_of_bytes(n: int, char: str = "x") -> str:
    """``{"type": "prompt", "prompt": "xxx..."}`` of exactly ``n`` bytes (``char`` of 1 or 2 bytes)."""
    head, tail = '{"type": "prompt", "prompt": "', '"}'
    room = n - len(head) - len(tail)
    width = len(char.encode())
    return head + char * (room // width) + "x" * (room % width) + tail


def nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a":' * depth + "1" + "}" * depth
    return '[{"a":' * (depth // 2) + "1" + "}]" * (depth // 2)  # mixed


# categories whose every fixed case is refused (an "error" answer), and the valid ones (an "ack")
REFUSED = ("deep", "not_json", "wrong_types", "unknown", "nan", "huge", "empty", "binary", "non_utf8", "limit")


def fixed_cases() -> list[Case]:
    """Each category once; each refused or valid case says what it must be answered."""
    return [
        dataclasses.replace(c, expect="error" if c.category in REFUSED else "ack" if c.category == "valid" else None)
        for c in _fixed_cases()
    ]


def _fixed_cases() -> list[Case]:
    deep = [Case("deep", f"{k} {d}", nested(d, k)) for k in ("array", "object", "mixed") for d in (33, 1000)]
    deep += [Case("deep", "array 5000", nested(5000, "array")), Case("deep", "object 5000", nested(5000, "object"))]
    deep += [Case("deep", "prompt of 1000-deep arrays", '{"type": "prompt", "prompt": ' + nested(1000, "array") + "}")]
    deep += [Case("deep", "params of 2000-deep objects", '{"type": "params", "seed": ' + nested(2000, "object") + "}")]
    return [
        *deep,
        Case("not_json", "text", "hello"),
        Case("not_json", "truncated", '{"type": "prompt", "prompt": "a'),
        Case("not_json", "single quotes", "{'type': 'cut'}"),
        Case("not_json", "trailing comma", '{"type": "cut",}'),
        Case("not_json", "control bytes", "\x00\x01\x02\x1b[2J"),
        Case("wrong_types", "array", "[]"),
        Case("wrong_types", "number", "42"),
        Case("wrong_types", "string", '"cut"'),
        Case("wrong_types", "null", "null"),
        Case("wrong_types", "type number", '{"type": 5}'),
        Case("wrong_types", "type null", '{"type": null}'),
        Case("wrong_types", "prompt number", '{"type": "prompt", "prompt": 5}'),
        Case("wrong_types", "prompt object", '{"type": "prompt", "prompt": {"a": 1}}'),
        Case("wrong_types", "seed string", '{"type": "params", "seed": "seven"}'),
        Case("wrong_types", "strength list", '{"type": "params", "strength": [0.5]}'),
        Case("wrong_types", "seed bool", '{"type": "params", "seed": true}'),
        Case("unknown", "type", '{"type": "reboot"}'),
        Case("unknown", "field on prompt", '{"type": "prompt", "prompt": "a", "extra": 1}', names="'extra'"),
        Case("unknown", "field on params", '{"type": "params", "colour": "red"}'),
        Case("unknown", "field on cut", '{"type": "cut", "now": true}', names="'now'"),
        Case("nan", "NaN", "NaN"),
        Case("nan", "strength NaN", '{"type": "params", "strength": NaN}'),
        Case("nan", "strength Infinity", '{"type": "params", "strength": Infinity}'),
        Case("nan", "seed -Infinity", '{"type": "params", "seed": -Infinity}'),
        Case("nan", "seed 1e400", '{"type": "params", "seed": 1e400}'),
        Case("nan", "seed of 5000 digits", '{"type": "params", "seed": ' + "9" * 5000 + "}"),
        Case("nan", "strength of 401 digits", '{"type": "params", "strength": 1' + "0" * 400 + "}", names="strength="),
        Case("nan", "seed of 401 digits", '{"type": "params", "seed": 1' + "0" * 400 + "}", names="seed="),
        Case(
            "nan", "strength of -401 digits", '{"type": "params", "strength": -1' + "0" * 400 + "}", names="strength="
        ),
        Case("huge", "prompt of 10000 chars", json.dumps({"type": "prompt", "prompt": "y" * 10000})),
        Case("huge", "key of 10000 chars", json.dumps({"type": "params", "k" * 10000: 1})),
        Case("unicode", "lone surrogate", '{"type": "prompt", "prompt": "\\ud800"}'),
        Case("unicode", "nul in prompt", '{"type": "prompt", "prompt": "a\\u0000b"}'),
        Case(
            "unicode", "right-to-left", json.dumps({"type": "prompt", "prompt": "\u202eabc\u05d0"}, ensure_ascii=False)
        ),
        Case("empty", "text", ""),
        Case("empty", "binary", b"", "binary"),
        Case("empty", "object", "{}"),
        Case("binary", "json as binary", b'{"type": "cut"}', "binary"),
        Case("binary", "not utf-8", b"\xff\xfe\xfd\x80", "binary"),
        Case("non_utf8", "text bytes ff", b"\xff\xfe", "raw"),
        Case("non_utf8", "prompt with a bad byte", b'{"type": "prompt", "prompt": "\xc3\x28"}', "raw"),
        Case("valid", "prompt", '{"type": "prompt", "prompt": "a red fox in snow"}'),
        Case("valid", "params", '{"type": "params", "seed": 7, "strength": 0.5}'),
        Case("valid", "cut", '{"type": "cut"}'),
        Case("limit", "16384 bytes", prompt_of_bytes(CONTROL_LIMIT)),
        Case("limit", "16384 bytes of 2-byte chars", prompt_of_bytes(CONTROL_LIMIT, "\u00e9")),
        Case("limit", "16385 bytes", prompt_of_bytes(CONTROL_LIMIT + 1)),
        Case("limit", "16386 bytes of 2-byte chars", prompt_of_bytes(CONTROL_LIMIT + 2, "\u00e9")),
        Case("limit", "100000 bytes", prompt_of_bytes(100_000)),
        Case("limit", "262145 bytes", prompt_of_bytes(262_145)),
        Case("limit", "binary 20000 bytes", b"\x00" * 20_000, "binary"),
    ]


def random_case(rng: random.Random, i: int) -> Case:
    """One message drawn from the categories, its content random."""
    kind = rng.choice(["not_json", "wrong_types", "unknown", "deep", "binary", "valid", "huge", "nan", "mutant"])
    name = f"random {i}"
    if kind == "not_json":
        return Case(kind, name, "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 200))))
    if kind == "wrong_types":
        value = rng.choice([None, True, 3, -1.5, "s", [1, 2], {"a": None}])
        field = rng.choice(["type", "prompt", "seed", "strength"])
        return Case(kind, name, json.dumps({"type": "params", field: value} if field != "type" else {"type": value}))
    if kind == "unknown":  # a field no message has, or a type there is not: refused, whatever the type
        payload = json.dumps({"type": rng.choice(["prompt", "params", "cut", "x"]), "zz": rng.random()})
        return Case(kind, name, payload, expect="error")
    if kind == "deep":
        shape = rng.choice(["array", "mixed"])  # under the limit: 2 bytes a level, 4 (mixed)
        return Case(kind, name, nested(rng.randint(33, 5000 if shape == "array" else 2000), shape))
    if kind == "binary":
        return Case(kind, name, rng.randbytes(rng.randint(1, 2000)), "binary")
    if kind == "valid":
        return Case(kind, name, json.dumps(rng.choice([{"type": "prompt", "prompt": f"soak {i}"}, {"type": "cut"}])))
    if kind == "huge":
        return Case(kind, name, json.dumps({"type": "prompt", "prompt": "z" * rng.randint(2001, 16000)}))
    if kind == "nan":
        value = rng.choice(["NaN", "Infinity", "-Infinity", "1" + "0" * rng.randint(309, 4000)])
        return Case(kind, name, '{"type": "params", "strength": ' + value + "}", expect="error")
    valid = bytearray(b'{"type": "params", "seed": 3}')  # mutant: one byte of a valid message changed
    valid[rng.randrange(len(valid))] = rng.randrange(32, 127)
    return Case("mutant", name, valid.decode())


def corpus(seed: int, size: int) -> list[Case]:
    """The fixed cases and ``size`` random ones, in an order shuffled by ``seed``."""
    rng = random.Random(seed)
    cases = fixed_cases() + [random_case(rng, i) for i in range(size)]
    rng.shuffle(cases)
    return cases
