"""The conformance suite every provider passes, found automatically: add a provider folder and its
fixtures, and these tests cover it.

Fixtures: ``tests/fixtures/<provider>/<kind>[.<variant>].json``, one raw payload (an API page or a
push body) per file, or a JSON list of payloads received in that order. A fixture may map to
``Deletion``s (the provider says a record is gone: deletion webhooks, Oura's deleted sleeps). A ``bad…`` variant must be
refused with MappingError: either the whole file, or each payload under ``{"cases": {name: payload}}``
(or a plain ``{name: payload}`` map).
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
from terra_oracle import assert_terra_record

from connectors import registry
from connectors.base import Deletion, MappingError, Provider, natural_key
from schemas import MODEL_TYPES
from schemas.serde import validate_record

FIXTURES = Path(__file__).parent / "fixtures"
USER = "conformance-user"


def _fixtures() -> list[tuple[str, str, str, Path]]:
    found = []
    for slug in sorted(registry()):
        for path in sorted((FIXTURES / slug).glob("*.json")):
            kind, _, variant = path.stem.partition(".")
            found.append((slug, kind, variant, path))
    return found


FIXTURE_CASES = _fixtures()
GOOD = [(s, k, p) for s, k, v, p in FIXTURE_CASES if not v.startswith("bad")]
BAD = [(s, k, p) for s, k, v, p in FIXTURE_CASES if v.startswith("bad")]


def _keyed_body(provider: Provider, payload: Any) -> bool:
    """A push body of a keyed provider (Garmin): ``{kind: [documents]}``, naming its kinds itself."""
    return provider.envelope == "keyed" and isinstance(payload, dict) and all(
        isinstance(docs, list) for docs in payload.values())


def _payloads(path: Path) -> list[Any]:
    """The file's payloads; for a keyed provider a list of documents (not of push bodies) is one pull answer."""
    payload = json.loads(path.read_text())
    provider = registry()[path.parent.name]
    if isinstance(payload, list) and (provider.envelope != "keyed" or all(_keyed_body(provider, p) for p in payload)):
        return payload
    return [payload]


def _normalize(provider: Provider, kind: str, payload: Any):
    """Keyed providers' push bodies name their kinds inside the payload; their other forms (a pull answer's bare
    array, a single document) take the kind from the file name, as from the raw event."""
    return list(provider.normalize(payload, None if _keyed_body(provider, payload) else kind, USER))


@pytest.mark.parametrize("slug", sorted(registry()))
def test_provider_declares_a_manifest_and_documents_its_kinds(slug: str) -> None:
    provider = registry()[slug]
    assert provider.manifest is not None and provider.manifest.provider == slug
    assert provider.kinds, f"{slug} maps no kind"
    for name, spec in provider.kinds.items():
        assert spec.doc, f"{slug}.{name} has no docstring"
        assert set(spec.models) <= set(MODEL_TYPES)


@pytest.mark.parametrize("slug", sorted(registry()))
def test_every_mapped_kind_has_a_realistic_fixture(slug: str) -> None:
    covered = {kind for s, kind, _ in GOOD if s == slug}
    provider = registry()[slug]
    if provider.envelope == "keyed":  # push bodies hold several kinds: count what they contain
        covered = {key for s, _, path in GOOD if s == slug for body in _payloads(path)
                   if _keyed_body(provider, body) for key in body}
    missing = sorted(set(provider.kinds) - covered)
    assert not missing, f"{slug}: kinds without a fixture under tests/fixtures/{slug}/: {missing}"


@pytest.mark.parametrize(("slug", "kind", "path"), GOOD, ids=[f"{s}/{p.name}" for s, _, p in GOOD])
def test_fixture_maps_to_valid_terra_records(slug: str, kind: str, path: Path) -> None:
    provider = registry()[slug]
    payloads = _payloads(path)
    fragments = [f for payload in payloads for f in _normalize(provider, kind, payload)]
    assert fragments or provider.ignores(kind), f"{path.name} produced no record"
    for fragment in fragments:
        if isinstance(fragment, Deletion):  # the provider says a record is gone: a key of a declared model
            assert fragment.natural_key and fragment.provider_user_id
            assert provider.envelope == "keyed" or fragment.type in provider.kinds[kind].models
            continue
        if provider.envelope != "keyed":
            assert fragment.type in provider.kinds[kind].models, f"{kind} declared {provider.kinds[kind].models}"
        record = validate_record(fragment.type, fragment.data)
        assert_terra_record(fragment.type, record)
        metadata = record["metadata"]
        for key in ("start_time", "end_time"):
            if key in metadata:
                assert len(metadata[key]) >= 26 and metadata[key][10] == "T", f"{key} {metadata[key]!r}"
        assert natural_key(fragment.type, record)
        assert fragment.provider_user_id
    again = [f for payload in copy.deepcopy(payloads) for f in _normalize(provider, kind, payload)]
    assert again == fragments, "mapping must be deterministic"
    assert payloads == _payloads(path), "mappers must not modify their input"


