// ossrl: the command line, a thin shell over libossrl.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"ossrl: GRPO fine-tuning of gpt-oss"};
  app.require_subcommand(1);
  try {
    CLI11_PARSE(app, argc, argv);
  } catch (const ossrl::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
