#include "rewards/matmul_runner.h"

namespace ossrl {

// Runs as `python3 -I -S -B -c <this> <allowed modules>` inside the sandbox. The runner
// shares its process with the candidate, so nothing it says after the candidate starts is
// believed: the harness checks every number itself. Its checks are a first line only; the
// sandbox is what makes escaping them useless.
const std::string& matmul_runner_script() {
  static const std::string script = R"PY(
import ast, builtins, importlib, os, sys, types

ALLOWED = [m for m in sys.argv[1].split(",") if m]
GUARD = sys.argv[2] == "guard"  # "bare": real builtins and imports (to test the sandbox alone)
# Builtins and names a matrix product has no use for, through which code reaches the
# interpreter, the file system or other modules.
FORBIDDEN_NAMES = {"eval", "exec", "compile", "open", "input", "breakpoint", "globals", "locals",
                   "vars", "getattr", "setattr", "delattr", "__import__", "__builtins__",
                   "__loader__", "__spec__", "importlib", "help", "exit", "quit"}

# The protocol keeps private copies of the pipes; the candidate's stdin is empty and its
# prints go to stderr, so they cannot corrupt a reply.
requests = os.fdopen(os.dup(0), "rb")
replies = os.fdopen(os.dup(1), "wb")
null = os.open("/dev/null", os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
os.dup2(2, 1)
sys.stdout = sys.stderr


def reply(*words):
    replies.write(" ".join(str(w) for w in words).encode() + b"\n")
    replies.flush()


def describe(error):
    try:
        text = str(error)
    except BaseException:
        text = "?"
    return (type(error).__name__ + ": " + " ".join(text.split()))[:300]


modules = {}
for name in ALLOWED:
    try:
        modules[name] = importlib.import_module(name)
    except ImportError:
        pass


def forbidden_uses(tree):
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update("import:" + a.name for a in node.names if a.name.split(".")[0] not in ALLOWED)
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").split(".")[0] not in ALLOWED:
                found.add("import:" + "." * node.level + (node.module or ""))
        elif isinstance(node, ast.Name):
            if node.id in FORBIDDEN_NAMES or (node.id.startswith("__") and node.id != "__name__"):
                found.add("name:" + node.id)
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            found.add("attribute:" + node.attr)  # private and dunder attributes: f.__globals__, random._os
    return sorted(found)


size = int(requests.readline())
source = requests.read(size).decode("utf-8", "replace")
try:
    tree = ast.parse(source)
except BaseException as error:  # SyntaxError, or a parser overwhelmed by nesting
    reply("static syntax", describe(error))
    sys.exit(0)
defines = any(isinstance(node, ast.FunctionDef) and node.name == "matmul" for node in tree.body)
reply("static", int(defines), *forbidden_uses(tree))
if requests.readline().strip() != b"run":
    sys.exit(0)

# Run time: the candidate's builtins lack the forbidden names, and its imports go through a
# guard that records every attempt outside the allow-list and hands out views of allowed
# modules: their public names only, without the modules they import (typing.sys, ...).
def public_view(module):
    view = types.ModuleType(module.__name__)
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        if isinstance(value, types.ModuleType):
            if not value.__name__.startswith(module.__name__ + "."):
                continue
            value = public_view(value)
        setattr(view, key, value)
    return view


views = {name: public_view(module) for name, module in modules.items()}
blocked = []


def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    parts = name.split(".")
    if level == 0 and parts[0] in views:
        view = views[parts[0]]
        if fromlist:
            for part in parts[1:]:
                view = vars(view).get(part)
                if view is None:
                    raise ImportError("no module named %r here" % name)
        return view
    blocked.append(name)
    raise ImportError("import of %r is not allowed" % name)


safe_builtins = {k: v for k, v in vars(builtins).items() if k not in FORBIDDEN_NAMES}
safe_builtins["__import__"] = guarded_import
namespace = {"__builtins__": safe_builtins, "__name__": "solution"} if GUARD else {"__name__": "solution"}
try:
    exec(compile(tree, "<solution>", "exec"), namespace)
    matmul = namespace.get("matmul")
    if not callable(matmul):
        raise TypeError("matmul is not defined as a function")
except BaseException as error:  # SystemExit too: nothing but end of input ends the runner
    reply("loaded error", len(blocked), describe(error))
    sys.exit(0)
reply("loaded ok", len(blocked))


def serialise(product, m, n):
    # Plain ints and floats only: a subclass or an object that compares equal to anything
    # is refused here, and the harness would refuse anything but numbers anyway.
    if type(product) not in (list, tuple) or len(product) != m:
        raise TypeError("the product is not a list of %d rows" % m)
    words = []
    for row in product:
        if type(row) not in (list, tuple) or len(row) != n:
            raise TypeError("a row of the product is not a list of %d numbers" % n)
        for x in row:
            if type(x) is not int and type(x) is not float:
                raise TypeError("an element of the product is a %s" % type(x).__name__)
            words.append(repr(x))
    return " ".join(words)


NUMBER = {b"int": int, b"float": float}
while True:
    header = requests.readline().split()
    if not header:
        break
    parse, m, k, n = NUMBER[header[0]], int(header[1]), int(header[2]), int(header[3])
    A = [list(map(parse, requests.readline().split())) for _ in range(m)]
    B = [list(map(parse, requests.readline().split())) for _ in range(k)]
    try:
        text = serialise(matmul(A, B), m, n)
    except BaseException as error:
        reply("error", len(blocked), describe(error))
        continue
    reply("ok", len(blocked), text)
)PY";
  return script;
}

}  // namespace ossrl