@pytest.mark.parametrize(("slug", "kind", "path"), BAD, ids=[f"{s}/{p.name}" for s, _, p in BAD])
def test_bad_fixture_is_refused_with_a_reason(slug: str, kind: str, path: Path) -> None:
    provider = registry()[slug]
    payload = json.loads(path.read_text())
    cases = payload.get("cases") if isinstance(payload, dict) and "cases" in payload else None
    if cases is None and isinstance(payload, dict) and all(isinstance(v, dict) for v in payload.values()) \
            and provider.envelope != "keyed" and not set(payload) & {provider.envelope}:
        cases = payload
    for name, case in (cases or {"whole file": payload}).items():
        with pytest.raises(MappingError) as error:
            _normalize(provider, kind, case)
        assert str(error.value), f"{name}: MappingError without a reason"


def _mutations(value: Any, rng: random.Random, depth: int = 0):
    """Hostile variants of a document: fields dropped, retyped, nulled."""
    if isinstance(value, dict) and value:
        for key in rng.sample(sorted(value), min(3, len(value))):
            for replacement in (None, "garbage", -1, [], {}, 1e308):
                mutated = dict(value)
                mutated[key] = replacement
                yield mutated
            dropped = dict(value)
            dropped.pop(key)
            yield dropped
            if depth < 2:
                for inner in _mutations(value[key], rng, depth + 1):
                    yield dict(value, **{key: inner})
    elif isinstance(value, list) and value:
        for inner in _mutations(value[0], rng, depth + 1):
            yield [inner, *value[1:]]


@pytest.mark.parametrize(("slug", "kind", "path"), GOOD, ids=[f"{s}/{p.name}" for s, _, p in GOOD])
def test_hostile_input_is_mapped_or_refused_never_a_crash(slug: str, kind: str, path: Path) -> None:
    """Whatever the provider sends: valid records or MappingError — no other exception escapes."""
    provider = registry()[slug]
    rng = random.Random(path.name)
    for mutated in list(_mutations(_payloads(path)[0], rng))[:60]:
        try:
            fragments = _normalize(provider, kind, mutated)
        except MappingError:
            continue
        for fragment in fragments:
            if isinstance(fragment, Deletion):
                continue
            with contextlib.suppress(ValueError):  # the validate stage dead-letters it, with its reason
                validate_record(fragment.type, fragment.data)


def test_a_broken_manifest_is_refused_with_its_problems(tmp_path: Path) -> None:
    from connectors.manifest import load_manifest
    from core.errors import FatalError

    path = tmp_path / "manifest.yaml"
    path.write_text("provider: Bad-Name\nterra_name: X\ndisplay_name: x\nauth: {type: oauth2, token_url: nope}\n")
    with pytest.raises(FatalError) as error:
        load_manifest(path)
    message = str(error.value)
    assert str(path) in message and "provider" in message and "authorize_url" in message


@pytest.mark.parametrize(("hooks", "problem"), [
    ("{poll: client.NoSuchHook}", "not a connectors.hooks.ResponseHook subclass"),
    ("{poll: client.PolarOAuth}", "not a connectors.hooks.ResponseHook subclass"),
    ("{oauth: nowhere.PolarOAuth}", "cannot be imported"),
])
def test_a_hook_the_manifest_names_must_exist_or_the_registry_refuses_to_start(
        tmp_path: Path, hooks: str, problem: str) -> None:
    """Hooks are named in the manifest, never found by convention: a missing one fails loudly at start."""
    import connectors
    from core.errors import FatalError

    source = connectors.PROVIDERS_DIR / "polar" / "manifest.yaml"
    path = tmp_path / "manifest.yaml"
    path.write_text("\n".join(line for line in source.read_text().splitlines() if not line.startswith("hooks:"))
                    + f"\nhooks: {hooks}\n")
    with pytest.raises(FatalError, match=problem) as error:
        connectors._checked_manifest(registry()["polar"], path)
    assert str(path) in str(error.value)


def test_every_hook_in_use_is_named_in_its_providers_manifest() -> None:
    from connectors import provider_hook
    from connectors.hooks import default_hooks
    from connectors.oauth import oauth_class

    named = {slug: provider.manifest.hooks for slug, provider in registry().items()}
    assert {slug for slug, hooks in named.items() if hooks.poll} == set(default_hooks())
    for slug, hooks in named.items():
        assert (provider_hook(slug, "oauth") is not None) == (hooks.oauth is not None)
        assert oauth_class(slug).__name__ == (hooks.oauth.partition(".")[2] if hooks.oauth else "ProviderOAuth")


def test_a_polled_kind_whose_mapper_needs_context_must_have_a_hook_attaching_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapper's declared context (fields the API's answer lacks) is attached by the poll hook, or nothing starts."""
    import connectors
    from connectors.base import KindSpec
    from core.errors import FatalError

    provider = registry()["polar"]
    polled = next(iter(provider.manifest.api.endpoints))
    spec = provider.kinds[polled]
    monkeypatch.setitem(provider.kinds, polled, KindSpec(spec.name, spec.models, spec.mapper, spec.doc, ("_missing",)))
    source = connectors.PROVIDERS_DIR / "polar" / "manifest.yaml"
    with pytest.raises(FatalError, match=f"kind {polled!r} needs _missing .*PolarHook.attaches lacks it"):
        connectors._checked_manifest(provider, source)
    path = tmp_path / "manifest.yaml"
    path.write_text("\n".join(line for line in source.read_text().splitlines() if not line.startswith("hooks:")))
    with pytest.raises(FatalError, match=r"no poll hook is named \(hooks.poll\)"):
        connectors._checked_manifest(provider, path)
