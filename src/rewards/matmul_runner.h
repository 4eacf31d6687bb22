// The Python program that runs inside the sandbox and drives one matmul solution.
//
// Protocol (one line per message; the harness trusts nothing that arrives after the
// candidate's code has started, and parses results as plain numbers only):
//   harness -> runner   "<n>\n" then n bytes of source
//   runner  -> harness  "static syntax <message>"                 the source does not parse
//                       "static <defines matmul 0|1> <forbidden uses...>"   written before
//                       any candidate code runs, so it can be trusted
//   harness -> runner   "run\n"
//   runner  -> harness  "loaded ok <blocked imports>" | "loaded error <blocked imports> <message>"
//   harness -> runner   "int|float m k n\n", m rows of A, k rows of B (space-separated)
//   runner  -> harness  "ok <blocked imports> <m*n numbers>" | "error <blocked imports> <message>"
// argv[1] is the comma-separated allow-list of modules; argv[2] "guard" runs the candidate
// with the import guard and reduced builtins, "bare" without (to test the sandbox alone).
#pragma once

#include <string>

namespace ossrl {

const std::string& matmul_runner_script();

}  // namespace ossrl
