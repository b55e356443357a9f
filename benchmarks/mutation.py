"""Targeted mutation run over the request path and the deck store's commit and admission rules.

Each mutant is one small text patch of the code: (snippet, replacement) in the one file of carddeck/
that holds the snippet (found by searching, so the mutant survives files moving between packages),
and the test files that should notice it. The tree is copied once to a temporary directory; each
mutant is applied there, its test files run against the copy (``PYTHONPATH`` points at it, so
server subprocesses import the mutant too), and the file is restored. A mutant is *killed* when its
tests fail, *survived* when they pass; ``EQUIVALENT`` names the survivors that cannot be told apart
from the original by any request, with the reason.

Not part of the default test run (it runs ~40 test files' worth of tests):

    nice -n 10 python benchmarks/mutation.py            # every mutant; prints a table and the score
    python benchmarks/mutation.py --list                 # names and what each breaks
    python benchmarks/mutation.py --only http-infer-skips-drain --keep   # one mutant, keep the copy

mutmut 3 and cosmic-ray both mutate every operator of every module they are given and rerun the
whole selected suite per mutant: on this 2-core machine, with tests that start real servers, that is
hours for the request path alone. These mutants are the plausible ones (a check dropped, a status
swapped, a bound moved) and each runs only the test files that cover its code.
"""

from __future__ import annotations

import argparse
import json
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "carddeck"


@dataclass(frozen=True)
class Mutant:
    name: str
    old: str  # a snippet found exactly once in exactly one file under carddeck/ (``where`` narrows the search)
    new: str
    tests: tuple[str, ...]
    where: str = ""  # a path fragment, when the snippet also occurs in another file
    why: str = ""  # what it breaks, in words


DRAIN = ("tests/serving/test_dataplane.py",)
AUTH = ("tests/server/test_auth.py",)
GRPC_CODES = ("tests/server/test_status_codes.py", "tests/server/test_server.py")
HTTP = ("tests/http/test_routes.py",)
STORE = ("tests/deck/test_store.py",)

