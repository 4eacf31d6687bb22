// The subcommands of `ossrl`. Each registers its options on the app and returns the
// function that runs it once the command line has been parsed.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

namespace ossrl::cli {

using Command = std::function<void()>;

Command add_generate(CLI::App& app);
Command add_score(CLI::App& app);
Command add_demo(CLI::App& app);
Command add_grad(CLI::App& app);
Command add_train(CLI::App& app);
Command add_plot(CLI::App& app);
Command add_reward(CLI::App& app);
// `bench generate` and `bench train`; registered only in CUDA builds.
Command add_bench(CLI::App& app);
// `bench train` under the `bench` command (cli/bench_train.cpp).
Command add_bench_train(CLI::App& bench);

}  // namespace ossrl::cli
