// ossrl: the command line, a thin shell over libossrl.
#include <fmt/format.h>

#include <exception>
#include <map>

#include "cli/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"ossrl: reinforcement learning (GRPO) for gpt-oss"};
  app.require_subcommand(1);
  std::map<std::string, ossrl::cli::Command> commands = {
      {"generate", ossrl::cli::add_generate(app)},
      {"score", ossrl::cli::add_score(app)},
      {"demo", ossrl::cli::add_demo(app)},
      {"grad", ossrl::cli::add_grad(app)},
      {"train", ossrl::cli::add_train(app)},
      {"plot", ossrl::cli::add_plot(app)},
      {"reward", ossrl::cli::add_reward(app)},
  };
#if OSSRL_HAVE_CUDA
  commands.emplace("bench", ossrl::cli::add_bench(app));
#endif
  CLI11_PARSE(app, argc, argv);
  try {
    for (const CLI::App* sub : app.get_subcommands()) commands.at(sub->get_name())();
  } catch (const ossrl::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    fmt::print(stderr, "error: out of memory\n");
    return 1;
  }
  return 0;
}