# fmt: off
MUTANTS: tuple[Mutant, ...] = (
    # -- drain: the data plane, and each transport's use of it --------------------------------
    Mutant("http-infer-skips-drain", "    @work\n    def infer(self, call: Call)", "    def infer(self, call: Call)",
           (*HTTP, *AUTH), "http/", "HTTP infer is served while the server drains"),
    Mutant("grpc-predict-skips-drain", "    @rpc(INFERENCE, work=True)\n    def Predict(",
           "    @rpc(INFERENCE)\n    def Predict(", ("tests/server/test_server.py",), "",
           "gRPC Predict is served while the server drains"),
    Mutant("oip-infer-skips-drain", "    @rpc(INFERENCE, work=True)\n    def ModelInfer(",
           "    @rpc(INFERENCE)\n    def ModelInfer(", ("tests/server/test_server.py", *AUTH), "",
           "gRPC ModelInfer is served while the server drains"),
    Mutant("grpc-wrapper-skips-drain", "            with admit() if work else contextlib.nullcontext():\n"
           "                return behavior(",
           "            if True:\n                return behavior(", ("tests/server/test_server.py",), "",
           "the one gRPC wrapper serves every unary RPC while the server drains"),
    Mutant("http-admits-every-route", '    work = getattr(handler, "work", False)', "    work = True", HTTP, "http/",
           "HTTP metadata routes are refused while the server drains, like work"),
    Mutant("grpc-stream-errors-unmapped",
           "            except Exception as exc:\n                internal_error(context, name, exc)\n\n"
           "        return functools.wraps(behavior)(call_stream)",
           "\n        return functools.wraps(behavior)(call_stream)", ("tests/server/test_handlers.py",), "",
           "a bug in a streaming RPC reaches the client as UNKNOWN with its message"),
    Mutant("dataplane-no-drain-check", "            if self._draining:\n                raise NotReady(",
           "            if False:\n                raise NotReady(", DRAIN, "", "new work is accepted while draining"),
    Mutant("drain-does-not-wait", "            while self._inflight > 0:", "            while False:", DRAIN, "",
           "drain returns before in-flight requests finish"),
    Mutant("inflight-not-released", "                self._inflight -= 1\n", "                self._inflight -= 0\n",
           DRAIN, "", "a finished request stays counted in flight"),
    Mutant("ready-during-shutdown", "bool(deck.cards) and not self.admission.shutting_down", "bool(deck.cards)",
           (*DRAIN, *HTTP), "", "readiness stays true after SIGTERM"),
    # -- micro-batching: each merged request routed and answered on its own rows ----------------
    Mutant("route-on-batch-mean", "np.stack([features[a:b].mean(axis=0) for a, b in spans])",
           "np.stack([features.mean(axis=0) for a, b in spans])", DRAIN, "",
           "merged requests are routed on the whole batch's mean"),
    Mutant("split-rows-shifted", "                offset += n\n", "                offset += n - (n > 1)\n", DRAIN, "",
           "a merged request gets another request's rows back"),
    Mutant("bad-policy-checked-in-batch", "POLICIES.get(policy)  # a bad name fails its own",
           "None  # a bad name fails its own", DRAIN, "",
           "a bad policy name fails the merged batch, not its own request"),
    # -- auth -----------------------------------------------------------------------------------
    Mutant("admin-open-without-flag", "self.admin_open = allow_unauthenticated_admin and not admin_token",
           "self.admin_open = not admin_token", AUTH, "", "admin RPCs open when no admin token is set"),
    Mutant("admin-token-not-compared", "            if not _matches(token, self.admin_token):",
           "            if token is None:", AUTH, "", "any bearer token passes as admin"),
    Mutant("inference-token-ignored", "        if self.inference_token and not (", "        if False and not (",
           AUTH, "", "inference calls pass without the inference token"),
    Mutant("admin-token-refused-for-inference",
           "(_matches(token, self.inference_token) or _matches(token, self.admin_token))",
           "(_matches(token, self.inference_token))", AUTH, "", "the admin token no longer works for inference"),
    Mutant("empty-token-matches", "return given is not None and bool(expected) and hmac",
           "return given is not None and hmac", AUTH, "", "an empty configured token matches an empty one"),
    Mutant("bearer-scheme-case-sensitive", 'scheme.lower() == "bearer"', 'scheme == "bearer"', AUTH, "",
           "'Bearer' (as clients send it) is not recognised"),
    Mutant("unknown-grpc-method-open", "self.access.get(method, INFERENCE)", "self.access.get(method, OPEN)", AUTH,
           "", "a method no servicer declares is open to callers without a token"),
    Mutant("http-load-is-inference", '"RepositoryModelLoad", ADMIN, self.load',
           '"RepositoryModelLoad", INFERENCE, self.load',
           (*AUTH, *HTTP), "", "HTTP model load needs only the inference token"),
    # -- error mapping --------------------------------------------------------------------------
    Mutant("grpc-conflict-invalid-argument", "errors.DeckConflict: grpc.StatusCode.FAILED_PRECONDITION",
           "errors.DeckConflict: grpc.StatusCode.INVALID_ARGUMENT", GRPC_CODES, "",
           "a duplicate card is INVALID_ARGUMENT, not FAILED_PRECONDITION"),
    Mutant("grpc-too-large-invalid-argument", "    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,\n", "",
           GRPC_CODES, "", "too many images is INVALID_ARGUMENT, not RESOURCE_EXHAUSTED"),
    Mutant("grpc-race-not-aborted", "    errors.ConcurrentChange: grpc.StatusCode.ABORTED,", "", GRPC_CODES, "",
           "a lost store race is FAILED_PRECONDITION, not ABORTED (retry)"),
    Mutant("grpc-status-exact-class", "    for cls in type(exc).__mro__:\n        code = STATUS_CODES",
           "    for cls in (type(exc),):\n        code = STATUS_CODES", GRPC_CODES, "",
           "subclasses (ReadOnlyDeck, ...) map to INTERNAL"),
    Mutant("grpc-deadline-is-cancelled", "    if isinstance(exc, errors.Cancelled) and remaining is not None",
           "    if False and remaining is not None", GRPC_CODES, "",
           "a deadline passed in the queue is CANCELLED, not DEADLINE_EXCEEDED"),
    Mutant("http-conflict-400", "    errors.DeckConflict: 409,", "    errors.DeckConflict: 400,",
           (*HTTP, "tests/server/test_status_codes.py"), "", "a duplicate card over HTTP is 400, not 409"),
    Mutant("http-not-ready-500", "    errors.NotReady: 503,", "", (*HTTP, "tests/server/test_status_codes.py"), "",
           "not ready / draining over HTTP is 500, not 503"),
    Mutant("http-status-exact-class", "    for cls in type(exc).__mro__:\n        status = HTTP_STATUS",
           "    for cls in (type(exc),):\n        status = HTTP_STATUS",
           (*HTTP, "tests/server/test_status_codes.py"), "",
           "subclasses map to 500 over HTTP"),
    # -- request limits and the input contract --------------------------------------------------
    Mutant("layout-checked-after-decode", 'and tuple(shape[1:]) == ((h, w, c) if datatype == "UINT8" else (c, h, w))',
           "and True", ("tests/serving/test_codec.py",), "",
           "a tensor's shape is checked against the deck only after its bytes"),
    Mutant("max-images-off-by-one", "else max_images)", "else max_images + 1)",
           ("tests/server/test_convert.py", "tests/server/test_server.py", *HTTP), "",
           "one image more than --max-request-images is accepted"),
    Mutant("upload-limit-per-chunk", "if len(self._buf) + len(data) > self.limit_bytes:",
           "if len(data) > self.limit_bytes:", ("tests/serving/test_uploads.py",), "",
           "a card streamed in small chunks passes --max-card-mb"),
    Mutant("upload-digest-unchecked", "            if digest != self.sha256.lower():", "            if False:",
           ("tests/serving/test_uploads.py",), "", "an upload whose sha256 does not match is stored"),
    # -- the store: commit and admission --------------------------------------------------------
    Mutant("commit-ignores-stamp", "        if current != expected:\n            raise ConcurrentChange",
           "        if False:\n            raise ConcurrentChange", ("tests/deck/test_backends.py", *STORE), "deck/",
           "a writer that lost the race overwrites the other's manifest"),
    Mutant("duplicate-other-bytes-accepted", "if same.sha256.get(MODEL_FILE) == sha256(data):", "if True:", STORE, "",
           "the same name/version with other bytes is a no-op, not DeckConflict"),
    Mutant("classes-unchecked", "if m.class_names and tuple(meta.class_names) != tuple(m.class_names):",
           "if False:", STORE, "", "a card with other classes joins the deck"),
    Mutant("input-unchecked", "if m.input is not None and input_to_dict(meta.input) != dict(m.input):",
           "if False:", STORE, "", "a card with another input size joins the deck"),
    Mutant("signature-length-unchecked", "if dims and len(signature) not in dims:", "if False:", STORE, "",
           "a card whose signature length differs joins the deck"),
    Mutant("reserved-name-ignores-deck-model", "        if meta.name in taken:",
           "        if meta.name in RESERVED_NAMES:", (*STORE, *DRAIN), "",
           "a card may take the deck's configured model name"),
    Mutant("read-only-writable", "        if self.read_only:\n            raise ReadOnlyDeck(",
           "        if False:\n            raise ReadOnlyDeck(", STORE, "", "the packaged default deck can be changed"),
    Mutant("add-keeps-version",
           "                    version=m.version + 1,\n                    cards=(*m.cards, entry_),",
           "                    version=m.version,\n                    cards=(*m.cards, entry_),", STORE, "",
           "adding a card does not bump the deck version (replicas never see it)"),
    Mutant("remove-keeps-contract", "class_names=m.class_names if keep else (),", "class_names=m.class_names,",
           STORE, "", "an emptied deck still refuses cards of other classes"),
    Mutant("sha-unverified", "        if verify and sha256(data) != digest:", "        if False:", STORE, "",
           "a card file that does not match the manifest sha256 is served"),
    Mutant("older-version-active", "if c.name not in best or c.version > best[c.name].version:",
           "if c.name not in best or c.version < best[c.name].version:", STORE, "",
           "the oldest version of a card is the active one"),
    Mutant("failed-change-leaves-files", "        for key in keys:  # fresh keys: nobody else's files",
           "        for key in ():  # fresh keys: nobody else's files", ("tests/deck/test_s3.py",), "",
           "an S3 change that does not commit leaves its objects behind"),
    Mutant("failed-poll-counts-as-sync", "failures=old.failures + 1, error=str(exc))",
           "failures=old.failures + 1, error=str(exc), last_sync=time.time())",
           ("tests/http/test_store_outage.py",), "", "a poll that failed is reported as the last sync"),
)
# fmt: on

