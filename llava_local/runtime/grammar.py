"""Structured output: answers kept to a JSON schema by a llama.cpp grammar, then parsed and validated.

    output = JsonOutput.from_file("shape.schema.json")    # or JsonOutput({...}), JsonOutput.json_object()
    answer = engine.ask("Describe the shape.", ["a.png"], output=output)
    answer.json                                            # the parsed object, valid against the schema

`JsonOutput` checks the schema (jsonschema) and turns it into GBNF with llama-cpp-python's
`json_schema_to_gbnf`, the Python port of the converter llama-server applies. `Grammar` is llama.cpp's
grammar sampler for one sequence: `mask` sets every token it forbids to -inf, `accept` advances it
by the chosen token; its state is the answer so far, so every sequence needs its own
(`Engine.sampler(params, output)` builds one). End-of-generation tokens are allowed only once the
JSON is complete. What the grammar cannot express (number bounds other than small integer ranges,
"not", "uniqueItems" ...) is checked by `JsonOutput.parse`, which raises StructuredOutputError rather
than pass on an answer that is cut or does not validate.
"""
from __future__ import annotations

import codecs
import ctypes
import functools
import json
import logging
import math
import os
import weakref

import numpy as np

from llava_local.errors import LlavaLocalError, StructuredOutputError

log = logging.getLogger(__name__)

SMALL_INT_RANGE = 256   # integer ranges of up to this many values become enums: the converter ignores bounds
# keywords the converter does not turn into grammar (validation still checks them)
_NOT_IN_GRAMMAR = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
                   "not", "if", "minProperties", "maxProperties", "contains", "patternProperties",
                   "propertyNames", "dependentRequired", "dependentSchemas", "dependencies")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")          # name -> subschema
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")     # [subschema, ...]
_SCHEMA_ONE = ("items", "additionalProperties")                # one subschema (items: or a list)
# rules of the converter's output changed: (rules, text, replacement)
_GBNF_FIXES = (
    # llama-cpp-python's port lets raw control characters into strings, which JSON forbids (json.loads
    # refuses them); llama.cpp's own converter (json-schema-to-grammar.cpp) excludes them like this
    (("char",), r'[^"\\]', r'[^"\\\x7F\x00-\x1F]'),
    # its exponents of up to 16 digits allow 1e999: JSON, but out of float range (Python reads inf and
    # writes Infinity back, which is not JSON); two digits keep every number a float
    (("number", "root"), "([eE] [-+]? integral-part)?", "([eE] [-+]? [0-9] [0-9]?)?"),   # root: a bare number
)
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])   # llama_token_data


