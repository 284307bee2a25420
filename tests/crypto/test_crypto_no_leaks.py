"""Static guards that no PyNaCl or argon2-cffi exception or type crosses medrelay.crypto's boundary.

1. **Exceptions** (the main guard). An AST walk over every `crypto/*.py` finds each call into
   `nacl.*` or `argon2.*`, resolving the callee through imports (`from nacl import bindings`,
   `import nacl.secret`, aliases), through local variables and `self.<attr>` assigned from such a
   call, and through method calls on their results (`nacl.secret.SecretBox(k).decrypt(...)` is
   `nacl.secret.SecretBox.decrypt`). Each such call must either
   - be in `NON_RAISING`: functions that raise only for arguments of the wrong type or size, which
     the wrappers check before calling (each entry says why); or
   - sit, in the same function, inside the body of a `try` with a handler that catches a PyNaCl/
     argon2 exception or a broad builtin (`Exception`, `RuntimeError`, `ValueError`) and turns it
     into something else: it raises a new exception or returns (never a bare `raise`).
   Anything else (say, `bindings.crypto_sign_open` or `SecretBox.decrypt` on attacker bytes
   outside a `try`) fails with the file, line and callee. The walk cannot see which exception a
   handler re-raises, nor calls made through containers or other modules' objects; the behavioural
   tests (Wycheproof, the hypothesis "only CryptoError escapes" properties) cover what it cannot.
   A call through an alias that the walk cannot resolve is simply not seen, so the guard can miss
   a leak but does not invent one.
2. **Types**. No public function, method, property or dataclass field of any medrelay.crypto
   module mentions a nacl/argon2 type in its annotations (`typing.get_type_hints`, with a textual
   fallback for annotations that cannot be resolved at run time).

If the exception guard flags a call that provably cannot raise on checked inputs, add it to
`NON_RAISING` with the reason; otherwise wrap it and map the error to medrelay.crypto.errors.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

import medrelay.crypto

CRYPTO_DIR = Path(__file__).resolve().parent.parent.parent / "crypto"
FOREIGN_ROOTS = ("nacl", "argon2")
FOREIGN_EXCEPTION_MODULES = ("nacl.exceptions.", "argon2.exceptions.")
BROAD_BUILTINS = {"Exception", "RuntimeError", "ValueError"}

NON_RAISING = {
    # Type and length checks only (seed / secret key / scalar of 32 or 64 bytes, checked first).
    "nacl.bindings.crypto_sign_seed_keypair",
    "nacl.bindings.crypto_sign",
    "nacl.bindings.crypto_scalarmult_base",
    "nacl.bindings.crypto_core_ed25519_is_valid_point",
    "nacl.bindings.crypto_sign_ed25519_sk_to_curve25519",
    "nacl.bindings.crypto_hash_sha256",
    "nacl.bindings.crypto_hash_sha512",
    "nacl.bindings.crypto_generichash_blake2b_salt_personal",
    # Encryption never fails for a key and nonce of the right size.
    "nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt",
    "nacl.bindings.sodium_pad",
    "nacl.secret.SecretBox",
    "nacl.secret.SecretBox.encrypt",
    # secretstream: allocating a state, keygen, initialising from a 32-byte key and 24-byte
    # header, and pushing a chunk cannot fail (libsodium returns 0; PyNaCl checks types only).
    "nacl.bindings.crypto_secretstream_xchacha20poly1305_state",
    "nacl.bindings.crypto_secretstream_xchacha20poly1305_keygen",
    "nacl.bindings.crypto_secretstream_xchacha20poly1305_init_push",
    "nacl.bindings.crypto_secretstream_xchacha20poly1305_init_pull",
    "nacl.bindings.crypto_secretstream_xchacha20poly1305_push",
    # The OS CSPRNG (system_rng; the count is checked first).
    "nacl.utils.random",
    # argon2-cffi's hasher constructor only stores parameters (type errors only).
    "argon2.PasswordHasher",
}


@dataclass(frozen=True, slots=True)
class ForeignCall:
    """One call into nacl/argon2: where it is, what it resolves to, and whether it is guarded."""

    path: str
    line: int
    callee: str
    guarded: bool

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.callee}"


def _is_foreign(qualified: str | None) -> bool:
    return qualified is not None and qualified.split(".")[0] in FOREIGN_ROOTS


def _imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> qualified name, for every import of nacl/argon2 anywhere in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in FOREIGN_ROOTS:
                    if alias.asname:
                        names[alias.asname] = alias.name
                    else:
                        names[root] = root
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] in FOREIGN_ROOTS
        ):
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualify(expr: ast.expr, aliases: dict[str, str]) -> str | None:
    """The dotted name an expression refers to, collapsing calls (`f(x).g` -> `f.g`), or None."""
    parts: list[str] = []
    while True:
        if isinstance(expr, ast.Attribute):
            if isinstance(expr.value, ast.Name):
                attribute_alias = aliases.get(f"{expr.value.id}.{expr.attr}")
                if attribute_alias is not None:
                    return ".".join([attribute_alias, *reversed(parts)])
            parts.append(expr.attr)
            expr = expr.value
        elif isinstance(expr, ast.Call):
            expr = expr.func
        elif isinstance(expr, ast.Name):
            base = aliases.get(expr.id)
            return None if base is None else ".".join([base, *reversed(parts)])
        else:
            return None


def _assigned_aliases(
    nodes: list[ast.stmt], aliases: dict[str, str], *, self_attributes: bool
) -> dict[str, str]:
    """Aliases made by assignments (`x = nacl...`, and `self.x = nacl...` when asked), iterated
    until stable so chains of assignments resolve."""
    found = dict(aliases)
    assignments = [
        node
        for statement in nodes
        for node in ast.walk(statement)
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
    ]
    for _ in range(3):
        for node in assignments:
            assert node.value is not None
            qualified = _qualify(node.value, found)
            if not _is_foreign(qualified):
                continue
            assert qualified is not None
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                # In a class, a method's local variables are not the class's: only `self.x`
                # (anywhere) and names bound directly in the class body count.
                if isinstance(target, ast.Name) and (not self_attributes or node in nodes):
                    found[target.id] = qualified
                elif (
                    self_attributes
                    and isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id in ("self", "cls")
                ):
                    found[f"{target.value.id}.{target.attr}"] = qualified
    return found


def _handler_maps_foreign_errors(handler: ast.ExceptHandler, aliases: dict[str, str]) -> bool:
    """Catches a nacl/argon2 exception or a broad builtin, and raises anew or returns."""
    if handler.type is None:
        caught: list[ast.expr] = []
        catches = True
    else:
        caught = list(handler.type.elts) if isinstance(handler.type, ast.Tuple) else [handler.type]
        catches = False
    for expr in caught:
        qualified = _qualify(expr, aliases)
        if qualified is not None and qualified.startswith(FOREIGN_EXCEPTION_MODULES):
            catches = True
        if isinstance(expr, ast.Name) and expr.id in BROAD_BUILTINS:
            catches = True
    exits = [node for node in ast.walk(handler) if isinstance(node, ast.Raise | ast.Return)]
    bare_reraise = any(isinstance(node, ast.Raise) and node.exc is None for node in exits)
    return catches and bool(exits) and not bare_reraise


def _calls(
    node: ast.AST, aliases: dict[str, str], guards: tuple[ast.Try, ...]
) -> Iterator[tuple[ast.Call, tuple[ast.Try, ...]]]:
    """Every call under `node` with the `try` statements whose *body* encloses it."""
    if isinstance(node, ast.Try):
        for statement in node.body:
            yield from _calls(statement, aliases, (*guards, node))
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            yield from _calls(part, aliases, guards)
        return
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        # A nested function runs later: a `try` around its definition does not guard its calls.
        for statement in node.body:
            yield from _calls(statement, aliases, ())
        return
    if isinstance(node, ast.Call):
        yield node, guards
    for child in ast.iter_child_nodes(node):
        yield from _calls(child, aliases, guards)


def _body_calls(body: list[ast.stmt], aliases: dict[str, str], path: str) -> Iterator[ForeignCall]:
    """The foreign calls of one function body (or of a module's loose statements), with the
    body's own local aliases."""
    local = _assigned_aliases(body, aliases, self_attributes=False)
    for statement in body:
        for call, guards in _calls(statement, local, ()):
            callee = _qualify(call.func, local)
            if not _is_foreign(callee):
                continue
            assert callee is not None
            guarded = callee in NON_RAISING or callee.startswith(FOREIGN_EXCEPTION_MODULES)
            guarded = guarded or any(
                _handler_maps_foreign_errors(handler, local)
                for guard in guards
                for handler in guard.handlers
            )
            yield ForeignCall(path, call.lineno, callee, guarded)


def _scope_calls(body: list[ast.stmt], aliases: dict[str, str], path: str) -> Iterator[ForeignCall]:
    """Calls of a module or class body: functions and methods each with their own local aliases;
    statements outside functions as one scope."""
    loose: list[ast.stmt] = []
    for statement in body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _body_calls(statement.body, aliases, path)
        elif isinstance(statement, ast.ClassDef):
            attributes = _assigned_aliases(statement.body, aliases, self_attributes=True)
            yield from _scope_calls(statement.body, attributes, path)
        else:
            loose.append(statement)
    yield from _body_calls(loose, aliases, path)


def foreign_calls(source: str, path: str) -> list[ForeignCall]:
    """Every nacl/argon2 call of a module's source, with its guard verdict."""
    tree = ast.parse(source, filename=path)
    aliases = _assigned_aliases(
        [s for s in tree.body if isinstance(s, ast.Assign | ast.AnnAssign)],
        _imports(tree),
        self_attributes=False,
    )
    return list(_scope_calls(tree.body, aliases, path))


CRYPTO_SOURCES = sorted(CRYPTO_DIR.glob("*.py"))


@pytest.mark.parametrize("path", CRYPTO_SOURCES, ids=lambda p: p.name)
def test_every_raising_nacl_or_argon2_call_maps_its_errors(path: Path) -> None:
    """Each call into nacl/argon2 is a known non-raising one or is guarded by a handler that maps
    the library's exception to something of ours."""
    unguarded = [
        str(call)
        for call in foreign_calls(path.read_text(encoding="utf-8"), path.name)
        if not call.guarded
    ]
    assert unguarded == []


def test_the_keys_module_really_is_scanned() -> None:
    """The walk finds the calls it must see in keys.py (so an empty result is not vacuous): the
    guarded verify and exchange, and the allow-listed seed key pair."""
    calls = foreign_calls((CRYPTO_DIR / "keys.py").read_text(encoding="utf-8"), "keys.py")
    by_callee = {call.callee: call.guarded for call in calls}
    assert by_callee["nacl.bindings.crypto_sign_open"] is True
    assert by_callee["nacl.bindings.crypto_scalarmult"] is True
    assert by_callee["nacl.bindings.crypto_sign_seed_keypair"] is True


GUARD_EXAMPLES: dict[str, tuple[list[str], str, bool]] = {
    "unguarded binding": (
        ["from nacl import bindings", "def f(m, k):", "    return bindings.crypto_sign_open(m, k)"],
        "nacl.bindings.crypto_sign_open",
        False,
    ),
    "guarded and mapped": (
        [
            "from nacl import bindings",
            "from nacl.exceptions import CryptoError as E",
            "def f(m, k):",
            "    try:",
            "        return bindings.crypto_sign_open(m, k)",
            "    except E:",
            "        raise BadSignature() from None",
        ],
        "nacl.bindings.crypto_sign_open",
        True,
    ),
    "bare re-raise": (
        [
            "import nacl.bindings",
            "def f(m, k):",
            "    try:",
            "        nacl.bindings.crypto_scalarmult(m, k)",
            "    except RuntimeError:",
            "        raise",
        ],
        "nacl.bindings.crypto_scalarmult",
        False,
    ),
    "handler for an unrelated error": (
        [
            "from nacl import bindings",
            "def f(m, k):",
            "    try:",
            "        bindings.crypto_scalarmult(m, k)",
            "    except KeyError:",
            "        raise InvalidKey()",
        ],
        "nacl.bindings.crypto_scalarmult",
        False,
    ),
    "call in the handler, not the body": (
        [
            "from nacl import bindings",
            "def f(m, k):",
            "    try:",
            "        pass",
            "    except ValueError:",
            "        bindings.crypto_scalarmult(m, k)",
            "        raise X()",
        ],
        "nacl.bindings.crypto_scalarmult",
        False,
    ),
    "method on a box built inline": (
        ["import nacl.secret", "def f(k, c):", "    return nacl.secret.SecretBox(k).decrypt(c)"],
        "nacl.secret.SecretBox.decrypt",
        False,
    ),
    "method through a local alias": (
        [
            "import nacl.secret as s",
            "def f(k, c):",
            "    box = s.SecretBox(k)",
            "    return box.decrypt(c)",
        ],
        "nacl.secret.SecretBox.decrypt",
        False,
    ),
    "method through a self attribute": (
        [
            "import argon2",
            "class H:",
            "    def __init__(self):",
            "        self._h = argon2.PasswordHasher()",
            "    def verify(self, h, p):",
            "        return self._h.verify(h, p)",
        ],
        "argon2.PasswordHasher.verify",
        False,
    ),
    "allow-listed encryption": (
        ["import nacl.secret", "def f(k, m):", "    return nacl.secret.SecretBox(k).encrypt(m)"],
        "nacl.secret.SecretBox.encrypt",
        True,
    ),
    "try around a nested function's definition does not count": (
        [
            "from nacl import bindings",
            "def f(m, k):",
            "    try:",
            "        def g():",
            "            return bindings.crypto_sign_open(m, k)",
            "    except ValueError:",
            "        return None",
            "    return g",
        ],
        "nacl.bindings.crypto_sign_open",
        False,
    ),
    "try in the caller does not count": (
        [
            "from nacl import bindings",
            "def g(m, k):",
            "    return bindings.crypto_sign_open(m, k)",
            "def f(m, k):",
            "    try:",
            "        return g(m, k)",
            "    except ValueError:",
            "        return None",
        ],
        "nacl.bindings.crypto_sign_open",
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(GUARD_EXAMPLES))
def test_the_guard_tells_guarded_from_unguarded_calls(name: str) -> None:
    """The walker's verdicts on small sources: resolution through aliases, `self` attributes and
    inline constructors, and the handler rules (mapped, bare re-raise, unrelated type, scope)."""
    lines, callee, expected = GUARD_EXAMPLES[name]
    verdicts = {call.callee: call.guarded for call in foreign_calls("\n".join(lines), name)}
    assert verdicts.get(callee) is expected, verdicts


# ---------------------------------------------------------------------------------------------
# Types


def _crypto_modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"medrelay.crypto.{info.name}")
        for info in pkgutil.iter_modules(medrelay.crypto.__path__)
    ]


