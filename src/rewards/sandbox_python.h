// The system Python as a sandbox language: which host files a fresh interpreter needs (so
// the sandbox shows it those and nothing else) and the command line that starts it.
//
// Another language is another such description: an interpreter or compiler path, the
// files it needs read-only, and its argv. The sandbox itself knows nothing of Python.
#pragma once

#include <string>
#include <vector>

#include "rewards/sandbox.h"

namespace ossrl {

struct PythonRuntime {
  std::string executable;              // as given ("/usr/bin/python3"); symlinks are reproduced
  std::vector<std::string> read_only;  // the executable, its ELF interpreter, the standard
                                       // library, and the shared libraries it loaded
};

// Asks `python` (run once, outside the sandbox, on a fixed script) where its standard
// library is and which shared libraries it maps after importing `modules`. Only those
// libraries are made visible: site-packages/dist-packages are not, and neither is libffi
// unless a module in `modules` loaded it (so ctypes cannot load BLAS or libc's functions).
// Cached per (python, modules). Throws ossrl::Error if python cannot be run.
const PythonRuntime& python_runtime(const std::string& python, const std::vector<std::string>& modules);

// A sandbox spec running `python -I -S -B -c script args...`: isolated mode (no user site,
// no PYTHON* variables, no current directory on sys.path), no site module, no .pyc writes.
SandboxSpec python_sandbox_spec(const PythonRuntime& runtime, const std::string& script,
                                const std::vector<std::string>& args, const SandboxLimits& limits);

}  // namespace ossrl