class JsonOutput:
    """A JSON schema as a grammar (`gbnf`) and a validator (`parse`)."""

    def __init__(self, schema: dict):
        from jsonschema import SchemaError, validators
        if not isinstance(schema, dict):
            raise LlavaLocalError(f"a JSON schema must be a JSON object, got {_json_type(schema)}")
        cls = validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except SchemaError as exc:
            raise LlavaLocalError(f"invalid JSON schema: {exc.message} (at {exc.json_path})") from None
        self.schema = schema
        self._validator = cls(schema)
        self.gbnf = _schema_gbnf(schema)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "JsonOutput":
        try:
            with open(path, encoding="utf-8") as f:
                schema = json.load(f)
        except FileNotFoundError:
            raise LlavaLocalError(f"{path}: no such file (expected a JSON schema)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LlavaLocalError(f"{path}: cannot read the JSON schema ({getattr(exc, 'strerror', None) or exc})") \
                from None
        except (ValueError, RecursionError) as exc:
            raise LlavaLocalError(f"{path}: not JSON ({exc})") from None
        try:
            return cls(schema)
        except LlavaLocalError as exc:
            raise LlavaLocalError(f"{path}: {exc}") from None

    @classmethod
    def json_object(cls) -> "JsonOutput":
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls({"type": "object"})

    def parse(self, text: str, finish_reason: str) -> object:
        """The answer as a parsed object, valid against the schema; StructuredOutputError when it was
        cut ("length": max_tokens or the context ran out; "interrupted") or does not validate."""
        if finish_reason == "length":
            raise StructuredOutputError(f"max_tokens reached before the JSON closed ({len(text)} characters "
                                        "so far): raise max_tokens")
        if finish_reason != "stop":
            raise StructuredOutputError(f"the answer ended ({finish_reason}) before the JSON closed")
        try:
            obj = json.loads(text, parse_float=_finite_float, parse_constant=_not_json)
        except (ValueError, RecursionError) as exc:
            raise StructuredOutputError(f"the answer is not valid JSON ({exc}): {_clip(text)}") from None
        from jsonschema.exceptions import best_match
        err = best_match(self._validator.iter_errors(obj))
        if err is not None:
            raise StructuredOutputError(f"the answer does not match the JSON schema: {err.message} "
                                        f"(at {err.json_path})")
        return obj


def _schema_gbnf(schema: dict) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    missing: set[str] = set()
    prepared = _for_grammar(schema, missing)
    if missing:
        log.warning("the grammar does not enforce the JSON schema's %s: answers are validated after generation "
                    "and those that break them are errors", ", ".join(sorted(missing)))
    try:
        gbnf = json_schema_to_gbnf(json.dumps(prepared))
    except Exception as exc:   # the converter is plain Python that asserts what it supports; any failure means that
        raise LlavaLocalError(f"JSON schema not supported by the grammar converter "
                              f"({type(exc).__name__}: {exc})") from None
    lines = gbnf.split("\n")
    for i, line in enumerate(lines):
        for rules, text, replacement in _GBNF_FIXES:
            if line.split(" ::= ", 1)[0] in rules:
                lines[i] = line.replace(text, replacement, 1)
    return "\n".join(lines)


def _for_grammar(schema, missing: set[str]):
    """A copy of `schema` for the converter: small bounded integer ranges become enums; the keywords
    the grammar will not enforce are added to `missing`. enum/const values are never touched."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SCHEMA_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: _for_grammar(s, missing) for name, s in out[k].items()}
    for k in _SCHEMA_LISTS + _SCHEMA_ONE:
        if isinstance(out.get(k), list):
            out[k] = [_for_grammar(s, missing) for s in out[k]]
        elif isinstance(out.get(k), dict):
            out[k] = _for_grammar(out[k], missing)
    values = _integer_values(out)
    if values is not None:
        return {"enum": values}
    missing.update(k for k in _NOT_IN_GRAMMAR if k in out)
    return out


def _integer_values(s: dict) -> list[int] | None:
    """Every value of an integer schema bounded to at most SMALL_INT_RANGE values, else None."""
    if s.get("type") != "integer" or "enum" in s or "const" in s:
        return None
    lo, hi = s.get("minimum"), s.get("maximum")
    ex_lo, ex_hi = s.get("exclusiveMinimum"), s.get("exclusiveMaximum")
    if ex_lo is True:                  # draft 4: a flag on minimum
        lo, ex_lo = None, lo
    if ex_hi is True:
        hi, ex_hi = None, hi
    lows = [math.ceil(v) for v in (lo,) if _finite(v)] + [math.floor(v) + 1 for v in (ex_lo,) if _finite(v)]
    highs = [math.floor(v) for v in (hi,) if _finite(v)] + [math.ceil(v) - 1 for v in (ex_hi,) if _finite(v)]
    step = s.get("multipleOf", 1)
    if not lows or not highs or not isinstance(step, int) or isinstance(step, bool):
        return None
    first, last = max(lows), min(highs)
    if not 0 < last - first + 1 <= SMALL_INT_RANGE:
        return None
    return [v for v in range(first, last + 1) if v % step == 0] or None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _finite_float(text: str) -> float:
    """A JSON number as a float; one out of float range (the grammar allows 1e999) is refused, as
    Python would write it back as Infinity, which is not JSON."""
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text} is out of range")
    return v


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _clip(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


class _Candidates:
    """A `llama_token_data_array` over a numpy buffer of `llama_token_data` rows, reused every step."""

    def __init__(self, L, n: int):
        self.L = L
        self.rows = np.zeros(n, _TOKEN_DATA)
        self.address = self.rows.ctypes.data
        self.struct = L.llama_token_data_array()
        self.ptr = ctypes.pointer(self.struct)

    def apply(self, smpl, start: int, end: int) -> np.ndarray:
        """The sampler applied to rows[start:end] (their logits, -inf where it refuses the token)."""
        st = self.struct
        # set afresh each time: llama.h lets a sampler move `data`, resize or sort (the grammar's does not)
        st.data = ctypes.cast(self.address + start * _TOKEN_DATA.itemsize, self.L.llama_token_data_p)
        st.size, st.selected, st.sorted = end - start, -1, False
        self.L.llama_sampler_apply(smpl, self.ptr)
        return self.rows["logit"][start:end]


def _utf8_tail(data: bytes) -> bytes | None:
    """The unfinished character at the end of `data` (b"" if none) when `data` is UTF-8 that can still
    be completed, else None. A first continuation byte of 0x80 or 0xBF completes any valid lead."""
    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        dec.decode(data)
    except UnicodeDecodeError:
        return None
    tail = dec.getstate()[0]
    if not tail:
        return tail
    need = (2 if tail[0] < 0xE0 else 3 if tail[0] < 0xF0 else 4) - len(tail)
    return tail if any(_is_utf8(tail + fill * need) for fill in (b"\x80", b"\xbf")) else None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class _Vocab:
    """Each token's bytes, and which tokens may follow a whole character; built once per LLM, when
    first needed (a 49k vocabulary takes ~0.3 s: greedy decoding needs only the tokens it picks)."""

    def __init__(self, llm):
        self.llm = weakref.proxy(llm)
        self._pieces: dict[int, bytes] = {}

    def piece(self, token: int) -> bytes:
        b = self._pieces.get(token)
        if b is None:
            b = self._pieces[token] = self.llm.token_bytes(token)
        return b

    @functools.cached_property
    def fresh_ok(self) -> np.ndarray:
        return np.array([_utf8_tail(self.piece(t)) is not None for t in range(self.llm.n_vocab)], bool)

    @functools.cached_property
    def fresh_ids(self) -> np.ndarray:
        return np.flatnonzero(self.fresh_ok).astype(np.int32)

    @functools.cached_property
    def cont_ids(self) -> list[int]:
        """Tokens that start with a continuation byte: the only ones that can finish a character."""
        return [t for t in range(self.llm.n_vocab) if 0x80 <= (self.piece(t) or b"\0")[0] < 0xC0]


_vocabs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Grammar:
    """llama.cpp's grammar sampler (`llama_sampler_init_grammar`) on one sequence of `llm`'s vocabulary.

    llama.cpp's grammar reads a token's bytes as UTF-8 without checking continuation bytes, so on its
    own it lets byte tokens write invalid UTF-8 (which decodes to U+FFFD and breaks maxLength); the
    answer's unfinished character is tracked here and tokens that would make it invalid are refused.
    Checking a token costs the grammar a walk of its text: on a 49k vocabulary inside a string, the
    whole vocabulary takes ~35 ms. The sampler therefore checks only the greedy token (`allows`), or
    the best candidates of a top-k draw (`mask_best`), and masks everything only when it must."""

    def __init__(self, llm, gbnf: str):
        # the bindings the model was loaded with (llama_cpp_lib(); calling it again would reset --verbose)
        self._lib = L = llm.lib
        self._smpl = L.llama_sampler_init_grammar(llm.vocab, gbnf.encode("utf-8"), b"root")
        if not self._smpl:
            raise LlavaLocalError("llama.cpp could not parse the grammar (run with --verbose for its log)")
        self.n_vocab = llm.n_vocab
        if llm not in _vocabs:
            _vocabs[llm] = _Vocab(llm)
        self._vocab = _vocabs[llm]
        self._tail = b""                   # the answer's unfinished UTF-8 character
        self._all = _Candidates(L, self.n_vocab)
        self._one = _Candidates(L, 1)

    def _utf8_ids(self) -> np.ndarray:
        """The tokens that keep the answer valid UTF-8 (before the grammar's own check)."""
        v = self._vocab
        if not self._tail:
            return v.fresh_ids
        return np.array([t for t in v.cont_ids if _utf8_tail(self._tail + v.piece(t)) is not None], np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar forbids here at -inf (`logits`, perhaps a
        view of llama.cpp's buffer, is never written)."""
        if logits.shape != (self.n_vocab,):
            raise ValueError(f"logits of shape {logits.shape}, expected ({self.n_vocab},)")
        ids = self._utf8_ids()
        rows = self._all.rows
        rows["id"][:len(ids)] = ids
        rows["logit"][:len(ids)] = logits[ids]
        out = np.full(self.n_vocab, -np.inf, np.float32)
        out[ids] = self._all.apply(self._smpl, 0, len(ids))
        if not np.isfinite(out).any():
            raise LlavaLocalError("no token of the vocabulary continues the grammar here (is end-of-generation "
                                  "masked, e.g. by ignore_eos?)")
        return out

    def mask_best(self, logits: np.ndarray, k: int, scan: int = 256) -> np.ndarray:
        """For a top-k draw: `logits` with the best allowed tokens kept, at least the `k` best, and every
        other token at -inf. The best `scan` candidates are checked best first until `k` are allowed,
        so a top-k draw sees what it would see after `mask` (up to the order of exactly equal logits);
        when fewer than `k` of them are allowed, this is `mask`."""
        n = self.n_vocab
        m = min(n, max(scan, 2 * k))
        if m == n or self._tail or logits.shape != (n,):
            return self.mask(logits)
        best = np.argpartition(-logits, m - 1)[:m]
        best = best[np.argsort(-logits[best])]
        best = best[self._vocab.fresh_ok[best]]
        rows = self._all.rows
        rows["id"][:len(best)] = best
        rows["logit"][:len(best)] = logits[best]
        found, done, step = 0, 0, k
        while found < k and done < len(best):
            end = min(len(best), done + step)
            found += int(np.isfinite(self._all.apply(self._smpl, done, end)).sum())
            done, step = end, 2 * step
        if found < k:
            return self.mask(logits)
        out = np.full(n, -np.inf, np.float32)
        checked = rows[:done]
        ok = np.isfinite(checked["logit"])
        out[checked["id"][ok]] = checked["logit"][ok]
        return out

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (the grammar applied to that one token: cheap)."""
        piece = self._vocab.piece(token)
        if _utf8_tail(self._tail + piece) is None or (self._tail and not piece):
            return False
        self._one.rows[0] = (token, 0.0, 0.0)
        return bool(np.isfinite(self._one.apply(self._smpl, 0, 1)[0]))

    def accept(self, token: int) -> None:
        """Advance the grammar by `token`, which it must allow (llama.cpp aborts the process on one it
        does not, so that is checked here)."""
        if not self.allows(token):
            raise LlavaLocalError(f"token {token} does not continue the grammar here")
        self._lib.llama_sampler_accept(self._smpl, token)
        self._tail = _utf8_tail(self._tail + self._vocab.piece(token))

    def close(self) -> None:
        if getattr(self, "_smpl", None):
            self._lib.llama_sampler_free(self._smpl)
            self._smpl = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