def _annotated_objects(module: ModuleType) -> Iterator[tuple[str, object]]:
    """Public functions, classes (their fields), methods and properties defined in `module`."""
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value):
            yield name, value
        elif inspect.isclass(value):
            yield name, value
            for member_name, member in vars(value).items():
                if member_name.startswith("_") and member_name != "__init__":
                    continue
                if isinstance(member, property) and member.fget is not None:
                    yield f"{name}.{member_name}", member.fget
                elif isinstance(member, classmethod | staticmethod):
                    yield f"{name}.{member_name}", member.__func__
                elif inspect.isfunction(member):
                    yield f"{name}.{member_name}", member


def _mentioned_types(hint: object) -> Iterator[object]:
    yield hint
    for argument in typing.get_args(hint):
        yield from _mentioned_types(argument)


def _foreign_annotations(obj: object) -> list[str]:
    try:
        hints = typing.get_type_hints(obj)
    except Exception:  # unresolvable annotations fall back to their text
        raw = getattr(obj, "__annotations__", {})
        return [str(text) for text in raw.values() if any(r in str(text) for r in FOREIGN_ROOTS)]
    return [
        repr(mentioned)
        for hint in hints.values()
        for mentioned in _mentioned_types(hint)
        if getattr(mentioned, "__module__", "").split(".")[0] in FOREIGN_ROOTS
    ]


@pytest.mark.parametrize("module", _crypto_modules(), ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_no_public_signature_mentions_a_nacl_or_argon2_type(module: ModuleType) -> None:
    """Callers of medrelay.crypto never receive or pass a PyNaCl/argon2 object."""
    offenders = [
        f"{name}: {annotation}"
        for name, obj in _annotated_objects(module)
        for annotation in _foreign_annotations(obj)
    ]
    assert offenders == []


def test_the_type_guard_sees_a_leaking_annotation() -> None:
    """A function annotated with a PyNaCl type is reported (so the guard is not vacuous)."""
    import nacl.signing

    def leaky(key: nacl.signing.VerifyKey) -> None:
        del key

    assert _foreign_annotations(leaky) != []
