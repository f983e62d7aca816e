#!/usr/bin/env python3
"""Writes realistic Segment S3-destination archives: OUT/<source-id>/<received-day-ms>/<file>.gz.

Same arguments, same bytes (one seeded random.Random, gzip with mtime 0). Streams file by
file: memory holds the user pool, never the lines. Needs only the stdlib and orjson.

    python samples/generate.py --out samples/segment-logs              # the committed sample
    python samples/generate.py --out bench-data --lines 1000000 --users 50000 --no-bad
"""

from __future__ import annotations

import argparse
import gc
import gzip
import queue
import random
import sys
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

DAY_MS = 86_400_000
START_DAY_MS = 1_709_596_800_000  # 2024-03-05T00:00:00Z: the first received-day folder
SAMPLE_LINES = 400
SAMPLE_USERS = 40
DEFAULT_SEED = 20240305
DUPLICATE_RATE = 0.015  # Segment delivers at least once; archives keep the repeats
ANONYMOUS_RATE = 0.14  # web and mobile lines from visitors who never logged in
LATE_RATE = 0.05  # mobile lines sent from an offline queue, days after they happened
COMPRESS_LEVEL = 6  # gzip's default, as Segment's files
_CHUNK_LINES = 2000

# --- Vocabulary ---------------------------------------------------------------------------
# fmt: off

# Every spelling mapping.md names, then one it does not: users 0..16 get these in order.
GENDERS = ["Male", "f", "female", "Woman", "w", "M", "man", "o", "Other", "non-binary",
           "nonbinary", "n", "not applicable", "p", "prefer not to say", "F", "attack helicopter"]
_COMMON_GENDERS = ["male", "female", "Male", "Female", "m", "f", "non-binary", None]
# A date, datetimes (one whose UTC date is the next day), one nobody can parse: users 0..4.
BIRTHDAYS = ["1990-04-12", "1988-07-01T00:00:00.000Z", "1985-11-30T23:30:00-05:00",
             "1979-02-03T10:00:00Z", "sometime in the 90s"]
_FIRST = ["Ana", "José", "Zoë", "Søren", "Mei", "Liam", "Priya", "Noah", "Fatima", "Olu",
          "Emma", "Lukas", "Chloé", "Hiro", "Sara", "Mateo", "Ingrid", "Kofi", "Yara", "Ben"]
_LAST = ["Lopez", "García", "Müller", "Nakamura", "O'Brien", "Smith", "Kowalski", "Okafor",
         "Dubois", "Rossi", "Jensen", "Chen", "Silva", "Novak", "Haddad", "Walsh"]
_CITIES = [("San Francisco", "US", "CA", "94107"), ("New York", "United States", "NY", "10001"),
           ("Berlin", "Germany", "BE", "10115"), ("München", "DE", "BY", "80331"),
           ("Paris", "France", "IDF", "75002"), ("Tokyo", "Japan", "13", "100-0001"),
           ("São Paulo", "Brazil", "SP", "01310-100"), ("London", "GB", "ENG", "EC1A 1BB")]
_STREETS = ["1 Main St", "221B Baker Street", "Unter den Linden 5", "12 rue de Rivoli"]
_PLANS = ["free", "basic", "pro", "premium", "enterprise"]
_TAGS = ["beta", "newsletter", "vip", "churn-risk", "mobile-first", "early-adopter"]
_PHONE_STYLES = ["+1415555{:04d}", "(415) 555-{:04d}", "+44 20 7946 {:04d}", "+49 30 1234{:04d}"]
_USER_AGENTS = [
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/122.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/121.0.0.0 Safari/537.36 Edg/121.0.0.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_3_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.3 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:123.0) Gecko/20100101 Firefox/123.0",
]
_LOCALES = ["en-US", "en-GB", "de-DE", "fr-FR", "ja-JP", "pt-BR", "es-ES"]
_TIMEZONES = ["America/Los_Angeles", "America/New_York", "Europe/Berlin", "Asia/Tokyo"]
_LIB_AJS = {"name": "analytics.js", "version": "npm:next-1.64.0"}
_LIB_IOS = {"name": "analytics-ios", "version": "4.1.8"}
_LIB_ANDROID = {"name": "analytics-android", "version": "4.11.3"}
_LIB_PYTHON = {"name": "analytics-python", "version": "2.3.2"}
_LIB_ENGAGE = {"name": "unknown", "version": "unknown"}
_APP = {"name": "Acme Shop", "version": "5.12.0", "build": "5120", "namespace": "com.acme.shop"}
_IOS_DEVICES = [("Apple", "iPhone15,2"), ("Apple", "iPhone14,5"), ("Apple", "iPad13,1")]
_ANDROID_DEVICES = [("samsung", "SM-S911B"), ("Google", "Pixel 8"), ("OnePlus", "CPH2449")]
_NETWORKS = [{"wifi": True, "cellular": False},
             {"wifi": False, "cellular": True, "carrier": "T-Mobile"}]
_PAGES = [("Home", None, "/"), ("Pricing", None, "/pricing"),
          ("Getting Started", "Docs", "/docs/start"), ("Trail Runner", "Products", "/p/trail"),
          ("Blog", None, "/blog"), ("Checkout", "Shop", "/checkout"), ("Account", None, "/account")]
_SCREENS = ["Home", "Product Detail", "Cart", "Checkout", "Settings", "Player", "Search"]
_PRODUCTS = [  # product_id, sku, name, category, price
    (f"prod_{n:03d}", f"SKU-{1000 + n}", name, category, price)
    for n, (name, category, price) in enumerate(
        [("Trail Runner", "Shoes", 129.0), ("City Sneaker", "Shoes", 89.5),
         ("Rain Jacket", "Outerwear", 149.99), ("Wool Socks", "Accessories", 12.0),
         ("Day Pack", "Bags", 64.25), ("Water Bottle", "Accessories", 19.99),
         ("Running Cap", "Accessories", 24.0), ("Fleece", "Outerwear", 79.0),
         ("Yoga Mat", "Fitness", 39.9), ("Headlamp", "Gear", 44.0)], start=1)
]
# Segment ecommerce events that carry products but are not purchases.
_BROWSING_EVENTS = ["Product Viewed", "Product Added", "Cart Viewed", "Checkout Started",
                    "Product List Viewed", "Products Searched"]
