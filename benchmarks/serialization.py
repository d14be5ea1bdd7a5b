"""Benchmark: encoding and decoding one ~400-byte event, stdlib json vs orjson vs msgspec.

Run: ``python benchmarks/serialization.py [--rounds 15] [--number 2000] [--json out.json]``

Cases run interleaved (A B C ... A B C ...) so that machine noise hits all of them alike;
each round times ``number`` calls; the table shows the median, min and max per call over the
rounds and the ratio of the median to the baseline of its group (plain stdlib ``json`` on
the same data, measured in the same run). Ratios below 1.0 are faster than the baseline.
"""

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from cqrskit.messages import Event
from cqrskit.serialization import EventTypes, JsonSerializer, OrjsonSerializer


@dataclass(frozen=True, slots=True)
class Line:
    sku: str
    quantity: int
    price: Decimal


@dataclass(frozen=True, slots=True)
class OrderPlaced(Event):
    order_id: uuid.UUID
    customer_id: str
    customer_name: str
    placed_at: datetime
    currency: str
    lines: list[Line]
    shipping_address: str
    note: str | None = None


EVENT = OrderPlaced(
    order_id=uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e"),
    customer_id="cust-000042",
    customer_name="Ada Lovelace",
    placed_at=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
    currency="EUR",
    lines=[
        Line("SKU-1000-RED", 2, Decimal("19.99")),
        Line("SKU-2000-BLUE", 1, Decimal("249.00")),
        Line("SKU-3000-GREEN", 5, Decimal("3.50")),
    ],
    shipping_address="12 Engine Road, London",
    note="Leave it with the neighbour.",
)


def cases() -> dict[str, dict[str, Callable[[], object]]]:
    types = EventTypes()
    types.register(OrderPlaced, "order.placed")
    std = JsonSerializer(types)
    encoded = std.encode(EVENT)
    text = encoded.data
    plain = json.loads(text)  # the same data as plain dicts, for the raw codecs
    groups: dict[str, dict[str, Callable[[], object]]] = {
        "encode": {
            "json.dumps (baseline)": lambda: json.dumps(plain, separators=(",", ":")),
            "JsonSerializer.encode": lambda: std.encode(EVENT),
        },
        "decode": {
            "json.loads (baseline)": lambda: json.loads(text),
            "JsonSerializer.decode": lambda: std.decode("order.placed", 1, text),
        },
    }
    try:
        import orjson

        fast = OrjsonSerializer(types)
        assert fast.encode(EVENT) == encoded
        groups["encode"]["orjson.dumps (raw)"] = lambda: orjson.dumps(plain)
        groups["encode"]["OrjsonSerializer.encode"] = lambda: fast.encode(EVENT)
        groups["decode"]["orjson.loads (raw)"] = lambda: orjson.loads(text)
        groups["decode"]["OrjsonSerializer.decode"] = lambda: fast.decode("order.placed", 1, text)
    except ImportError:
        print("orjson not installed: skipped", file=sys.stderr)
    try:
        import msgspec

        class MLine(msgspec.Struct, frozen=True):
            sku: str
            quantity: int
            price: Decimal

        class MOrder(msgspec.Struct, frozen=True):
            order_id: uuid.UUID
            customer_id: str
            customer_name: str
            placed_at: datetime
            currency: str
            lines: list[MLine]
            shipping_address: str
            note: str | None = None

        encoder = msgspec.json.Encoder()
        decoder = msgspec.json.Decoder(MOrder)
        typed = decoder.decode(text)
        groups["encode"]["msgspec typed (raw)"] = lambda: encoder.encode(typed)
        groups["decode"]["msgspec typed (raw)"] = lambda: decoder.decode(text)
    except ImportError:
        print("msgspec not installed: skipped", file=sys.stderr)
    return groups


def measure(
    groups: dict[str, dict[str, Callable[[], object]]], rounds: int, number: int
) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {
        g: {name: [] for name in fns} for g, fns in groups.items()
    }
    for _ in range(rounds):
        for group, fns in groups.items():
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(number):
                    fn()
                samples[group][name].append((time.perf_counter() - start) / number * 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    groups = cases()
    size = len(JsonSerializer(_registry()).encode(EVENT).data.encode())
    samples = measure(groups, args.rounds, args.number)
    print(f"event payload: {size} bytes; {args.rounds} rounds x {args.number} calls")
    print(f"{'case':<28} {'median µs':>10} {'min µs':>8} {'max µs':>8} {'ratio':>7}")
    results = []
    for group, by_name in samples.items():
        baseline = statistics.median(next(iter(by_name.values())))
        print(f"-- {group}")
        for name, values in by_name.items():
            med = statistics.median(values)
            row = {
                "group": group,
                "case": name,
                "median_us": med,
                "min_us": min(values),
                "max_us": max(values),
                "ratio": med / baseline,
            }
            results.append(row)
            print(
                f"{name:<28} {med:>10.2f} {min(values):>8.2f} {max(values):>8.2f} "
                f"{med / baseline:>6.2f}x"
            )
    if args.json:
        args.json.write_text(json.dumps({"payload_bytes": size, "results": results}, indent=2))


def _registry() -> EventTypes:
    types = EventTypes()
    types.register(OrderPlaced, "order.placed")
    return types


if __name__ == "__main__":
    main()
