"""Policy: which format each layer runs in, as JSON and as a compact URL token.

A policy file reads::

    {"schema": "quantlens.policy/1", "model": {"sha256": "..."},
     "default": "fp32", "layers": {"<layer name>": "int8" | "int4" | "int8-dyn" | "fp32"}}

Precedence: a layer named in ``layers`` takes that format; every other layer takes
``default``. Layer names are the framework's own fully qualified names.

Parsing checks structure and raises :class:`PolicyError` naming the field. Checking a
policy against a Run (:func:`match_policy`) never raises: unknown layers, unknown
formats, formats a layer was skipped for and another model's hash come back as a
:class:`PolicyMatch` report, so a caller can warn and apply what matches.

The URL token (:func:`encode_url_token`) packs one 2-bit code per layer in execution
order (``fp32=0, int8=1, int4=2, int8-dyn=3``; codes are only ever appended, so older tokens
read the same) into base64url, prefixed with a token version, the
first 12 hex digits of the model hash and the layer count:
``q1.<sha12>.<n_layers>.<base64url>``. 1,000 layers take 334 characters.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from analysis.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from analysis.store.run import Run

POLICY_SCHEMA = "quantlens.policy/1"
POLICY_FORMATS: tuple[str, ...] = ("fp32", "int8", "int4", "int8-dyn")  # index = 2-bit code in URL tokens
FORMAT_CODE: dict[str, int] = {f: i for i, f in enumerate(POLICY_FORMATS)}
URL_VERSION = "q1"
URL_SHA_DIGITS = 12
MAX_POLICY_BYTES = 8 << 20  # a 100,000-layer policy is about 4 MiB


class PolicyError(InputError):
    """A policy (file or URL token) that cannot be read; the message names the field."""


@dataclass(frozen=True)
class Policy:
    """Layer -> format. ``layers`` holds explicit entries; every other layer takes ``default``."""

    model_sha256: str
    layers: Mapping[str, str] = field(default_factory=dict)
    default: str = "fp32"

    def format_of(self, layer: str) -> str:
        return self.layers.get(layer, self.default)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": POLICY_SCHEMA, "model": {"sha256": self.model_sha256},
                "default": self.default, "layers": dict(self.layers)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, obj: Any) -> "Policy":
        return parse_policy(obj)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Policy":
        return from_json(text)


def parse_policy(obj: Any) -> Policy:
    """Check the structure of a decoded policy object.

    Format values of single layers are kept as written (an unknown one is reported by
    :func:`match_policy`, not rejected here); ``default`` must be a known format because
    it applies to every layer.

    Raises:
        PolicyError: a field is missing or has the wrong type; the message names it.
    """
    if not isinstance(obj, dict):
        raise PolicyError(f"policy: expected a JSON object, got {type(obj).__name__}")
    schema = obj.get("schema")
    if schema != POLICY_SCHEMA:
        raise PolicyError(f"field 'schema' is {schema!r}; this version reads {POLICY_SCHEMA!r}")
    model = obj.get("model")
    if not isinstance(model, dict):
        raise PolicyError("field 'model' must be an object with 'sha256'")
    sha = model.get("sha256")
    if not isinstance(sha, str) or not sha:
        raise PolicyError("field 'model.sha256' must be a non-empty string")
    default = obj.get("default", "fp32")
    if not isinstance(default, str) or default not in FORMAT_CODE:
        raise PolicyError(f"field 'default' is {default!r}; known formats: {', '.join(POLICY_FORMATS)}")
    layers = obj.get("layers", {})
    if not isinstance(layers, dict):
        raise PolicyError("field 'layers' must be an object {layer name: format}")
    for name, fmt in layers.items():
        if not isinstance(fmt, str):
            raise PolicyError(f"field 'layers.{name}' must be a format name (string), got {type(fmt).__name__}")
    return Policy(sha, dict(layers), default)


def from_json(text: str | bytes) -> Policy:
    """Read a policy from JSON text.

    Raises:
        PolicyError: not JSON, or a field is missing or malformed.
    """
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy: {len(text):,} bytes, more than a policy holds (limit {MAX_POLICY_BYTES:,})")
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PolicyError(f"policy: not valid JSON ({e})") from None
    except RecursionError:  # the decoder recurses once per level; a policy nests two levels deep
        raise PolicyError('policy: JSON nested too deeply (a policy is {"layers": {name: format}})') from None
    return parse_policy(obj)


def to_json(policy: Policy) -> str:
    return policy.to_json()


def _available(run: "Run") -> dict[tuple[str, str], str]:
    """(layer, format) pairs the Run cannot apply, with the reason."""
    sens = run.sensitivity
    skipped = sens[sens["status"] != "ok"]
    return {(str(r.layer), str(r.format)): str(r.reason or "skipped in the sweep")
            for r in skipped.itertuples(index=False)}


def uniform(run: "Run", fmt: str) -> Policy:
    """Every layer in ``fmt`` except layers the sweep skipped for it, which stay fp32."""
    if fmt not in FORMAT_CODE:
        raise PolicyError(f"unknown format {fmt!r}; known: {', '.join(POLICY_FORMATS)}")
    blocked = _available(run)
    layers = {n: ("fp32" if (n, fmt) in blocked else fmt) for n in run.layer_names}
    return Policy(run.model_sha256, layers, "fp32")


def policy_from_codes(run: "Run", codes: Sequence[int] | np.ndarray) -> Policy:
    """The explicit policy for per-layer codes in execution order."""
    names = run.layer_names
    if len(codes) != len(names):
        raise PolicyError(f"{len(codes)} codes for {len(names)} layers")
    return Policy(run.model_sha256, {n: POLICY_FORMATS[int(c)] for n, c in zip(names, codes)}, "fp32")


@dataclass(frozen=True)
class PolicyMatch:
    """What of a policy applies to a Run.

    ``codes`` are per-layer codes in execution order with everything that matched applied;
    layers that did not match keep the policy's default (or fp32 where that is unavailable).
    """

    codes: np.ndarray
    applied: dict[str, str]
    unknown_layers: list[str]
    unknown_formats: dict[str, str]
    unavailable: dict[str, str]  # layer -> "format: reason" (skipped in the sweep; kept fp32)
    model_mismatch: tuple[str, str] | None  # (policy sha256, run sha256)

    @property
    def clean(self) -> bool:
        return not (self.unknown_layers or self.unknown_formats or self.unavailable or self.model_mismatch)

    def messages(self) -> list[str]:
        """One line per problem, for the page."""
        out = []
        if self.model_mismatch:
            p, r = self.model_mismatch
            out.append(f"This policy was written for another model (sha256 {p[:12]}…, this Run: {r[:12]}…); "
                       f"applied the {len(self.applied)} layer(s) whose names match.")
        if self.unknown_layers:
            out.append(f"{len(self.unknown_layers)} layer(s) not in this model, ignored: "
                       + ", ".join(self.unknown_layers[:20]) + (" …" if len(self.unknown_layers) > 20 else ""))
        if self.unknown_formats:
            out.append("Unknown format(s), layer kept at fp32: "
                       + ", ".join(f"{k} → {v!r}" for k, v in list(self.unknown_formats.items())[:20])
                       + f" (known: {', '.join(POLICY_FORMATS)})")
        if self.unavailable:
            out.append("Format not available for these layers, kept at fp32: "
                       + "; ".join(f"{k} ({v})" for k, v in list(self.unavailable.items())[:20]))
        return out


def match_policy(policy: Policy, run: "Run") -> PolicyMatch:
    """Check ``policy`` against ``run`` and return what applies; never raises for a mismatch."""
    names = run.layer_names
    index = {n: i for i, n in enumerate(names)}
    blocked = _available(run)
    measured = {"fp32", *run.formats}
    codes = np.zeros(len(names), dtype=np.int8)
    if policy.default != "fp32" and policy.default in measured:  # the default applies where allowed
        d = FORMAT_CODE[policy.default]
        for i, n in enumerate(names):
            codes[i] = 0 if (n, policy.default) in blocked else d
    applied: dict[str, str] = {}
    unknown_layers: list[str] = []
    unknown_formats: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    for name, fmt in policy.layers.items():
        i = index.get(name)
        if i is None:
            unknown_layers.append(name)
            continue
        if fmt not in FORMAT_CODE:
            unknown_formats[name] = fmt
            codes[i] = 0
            continue
        if fmt not in measured or (name, fmt) in blocked:
            unavailable[name] = f"{fmt}: {blocked.get((name, fmt), 'format not measured in this Run')}"
            codes[i] = 0
            continue
        codes[i] = FORMAT_CODE[fmt]
        applied[name] = fmt
    mismatch = None if policy.model_sha256 == run.model_sha256 else (policy.model_sha256, run.model_sha256)
    return PolicyMatch(codes, applied, unknown_layers, unknown_formats, unavailable, mismatch)


def _pack(codes: np.ndarray) -> bytes:
    c = np.asarray(codes, dtype=np.uint8)
    pad = (-len(c)) % 4
    c = np.concatenate([c, np.zeros(pad, dtype=np.uint8)]).reshape(-1, 4)
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).astype(np.uint8).tobytes()


def _unpack(data: bytes, n: int) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8)
    c = np.stack([b & 3, (b >> 2) & 3, (b >> 4) & 3, (b >> 6) & 3], axis=1).reshape(-1)
    return c[:n].astype(np.int8)


def encode_codes(codes: Sequence[int] | np.ndarray, model_sha256: str) -> str:
    """URL-safe token for per-layer codes (execution order) of the model with ``model_sha256``.

    Example:
        >>> encode_codes([0, 1, 2], "ab" * 32)
        'q1.abababababab.3.JA'
    """
    c = np.asarray(codes, dtype=np.int64)
    if c.ndim != 1 or (len(c) and (c.min() < 0 or c.max() >= len(POLICY_FORMATS))):
        raise PolicyError(f"codes must be a 1-D sequence of 0..{len(POLICY_FORMATS) - 1}")
    body = base64.urlsafe_b64encode(_pack(c)).decode("ascii").rstrip("=")
    return f"{URL_VERSION}.{model_sha256[:URL_SHA_DIGITS]}.{len(c)}.{body}"


@dataclass(frozen=True)
class UrlToken:
    sha_prefix: str
    codes: np.ndarray

    def matches(self, run: "Run") -> bool:
        """True when the token is what :func:`encode_codes` writes for ``run``'s model and layer count: the
        whole hash prefix, never a shorter one (an empty prefix would match every model)."""
        prefix = run.model_sha256[:URL_SHA_DIGITS]
        return bool(prefix) and self.sha_prefix == prefix and len(self.codes) == len(run.layer_names)


def decode_codes(token: str) -> UrlToken:
    """Inverse of :func:`encode_codes`.

    Raises:
        PolicyError: a malformed token; the message says which part.
    """
    parts = token.split(".")
    if len(parts) != 4:
        raise PolicyError(f"policy token: expected 4 dot-separated parts, got {len(parts)}")
    version, sha, n_text, body = parts
    if version != URL_VERSION:
        raise PolicyError(f"policy token: version {version!r}; this version reads {URL_VERSION!r}")
    if not (n_text.isascii() and n_text.isdigit()):
        raise PolicyError(f"policy token: layer count {n_text!r} is not a number")
    n = int(n_text)
    try:
        data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as e:
        raise PolicyError(f"policy token: codes are not base64url ({e})") from None
    if len(data) != (n + 3) // 4:
        raise PolicyError(f"policy token: {len(data)} bytes of codes for {n} layers")
    codes = _unpack(data, n)
    if len(codes) and codes.max() >= len(POLICY_FORMATS):
        raise PolicyError("policy token: holds a code that names no format")
    return UrlToken(sha, codes)


def encode_url_token(policy: Policy, run: "Run") -> str:
    """Token for ``policy`` resolved on ``run`` (unmatched entries as :func:`match_policy` leaves them)."""
    return encode_codes(match_policy(policy, run).codes, run.model_sha256)


def decode_url_token(token: str, run: "Run") -> PolicyMatch:
    """The policy a token describes, checked against ``run``.

    Raises:
        PolicyError: a malformed token, or one for another model or layer count.
    """
    t = decode_codes(token)
    if not t.matches(run):
        raise PolicyError(f"policy token is for another model (hash {t.sha_prefix}…, {len(t.codes)} layers); "
                          f"this Run: {run.model_sha256[:URL_SHA_DIGITS]}…, {len(run.layer_names)} layers")
    return match_policy(policy_from_codes(run, t.codes), run)