_ENGAGE_TRAITS = {
    "lifetime_order_count": lambda r: r.randint(0, 40),
    "high_value_customer": lambda r: r.random() < 0.3,
    "last_product_viewed": lambda r: r.choice(_PRODUCTS)[2],
    "days_since_last_order": lambda r: r.randint(0, 400),
}
_ENGAGE_KEYS = list(_ENGAGE_TRAITS)
_LONG_TEXT = (  # over Braze's 255-character limit
    "Great shoes overall, but the sizing runs small; I ordered my usual size and had to "
    "exchange them. Customer service was quick and friendly about the exchange, and the "
    "second pair fits perfectly. Grip on wet rock is excellent, cushioning is firm. "
    "Would buy again."
)

# fmt: on


# --- Time ---------------------------------------------------------------------------------


_minutes: dict[int, str] = {}


def _iso(ms: int) -> str:
    """`2024-03-05T14:03:22.083Z`, as analytics.js and Segment's servers write."""
    minute, rest = divmod(ms, 60_000)
    prefix = _minutes.get(minute)
    if prefix is None:  # four times a line, a million lines: format each minute once
        if len(_minutes) > 100_000:
            _minutes.clear()
        t = time.gmtime(minute * 60)
        prefix = _minutes[minute] = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:"
        )
    return f"{prefix}{rest // 1000:02d}.{rest % 1000:03d}Z"


def _iso_offset(ms: int, hours: int, fraction: bool) -> str:
    """The same instant in local time with an offset, as server libraries send given times."""
    t = time.gmtime(ms // 1000 + hours * 3600)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", t)
    if fraction:
        text += f".{ms % 1000:03d}000"  # Python's isoformat(): microseconds
    return text + (f"+{hours:02d}:00" if hours >= 0 else f"-{-hours:02d}:00")


def _iso_seconds(ms: int) -> str:
    """`2024-03-05T14:03:22Z`: no fraction."""
    return _iso(ms)[:19] + "Z"


# --- Plumbing -----------------------------------------------------------------------------


class _Random(random.Random):
    """random.Random with a cheaper randint and choice: they run millions of times."""

    def randint(self, a: int, b: int) -> int:
        return a + int(self.random() * (b - a + 1))

    def choice(self, seq):  # type: ignore[override]
        return seq[int(self.random() * len(seq))]


class _GzipWriter:
    """Compresses on a worker thread (zlib releases the GIL) while the next lines are made."""

    def __init__(self, raw, level: int) -> None:
        self._gzip = gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=0
        )
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            if self._error is None:
                try:
                    self._gzip.write(chunk)
                except BaseException as error:  # re-raised in the caller's thread
                    self._error = error
        try:
            self._gzip.close()
        except BaseException as error:
            self._error = self._error or error

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._chunks.put(chunk)

    def close(self) -> None:
        self._chunks.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


# --- The generator ------------------------------------------------------------------------


@dataclass
class _Source:
    id: str
    write_key: str
    kind: str  # "web", "mobile" or "server": which libraries write to it


class _Person:
    """A user (user_id set) or an anonymous visitor (user_id None), with what they last sent."""

    __slots__ = (
        "index",
        "user_id",
        "anonymous_id",
        "ip",
        "ua",
        "locale",
        "mobile",
        "device",
        "os",
        "traits",
        "previous_traits",
        "identified",
        "snake",
    )

    def __init__(self, index: int, user_id: str | int | None, anonymous_id: str) -> None:
        self.index = index
        self.user_id = user_id
        self.anonymous_id = anonymous_id
        self.traits: dict | None = None
        self.previous_traits: dict | None = None
        self.identified = False
        self.snake = False


@dataclass
class _FilePlan:
    source: _Source
    start_ms: int  # the window of receivedAt times this file covers
    span_ms: int
    path: Path  # under the output folder
    plain: bool  # JSON lines under a .gz name, as S3 serves decompressed objects
    lines: int = 0


Line = dict | bytes  # a Segment call, or raw bytes for the deliberately broken lines