# Survivors that no request can tell from the original, and why (checked by reading the code).
EQUIVALENT: dict[str, str] = {
    "empty-token-matches": "both callers already rule out an empty token: refusal() returns before _matches when the "
    "admin token is empty and guards the inference check with `self.inference_token and`",
}


def locate(tree: Path, m: Mutant) -> Path:
    """The one file under ``tree``/carddeck holding ``m.old`` exactly once; ValueError otherwise."""
    hits = []
    for path in sorted((tree / PACKAGE).rglob("*.py")):
        rel = path.relative_to(tree).as_posix()
        if "proto_gen" in rel or (m.where and m.where not in rel):
            continue
        count = path.read_text().count(m.old)
        if count:
            hits.append((rel, count))
    if len(hits) != 1 or hits[0][1] != 1:
        raise ValueError(f"{m.name}: snippet found {hits or 'nowhere'}; it must occur once in one file")
    return tree / hits[0][0]


def copy_tree(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.egg-info",
                                    ".benchmarks")  # fmt: skip
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout', seconds, tail of the output) for ``tests`` run against ``tree``."""
    missing = [t for t in tests if not (tree / t).exists()]
    if missing:
        return "missing tests " + ", ".join(missing), 0.0, ""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""
    tail = (done.stdout + done.stderr)[-1500:]
    return ("pass" if done.returncode == 0 else "fail"), time.monotonic() - start, tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="mutant names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant's test run (a timeout kills it)")
    ap.add_argument("--json", type=Path, help="write the outcomes here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy of the tree")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.why}  [{', '.join(m.tests)}]")
        return 0
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    tmp = Path(tempfile.mkdtemp(prefix="carddeck-mutation-"))
    tree = copy_tree(tmp / "tree")
    outcomes: list[dict] = []
    try:
        for m in chosen:
            try:
                path = locate(tree, m)
            except ValueError as exc:  # the code moved on: the mutant needs updating, it is not a kill
                outcomes.append({"name": m.name, "outcome": "stale", "detail": str(exc)})
                print(f"STALE    {m.name}: {exc}", flush=True)
                continue
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                py_compile.compile(str(path), cfile=str(tmp / "check.pyc"), doraise=True)
                result, seconds, tail = run_tests(tree, m.tests, args.timeout)
            except py_compile.PyCompileError as exc:
                result, seconds, tail = "invalid", 0.0, str(exc)
            finally:
                path.write_text(original)
            outcome = {"pass": "survived", "fail": "killed", "timeout": "killed"}.get(result, result)
            rel = path.relative_to(tree).as_posix()
            outcomes.append({"name": m.name, "file": rel, "outcome": outcome, "seconds": round(seconds, 1),
                             "why": m.why, "tail": tail if outcome == "survived" else ""})  # fmt: skip
            note = f"  (equivalent: {EQUIVALENT[m.name]})" if outcome == "survived" and m.name in EQUIVALENT else ""
            print(f"{outcome.upper():8s} {m.name:36s} {rel:34s} {seconds:6.1f} s{note}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"tree kept at {tree}")
    counted = [o for o in outcomes if o["outcome"] in ("killed", "survived")]
    killed = sum(o["outcome"] == "killed" for o in counted)
    equivalent = [o["name"] for o in counted if o["outcome"] == "survived" and o["name"] in EQUIVALENT]
    survivors = [o["name"] for o in counted if o["outcome"] == "survived" and o["name"] not in EQUIVALENT]
    score = killed / max(1, len(counted) - len(equivalent))
    print(f"\nmutation score: {killed}/{len(counted) - len(equivalent)} killed = {score:.0%} "
          f"({len(equivalent)} equivalent, {len(outcomes) - len(counted)} stale or invalid)")  # fmt: skip
    for name in survivors:
        print(f"  survived: {name}")
    if args.json:
        args.json.write_text(json.dumps({"score": score, "outcomes": outcomes}, indent=1))
    return 1 if survivors or len(counted) < len(outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