class _Generator:
    def __init__(self, seed: int, users: int, sources: int) -> None:
        self.rng = _Random(seed)
        kinds = ["web", "mobile", "server"]
        self.sources = [
            _Source(self._alnum(10), self._alnum(32), kinds[n % len(kinds)]) for n in range(sources)
        ]
        self.users = [self._new_user(n) for n in range(users)]
        self.visitors = [_Person(n, None, self._uuid()) for n in range(max(1, users // 2))]
        self.recent_here: deque[dict] = deque(maxlen=64)  # lines of the file being written
        self.recent_before: dict[str, deque[dict]] = {}  # per source: its earlier files' lines
        self.waiting: deque[tuple[str, Callable[[int, _Source], Line | None]]] = deque()
        self.engage_space = "spa_" + self._alnum(22)

    # -- identifiers

    def _alnum(self, n: int) -> str:
        return "".join(
            self.rng.choices("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=n)
        )

    def _uuid(self, upper: bool = False) -> str:
        h = f"{self.rng.getrandbits(128):032x}"
        text = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:]}"
        return text.upper() if upper else text

    def _new_user(self, n: int) -> _Person:
        rng = self.rng
        if n == 1:
            user_id: str | int = 12345
        elif rng.random() < 0.1:
            user_id = 20000 + n * 7
        else:
            user_id = f"usr_{n:05d}{self._alnum(6)}"
        return _Person(n, user_id, self._uuid())

    # -- people

    def _web(self, p: _Person) -> None:
        if getattr(p, "ip", None) is None:
            r = self.rng
            p.ip = (
                f"{r.randint(23, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"
            )
            p.ua = r.choice(_USER_AGENTS)
            p.locale = r.choice(_LOCALES)

    def _mobile(self, p: _Person) -> None:
        self._web(p)
        if getattr(p, "device", None) is None:
            r = self.rng
            ios = r.random() < 0.5
            maker, model = r.choice(_IOS_DEVICES if ios else _ANDROID_DEVICES)
            p.device = {
                "id": self._uuid(upper=ios),
                "manufacturer": maker,
                "model": model,
                "type": "ios" if ios else "android",
            }
            p.os = (
                {"name": "iOS", "version": "17.3.1"}
                if ios
                else {"name": "Android", "version": "14"}
            )
            p.mobile = _LIB_IOS if ios else _LIB_ANDROID

    def _base_traits(self, p: _Person) -> dict:
        """A user's profile: users 0..16 cover every gender spelling, 0..4 every birthday."""
        r = self.rng
        n = p.index
        first, last = r.choice(_FIRST), r.choice(_LAST)
        p.snake = n % 4 == 3
        local = unicodedata.normalize("NFKD", f"{first}.{last}{n}").encode("ascii", "ignore")
        email = local.decode().lower().replace("'", "") + "@example.com"
        if n == 2 or r.random() < 0.03:  # typed by hand, pasted with spaces
            email = f" {local.decode()}@Example.com  "
        city, country, state, postal = r.choice(_CITIES)
        traits = {
            ("first_name" if p.snake else "firstName"): first,
            ("last_name" if p.snake else "lastName"): last,
            "email": email,
            "phone": r.choice(_PHONE_STYLES).format(r.randint(0, 9999)),
            "birthday": BIRTHDAYS[n]
            if n < len(BIRTHDAYS)
            else f"19{r.randint(50, 99)}-0{r.randint(1, 9)}-1{r.randint(0, 9)}",
            "address": {
                "city": city,
                "country": country,
                "street": r.choice(_STREETS),
                "state": state,
                "postalCode": postal,
            },
            "gender": GENDERS[n] if n < len(GENDERS) else r.choice(_COMMON_GENDERS),
            "avatar": f"https://cdn.example.com/avatars/{n}.png",
            "plan": r.choice(_PLANS),
            "logins": r.randint(1, 50),
            "is_verified": r.random() < 0.7,
            "tags": r.sample(_TAGS, r.randint(0, 3)),
            "preferences": {
                "newsletter": r.random() < 0.5,
                "channels": {"email": True, "sms": r.random() < 0.3},
            },
            "referral_code": None,  # never set: a null that must not cost a data point
            ("created_at" if p.snake else "createdAt"): _iso(
                START_DAY_MS - r.randint(1, 900) * DAY_MS
            ),
        }
        if traits["gender"] is None:
            del traits["gender"]
        if r.random() < 0.5:
            traits["id"] = str(p.user_id)  # many apps repeat userId in traits
        return traits

    def _next_traits(self, p: _Person) -> dict:
        """Mostly the same values again; sometimes one trait changed."""
        if p.traits is None:
            p.traits = self._base_traits(p)
            return p.traits
        r = self.rng
        if r.random() < 0.85:
            return p.traits
        traits = dict(p.traits)
        change = r.randrange(6)
        if change == 0:
            traits["plan"] = r.choice([x for x in _PLANS if x != traits.get("plan")])
        elif change == 1:
            traits["logins"] = traits.get("logins", 0) + r.randint(1, 5)
        elif change == 2:
            city, country, state, postal = r.choice(_CITIES)
            traits["address"] = {
                **traits["address"],
                "city": city,
                "country": country,
                "state": state,
                "postalCode": postal,
            }
        elif change == 3:
            traits["is_verified"] = not traits.get("is_verified", False)
        elif change == 4:
            traits["tags"] = sorted(set(traits.get("tags", [])) | {r.choice(_TAGS)})
        else:  # a value set, later cleared with null
            traits["coupon_code"] = None if traits.get("coupon_code") else "SPRING24"
        p.previous_traits, p.traits = p.traits, traits
        return traits

    # -- the envelope every line shares

    def _call(
        self, kind: str, p: _Person, received: int, platform: str, src: _Source, late: bool = False
    ) -> dict:
        """The fields Segment's libraries and servers put on every call, for one platform."""
        r = self.rng
        if platform == "web" and src.kind == "mobile":
            platform = "mobile"  # a line placed on purpose: written as the app would
        if late:
            event = received - r.randint(DAY_MS, 6 * DAY_MS)
        else:
            event = received - r.randint(40, 20_000)
        send = received - r.randint(15, 900)
        skew = (
            r.choice((-185_000, 61_000, 3_600_000))
            if platform == "mobile" and r.random() < 0.1
            else 0
        )
        timestamp = _iso(event + received - send)  # Segment corrects the device's clock skew
        original = _iso(event + skew)
        sent: str | None = _iso(send + skew)
        channel, version, message_id = "client", 2, None
        if platform == "web":
            self._web(p)
            context: dict = {"ip": p.ip, "library": _LIB_AJS, "locale": p.locale, "userAgent": p.ua}
            message_id = f"ajs-next-{event}-{self._uuid()}"
        elif platform == "mobile":
            self._mobile(p)
            context = {
                "app": _APP,
                "device": p.device,
                "ip": p.ip,
                "library": p.mobile,
                "locale": p.locale,
                "network": r.choice(_NETWORKS),
                "os": p.os,
                "screen": {"width": 390, "height": 844, "density": 3},
                "timezone": _TIMEZONES[p.index % len(_TIMEZONES)],
            }
            channel = "mobile"
            message_id = self._uuid(upper=True)
        elif platform == "server":
            context = {"library": _LIB_PYTHON, "ip": "34.201.14.7"}
            channel, version = "server", "1.1"
            message_id = self._uuid()
            shape = r.random()
            if shape < 0.15:  # a historical time passed in by the caller, with its offset
                timestamp = original = _iso_offset(event, r.choice((2, -5, 9)), False)
            elif shape < 0.25:
                timestamp = original = _iso_seconds(event)
            else:
                original = _iso_offset(event, 0, True)
            if r.random() < 0.3:
                sent = None  # called the HTTP API directly
        else:  # engage
            key = r.choice(_ENGAGE_KEYS)
            context = {
                "library": _LIB_ENGAGE,
                "personas": {
                    "computation_class": "trait",
                    "computation_id": "tra_" + self._alnum(22),
                    "computation_key": key,
                    "namespace": self.engage_space,
                    "space_id": self.engage_space,
                },
            }
            channel = "server"
            message_id = "personas_" + self._alnum(27)
        line = {
            "anonymousId": p.anonymous_id,
            "context": context,
            "integrations": {},
            "messageId": message_id,
            "originalTimestamp": original,
            "projectId": src.id,
            "receivedAt": _iso(received),
            "sentAt": sent,
            "timestamp": timestamp,
            "type": kind,
            "userId": p.user_id,
            "writeKey": src.write_key,
            "version": version,
            "channel": channel,
        }
        if p.user_id is None:
            if platform == "mobile" or r.random() < 0.3:
                del line["userId"]  # some libraries leave it out instead of sending null
        elif isinstance(p.user_id, int) and platform != "server":
            line["userId"] = str(p.user_id)  # the browser sends strings, the backend numbers
        elif platform == "web" and r.random() < 0.02:
            line["userId"] = f" {p.user_id}  "  # a template that pads it
        if platform == "engage":
            line["integrations"] = {"All": False, "Amazon S3": True}
            if r.random() < 0.5:
                del line["anonymousId"]
        elif platform == "web" and r.random() < 0.1:
            line["integrations"] = {"All": True, "Mixpanel": False}
        return line

    # -- calls

    def identify(
        self, p: _Person, received: int, platform: str, src: _Source, late: bool = False
    ) -> dict:
        line = self._call("identify", p, received, platform, src, late)
        if p.user_id is None:
            line["traits"] = {"email": f"visitor{p.index}@example.org", "newsletter": True}
        elif late and p.previous_traits is not None:
            line["traits"] = dict(p.previous_traits)  # sent from the queue: what was true then
        else:
            traits = self._next_traits(p)
            if p.identified and self.rng.random() < 0.3:  # a partial update: a few traits
                keys = ["email", "plan", "logins"]
                traits = {k: traits[k] for k in keys if k in traits}
            line["traits"] = dict(traits)
        p.identified = True
        return line

    def engage(self, p: _Person, received: int, src: _Source) -> dict:
        line = self._call("identify", p, received, "engage", src)
        key = line["context"]["personas"]["computation_key"]
        value = _ENGAGE_TRAITS[key](self.rng)
        line["traits"] = {key: value}
        return line

    def track(
        self,
        p: _Person,
        received: int,
        platform: str,
        src: _Source,
        event: str,
        properties: dict,
        late: bool = False,
    ) -> dict:
        line = self._call("track", p, received, platform, src, late)
        line["event"] = event
        line["properties"] = properties
        if platform == "mobile":
            traits = {"anonymousId": p.anonymous_id}
            if p.user_id is not None:
                traits["userId"] = str(p.user_id)
                if p.traits:
                    traits["email"] = p.traits["email"]
            line["context"]["traits"] = traits
        return line

    def page(self, p: _Person, received: int, src: _Source, shape: int | None = None) -> dict:
        r = self.rng
        line = self._call("page", p, received, "web", src)
        name, category, path = r.choice(_PAGES)
        shape = r.randrange(10) if shape is None else shape
        url = f"https://shop.example.com{path}"
        properties = {
            "path": path,
            "referrer": r.choice(["", "https://www.google.com/"]),
            "search": "",
            "title": f"{name} | Acme",
            "url": url,
        }
        line["context"]["page"] = dict(properties)
        if shape < 3:  # unnamed: analytics.page()
            pass
        elif shape < 6 and category is not None:
            line["category"] = category
            line["name"] = name
            properties["category"] = category
            properties["name"] = name
        else:
            line["name"] = name
            properties["name"] = name
        line["properties"] = properties
        return line

    def screen(
        self, p: _Person, received: int, src: _Source, named: bool = True, late: bool = False
    ) -> dict:
        line = self._call("screen", p, received, "mobile", src, late)
        if named:
            line["name"] = self.rng.choice(_SCREENS)
            line["properties"] = {"name": line["name"]}
        else:
            line["properties"] = {}
        return line

    def group(self, p: _Person, received: int, src: _Source) -> dict:
        r = self.rng
        line = self._call("group", p, received, "web", src)
        n = p.index % 7
        line["groupId"] = f"grp_{n:03d}"
        line["traits"] = {
            "name": f"Company {n}",
            "industry": r.choice(["Retail", "SaaS"]),
            "employees": 10 * (n + 1),
            "plan": "enterprise",
        }
        return line

    def alias(self, p: _Person, received: int, platform: str, src: _Source) -> dict:
        line = self._call("alias", p, received, platform, src)
        line["previousId"] = p.anonymous_id
        return line

    # -- track properties

    def _products(self, n: int, v1: bool = False) -> list[dict]:
        r = self.rng
        products = []
        for position, (pid, sku, name, category, price) in enumerate(r.sample(_PRODUCTS, n), 1):
            product = {"id": pid} if v1 else {"product_id": pid}
            product.update(
                {
                    "sku": sku,
                    "name": name,
                    "category": category,
                    "brand": "Acme",
                    "price": price,
                    "quantity": r.choice((1, 1, 1, 2, 3)),
                    "position": position,
                    "url": f"https://shop.example.com/p/{pid}",
                }
            )
            products.append(product)
        return products

    def _order(self, v1: bool = False, currency: str = "USD", n: int | None = None) -> dict:
        r = self.rng
        products = self._products(n or r.randint(1, 3), v1)
        total = round(sum(x["price"] * x["quantity"] for x in products), 2)
        order_key = "orderId" if v1 else "order_id"
        properties = {
            order_key: f"ord_{r.getrandbits(40):010x}",
            "affiliation": "Acme Online",
            "total": total,
            "revenue": total,
            "shipping": 4.95,
            "tax": round(total * 0.08, 2),
            "currency": currency,
            "products": products,
        }
        if not v1:
            properties["checkout_id"] = f"chk_{r.getrandbits(40):010x}"
            if r.random() < 0.3:
                properties["coupon"] = "SPRING24"
                properties["discount"] = 5.0
        return properties

    def _generic_event(self, platform: str) -> tuple[str, dict]:
        r = self.rng
        roll = r.random()
        if roll < 0.2:
            event = "Video Played"
            props: dict = {
                "video": {
                    "id": f"vid_{r.randint(1, 60)}",
                    "title": "Trail tips",
                    "duration": r.randint(60, 900),
                },
                "position": r.randint(0, 60),
            }
        elif roll < 0.35:
            event = "Search Performed"
            props = {
                "query": r.choice(["trail shoes", "jacket", "socks"]),
                "results": r.randint(0, 80),
                "filters": {"color": r.sample(["red", "blue", "black"], 2), "size": "M"},
            }
        elif roll < 0.5:
            event = "Button Clicked"
            props = {
                "label": r.choice(["Buy now", "Subscribe", "Learn more"]),
                "location": "hero",
                "experiment": {"id": "exp_12", "variant": r.choice("AB")},
            }
        elif roll < 0.62:
            event = "Article Read"
            props = {
                "article_id": r.randint(1, 300),
                "tags": r.sample(_TAGS, 2),
                "read_pct": round(r.random(), 2),
            }
        elif roll < 0.7:
            event = "Signed Up"
            props = {"method": r.choice(["email", "google", "apple"])}
        elif roll < 0.78:
            event = "Subscription Started"  # revenue without products
            props = {"plan": "pro", "revenue": 9.99, "currency": "USD"}
        elif platform == "mobile":
            event = r.choice(
                ["Application Opened", "Push Notification Received", "Application Backgrounded"]
            )
            props = {"from_background": r.random() < 0.5, "version": _APP["version"]}
        else:
            event = "Feature Used"
            props = {"feature": r.choice(["export", "share", "filters"]), "count": r.randint(1, 9)}
        extra = r.random()
        if extra < 0.01:
            props["time"] = round(r.random() * 100, 1)  # a playback position, says the dev
        elif extra < 0.02:
            props["event_name"] = event.lower().replace(" ", "_")
        elif extra < 0.03:
            props["$current_url"] = "https://shop.example.com/"
        elif extra < 0.035:
            props["review_text"] = _LONG_TEXT
        return event, props

    def _commerce_event(self) -> tuple[str, dict]:
        r = self.rng
        event = r.choice(_BROWSING_EVENTS)
        if event in ("Product Viewed", "Product Added"):
            product = self._products(1)[0]
            if r.random() < 0.5:  # some apps wrap it in products[] anyway
                return event, {"products": [product], "currency": "USD"}
            return event, {**product, "currency": "USD"}
        if event == "Products Searched":
            return event, {"query": r.choice(["shoes", "jacket"])}
        return event, {
            "cart_id": f"cart_{r.getrandbits(32):08x}",
            "products": self._products(r.randint(1, 3)),
        }

    # -- one random line

    def random_line(self, received: int, src: _Source) -> dict:
        r = self.rng
        if src.kind == "server":
            platform = "engage" if r.random() < 0.05 else "server"
        elif src.kind == "mobile":
            platform = "engage" if r.random() < 0.02 else "mobile"
        else:
            roll = r.random()
            platform = "engage" if roll < 0.02 else "server" if roll < 0.15 else "web"
        if platform in ("web", "mobile") and r.random() < ANONYMOUS_RATE:
            p = r.choice(self.visitors)
        else:
            p = self.users[int(len(self.users) * r.random() ** 1.4)]  # some users are busier
        if platform == "engage":
            return self.engage(p, received, src)
        late = platform == "mobile" and r.random() < LATE_RATE
        if p.user_id is not None and not p.identified:
            return self.identify(p, received, platform, src)  # signed up or logged in
        roll = r.random()
        if platform == "server":
            if roll < 0.2:
                return self.identify(p, received, platform, src)
            if roll < 0.45:
                v1 = r.random() < 0.25
                event = "Completed Order" if v1 else "Order Completed"
                return self.track(p, received, platform, src, event, self._order(v1=v1))
            return self.track(p, received, platform, src, *self._generic_event(platform))
        if roll < 0.1 and (p.user_id is not None or r.random() < 0.2):
            return self.identify(p, received, platform, src, late)
        if roll < 0.11 and p.user_id is not None:
            return self.alias(p, received, platform, src)
        if platform == "web":
            if roll < 0.13 and p.user_id is not None:
                return self.group(p, received, src)
            if roll < 0.48:
                return self.page(p, received, src)
        elif roll < 0.4:
            return self.screen(p, received, src, named=r.random() > 0.05, late=late)
        roll = r.random()
        if roll < 0.05:
            return self.track(p, received, platform, src, "Order Completed", self._order(), late)
        if roll < 0.35:
            return self.track(p, received, platform, src, *self._commerce_event(), late=late)
        return self.track(p, received, platform, src, *self._generic_event(platform), late=late)

    def duplicate(self, received: int, src: _Source, across: bool) -> dict | None:
        """A line delivered again: the same call, in the same file or a later one of its source."""
        earlier = self.recent_before.get(src.id)
        if across and earlier:
            line = dict(self.rng.choice(earlier))
            line["receivedAt"] = _iso(received)
            return line
        if not across and self.recent_here:
            return self.rng.choice(self.recent_here)
        return None

    # -- lines placed on purpose: every mapping rule and every kind of breakage

    def specials(self) -> list[tuple[str, Callable[[int, _Source], Line | None]]]:
        u = self.users

        def user(n: int) -> _Person:
            return u[n % len(u)]

        def track(n: int, event: str, properties: dict, platform: str = "web"):
            return lambda at, src: self.track(user(n), at, platform, src, event, properties)

        def no_timestamp(at: int, src: _Source) -> dict:
            line = self.track(user(6), at, "web", src, "Feature Used", {"feature": "export"})
            del line["timestamp"]
            return line

        def received_only(at: int, src: _Source) -> dict:
            line = self.track(user(7), at, "web", src, "Feature Used", {"feature": "share"})
            line["timestamp"] = None
            del line["originalTimestamp"]
            return line

        def with_time(n: int, fmt: Callable[[int], str]):
            def make(at: int, src: _Source) -> dict:
                line = self.track(user(n), at, "server", src, "Feature Used", {"feature": "api"})
                line["timestamp"] = line["originalTimestamp"] = fmt(at - 5000)
                return line

            return make

        def numeric_identify(at: int, src: _Source) -> dict:
            line = self.identify(user(1), at, "server", src)
            line["userId"] = 12345
            return line

        def padded_identify(at: int, src: _Source) -> dict:
            p = user(8)
            line = self.identify(p, at, "web", src)
            line["userId"] = f"  {p.user_id}\t"
            return line

        def traits(n: int, values: dict, older_ms: int = 0):
            def make(at: int, src: _Source) -> dict:
                line = self._call("identify", user(n), at, "web", src)
                line["traits"] = values
                if older_ms:
                    line["timestamp"] = line["originalTimestamp"] = _iso(at - older_ms)
                return line

            return make

        def new_user_no_traits(at: int, src: _Source) -> dict:
            p = _Person(10_000_000, "usr_no_traits_01", self._uuid())
            line = self._call("identify", p, at, "server", src)
            line["traits"] = {}
            return line

        def order_eur(at: int, src: _Source) -> dict:
            props = self._order(currency="EUR", n=2)
            props["products"][0]["currency"] = "eur"  # lower-case, per product
            props["products"][1]["price"] = "19.99"  # a numeric string
            return self.track(user(3), at, "web", src, "Order Completed", props)

        def order_quantity_250(at: int, src: _Source) -> dict:
            props = self._order(n=1)
            props["products"][0]["quantity"] = 250
            return self.track(user(4), at, "server", src, "Order Completed", props)

        def order_sku_only(at: int, src: _Source) -> dict:
            props = self._order(n=1)
            del props["products"][0]["product_id"]
            return self.track(user(5), at, "server", src, "order completed", props)

        def v1_order(at: int, src: _Source) -> dict:
            return self.track(user(11), at, "server", src, "Completed Order", self._order(v1=True))

        def bundle(at: int, src: _Source) -> dict:
            props = {"bundle": "starter", "products": self._products(2), "currency": "USD"}
            return self.track(user(12), at, "web", src, "Bundle Purchased", props)

        def browse(event: str, n: int):
            return lambda at, src: self.track(
                user(n),
                at,
                "web",
                src,
                event,
                {"cart_id": "cart_1f2e3d4c", "products": self._products(2)},
            )

        def page(shape: int):
            return lambda at, src: self.page(user(13), at, src, shape)

        def unnamed_screen(at: int, src: _Source) -> dict:
            return self.screen(user(14), at, src, named=False)

        def named_screen(at: int, src: _Source) -> dict:
            return self.screen(user(14), at, src, named=True)

        def anonymous_identify(at: int, src: _Source) -> dict:
            return self.identify(self.visitors[0], at, "web", src)

        def dup(across: bool):
            return lambda at, src: self.duplicate(at, src, across)  # None: not yet, next line

        return [
            ("identify: userId as a number (12345)", numeric_identify),
            ("identify: userId padded with whitespace", padded_identify),
            ("identify: trait nickname set", traits(9, {"nickname": "Ace"})),
            ("identify: same user's nickname null (unset)", traits(9, {"nickname": None})),
            ("identify: plan premium", traits(10, {"plan": "premium"})),
            (
                "identify: same user, plan basic, timestamp 2 days older (stale)",
                traits(10, {"plan": "basic"}, 2 * DAY_MS),
            ),
            ("identify: a new userId with empty traits", new_user_no_traits),
            ("identify: anonymous (userId null) with traits", anonymous_identify),
            (
                "identify: Engage computed trait, messageId personas_",
                lambda at, src: self.engage(user(15), at, src),
            ),
            ("track: property `time`", track(16, "Video Played", {"time": 33.2, "position": 33})),
            (
                "track: property `event_name`",
                track(17, "Feature Used", {"event_name": "feature_used", "feature": "export"}),
            ),
            (
                "track: property `$current_url`",
                track(
                    18,
                    "Button Clicked",
                    {"$current_url": "https://shop.example.com/", "label": "Buy now"},
                ),
            ),
            (
                "track: string property over 255 characters",
                track(
                    19,
                    "Product Reviewed",
                    {"product_id": "prod_001", "rating": 4, "review_text": _LONG_TEXT},
                ),
            ),
            (
                "track: nested object and array properties",
                track(
                    20,
                    "Search Performed",
                    {
                        "query": "socks",
                        "filters": {"color": ["red", "blue"], "size": {"eu": 42, "us": 9}},
                        "results": [{"id": "prod_004", "rank": 1}],
                    },
                ),
            ),
            ('track: Order Completed, EUR, product currency `eur`, price "19.99"', order_eur),
            ("track: Order Completed, one product with quantity 250", order_quantity_250),
            ("track: `order completed` (lower case), product with sku only", order_sku_only),
            ("track: v1 Completed Order (orderId, products[].id)", v1_order),
            ("track: Bundle Purchased: custom name with products", bundle),
            ("track: Cart Viewed with products (stays an event)", browse("Cart Viewed", 21)),
            (
                "track: Product List Viewed with products (stays an event)",
                browse("Product List Viewed", 22),
            ),
            (
                "track: Subscription Started with revenue, no products",
                track(
                    23, "Subscription Started", {"plan": "pro", "revenue": 9.99, "currency": "usd"}
                ),
            ),
            ("track: no timestamp (originalTimestamp used)", no_timestamp),
            ("track: timestamp null, no originalTimestamp (receivedAt used)", received_only),
            (
                "track: timestamp with +02:00 offset",
                with_time(24, lambda ms: _iso_offset(ms, 2, False)),
            ),
            ("track: timestamp without fraction", with_time(25, _iso_seconds)),
            ("page: named, with category", page(4)),
            ("page: named, no category", page(8)),
            ("page: unnamed", page(0)),
            ("screen: named", named_screen),
            ("screen: unnamed", unnamed_screen),
            ("group: groupId and traits", lambda at, src: self.group(user(26), at, src)),
            ("alias: previousId", lambda at, src: self.alias(user(27), at, "web", src)),
            ("duplicate: a messageId repeated in the same file", dup(False)),
            ("duplicate: a messageId from an earlier file", dup(True)),
        ]

    def bad_lines(self) -> list[tuple[str, Callable[[int, _Source], Line]]]:
        u = self.users

        def user(n: int) -> _Person:
            return u[n % len(u)]

        def edit(make: Callable[[int, _Source], dict], change: Callable[[dict], object]):
            def build(at: int, src: _Source) -> Line:
                line = make(at, src)
                result = change(line)
                return line if result is None else result

            return build

        def order(n: int, **kw):
            return lambda at, src: self.track(
                user(n), at, "server", src, "Order Completed", self._order(n=1, **kw)
            )

        def ident(n: int):
            return lambda at, src: self.identify(user(n), at, "web", src)

        def generic(n: int):
            return lambda at, src: self.track(
                user(n), at, "web", src, "Feature Used", {"feature": "x"}
            )

        def latin1(line: dict) -> bytes:
            line["properties"] = {"title": "@@"}
            return orjson.dumps(line).replace(b"@@", b"Caf\xe9 Cr\xe8me")

        def set_(key: str, value: object):
            def change(line: dict) -> None:
                line[key] = value

            return change

        def products(value: Callable[[dict], object]):
            def change(line: dict) -> None:
                value(line["properties"])

            return change

        def no_time(line: dict) -> None:
            line["timestamp"] = "yesterday"
            line["originalTimestamp"] = ""
            line["receivedAt"] = None

        def long_id(line: dict) -> None:
            line["userId"] = "eyJhbGciOiJIUzI1NiJ9." + "QUJD" * 250  # a JWT pasted as userId
            line["traits"] = {"email": "token@example.com"}

        return [
            ("invalid JSON (cut off)", edit(generic(30), lambda line: orjson.dumps(line)[:90])),
            ("invalid UTF-8 (Latin-1 bytes in a string)", edit(generic(31), latin1)),
            (
                "a JSON array, not an object",
                edit(generic(32), lambda line: b"[" + orjson.dumps(line) + b"]"),
            ),
            ("no type", edit(ident(33), lambda line: line.pop("type") and None)),
            ("unknown type `flush`", edit(generic(34), set_("type", "flush"))),
            ("userId is a list", edit(ident(35), set_("userId", ["usr_a", "usr_b"]))),
            (
                "identify traits is a string",
                edit(
                    ident(36),
                    lambda line: line.update(traits=orjson.dumps(line["traits"]).decode()),
                ),
            ),
            (
                "Order Completed: products is an object, not a list",
                edit(order(37), products(lambda p: p.update(products=p["products"][0]))),
            ),
            (
                'Order Completed: price "abc"',
                edit(order(38), products(lambda p: p["products"][0].update(price="abc"))),
            ),
            (
                "Order Completed: quantity 0",
                edit(order(39), products(lambda p: p["products"][0].update(quantity=0))),
            ),
            ("track with an empty event name", edit(generic(40), set_("event", ""))),
            ("no parseable time (timestamp `yesterday`, others empty)", edit(generic(41), no_time)),
            ("userId over 987 bytes", edit(ident(42), long_id)),
            (
                "group without groupId",
                edit(
                    lambda at, src: self.group(user(43), at, src),
                    lambda line: line.pop("groupId") and None,
                ),
            ),
        ]


def _plan_files(gen: _Generator, days: int, files_per_day: int, bad: bool) -> list[_FilePlan]:
    """Files in the order they are written: slot by slot, so trait changes move forward in time."""
    span = DAY_MS // files_per_day
    plans = []
    for d in range(days):
        day_ms = START_DAY_MS + d * DAY_MS
        for slot in range(files_per_day):
            start = day_ms + slot * span
            for src in gen.sources:
                name = f"{start + span - 1:d}.{gen.rng.getrandbits(48):012x}.gz"
                plans.append(_FilePlan(src, start, span, Path(src.id, str(day_ms), name), False))
        if bad and d == min(1, days - 1):
            src = gen.sources[0]
            start = day_ms + (files_per_day - 1) * span
            name = f"{start + span - 1:d}.{gen.rng.getrandbits(48):012x}.gz"
            plans.append(_FilePlan(src, start, span, Path(src.id, str(day_ms), name), True))
    return plans


def _interleave(first: list, second: list) -> list:
    """Both lists merged evenly, each keeping its order (some placed lines depend on it)."""
    keyed = [((2 * k + 1) / (2 * len(first)), 0, x) for k, x in enumerate(first)]
    keyed += [((2 * k + 1) / (2 * len(second)), 1, x) for k, x in enumerate(second)]
    return [x for _, _, x in sorted(keyed, key=lambda t: (t[0], t[1]))]


def generate(
    out_dir: str | Path,
    lines: int = SAMPLE_LINES,
    users: int | None = None,
    *,
    files_per_day: int = 3,
    days: int = 3,
    sources: int = 2,
    bad: bool = True,
    seed: int = DEFAULT_SEED,
    catalog: list[tuple[str, int, str]] | None = None,
) -> list[Path]:
    """Write `lines` lines (bad ones included) under `out_dir`; return the files written, sorted.

    `users` defaults to one per 20 lines, at least 40. With `bad`, broken lines are mixed in,
    one file holds plain JSON lines under a `.gz` name, and a `manifest.txt` sits among the
    archives. `catalog`, if given, receives (path relative to `out_dir`, line number, what)
    for every line placed on purpose.
    """
    if lines < 0 or days < 1 or files_per_day < 1 or sources < 1:
        raise ValueError("lines must be >= 0; days, files_per_day and sources >= 1")
    users = users if users is not None else max(SAMPLE_USERS, lines // 20)
    if users < 1:
        raise ValueError("users must be >= 1")
    out = Path(out_dir)
    gen = _Generator(seed, users, sources)
    plans = _plan_files(gen, days, files_per_day, bad)
    base, extra = divmod(lines, len(plans))
    for n, plan in enumerate(plans):
        plan.lines = base + (n < extra)

    placed = _interleave(gen.specials(), gen.bad_lines() if bad else [])[:lines]
    # Spread them evenly over the whole run, at global line positions.
    positions = {((2 * k + 1) * lines) // (2 * len(placed)): item for k, item in enumerate(placed)}

    written: list[Path] = []
    first = 0
    # The lines form no reference cycles, and scanning a big user pool again and again
    # would cost a quarter of the run.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for plan in plans:
            _write_file(gen, out, plan, first, positions, catalog)
            written.append(out / plan.path)
            first += plan.lines
    finally:
        if collecting:
            gc.enable()
    if bad:
        manifest = out / plans[0].path.parent / "manifest.txt"
        manifest.write_text(f"Segment S3 sync\nsource: {plans[0].source.id}\nstatus: complete\n")
        written.append(manifest)
    return sorted(written)


def _write_file(
    gen: _Generator, out: Path, plan: _FilePlan, first: int, positions: dict, catalog: list | None
) -> None:
    rng = gen.rng
    path = out / plan.path
    path.parent.mkdir(parents=True, exist_ok=True)
    gen.recent_here.clear()
    dumps = orjson.dumps
    with open(path, "wb") as raw:
        sink = raw if plan.plain else _GzipWriter(raw, COMPRESS_LEVEL)
        chunk: list[bytes] = []
        for i in range(plan.lines):
            # Receipt times move forward through the file, a little out of order.
            received = (
                plan.start_ms + (i * plan.span_ms) // max(1, plan.lines) + rng.randint(0, 1500)
            )
            line: Line | None = None
            placed = False
            special = positions.get(first + i)
            if special is not None:
                gen.waiting.append(special)
            if gen.waiting:
                label, make = gen.waiting[0]
                line = make(received, plan.source)
                if line is not None:
                    gen.waiting.popleft()
                    placed = True
                    if catalog is not None:
                        catalog.append((plan.path.as_posix(), i + 1, label))
            if line is None and rng.random() < DUPLICATE_RATE:
                line = gen.duplicate(received, plan.source, across=rng.random() < 0.5)
            if line is None:
                line = gen.random_line(received, plan.source)
            if isinstance(line, dict):
                if not placed:
                    gen.recent_here.append(line)
                chunk.append(dumps(line))
            else:
                chunk.append(line)
            if len(chunk) >= _CHUNK_LINES:
                sink.write(b"\n".join(chunk) + b"\n")
                chunk.clear()
        if chunk:
            sink.write(b"\n".join(chunk) + b"\n")
        if sink is not raw:
            sink.close()
    gen.recent_before.setdefault(plan.source.id, deque(maxlen=1000)).extend(gen.recent_here)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write realistic Segment S3 archives: OUT/<source-id>/<day-ms>/<file>.gz.",
        epilog="Example: python samples/generate.py --out bench-data --lines 1000000 "
        "--users 50000 --no-bad",
    )
    parser.add_argument("--out", required=True, type=Path, help="the segment-logs folder to write")
    parser.add_argument(
        "--lines",
        type=int,
        default=SAMPLE_LINES,
        help=f"lines in all (default {SAMPLE_LINES}: the sample)",
    )
    parser.add_argument(
        "--users", type=int, help=f"known users (default: lines/20, at least {SAMPLE_USERS})"
    )
    parser.add_argument(
        "--files-per-day", type=int, default=3, help="files per source and day (default 3)"
    )
    parser.add_argument("--days", type=int, default=3, help="received-day folders (default 3)")
    parser.add_argument(
        "--sources",
        type=int,
        default=2,
        help="Segment sources: web, mobile, server, ... (default 2)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    parser.add_argument(
        "--bad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mix in broken lines and files (default: yes)",
    )
    parser.add_argument(
        "--catalog",
        action="store_true",
        help="print where each deliberately placed line went (TSV)",
    )
    args = parser.parse_args(argv)
    catalog: list[tuple[str, int, str]] | None = [] if args.catalog else None
    started = time.perf_counter()
    try:
        paths = generate(
            args.out,
            args.lines,
            args.users,
            files_per_day=args.files_per_day,
            days=args.days,
            sources=args.sources,
            bad=args.bad,
            seed=args.seed,
            catalog=catalog,
        )
    except ValueError as error:
        parser.error(str(error))
    for path, line, label in catalog or []:
        print(f"{path}\t{line}\t{label}")
    size = sum(p.stat().st_size for p in paths)
    print(
        f"wrote {args.lines:,} lines in {len(paths)} files ({size:,} bytes) under {args.out} "
        f"in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
