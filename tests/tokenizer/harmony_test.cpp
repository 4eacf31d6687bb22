// Harmony rendering and parsing. Golden strings are copied from openai/harmony (v0.0.8):
// its test-data/*.txt fixtures (built by src/tests.rs and tests/test_harmony.py from the
// conversations rebuilt here) and the examples in docs/format.md. Each test names its source.
#include "tokenizer/harmony.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "core/error.h"

namespace ossrl::harmony {
namespace {

using nlohmann::ordered_json;

Message user(std::string content) { return {.role = Role::User, .content = std::move(content)}; }

Message assistant(std::string channel, std::string content) {
  return {.role = Role::Assistant, .channel = std::move(channel), .content = std::move(content)};
}

RenderOptions plain() { return {.mode = RenderMode::Plain}; }

// ---- rendering: system and developer messages ----

// test-data/test_reasoning_system_message_with_dates.txt
TEST(HarmonyRender, SystemWithEffortAndDate) {
  Conversation conversation{
      .system = SystemContent{.knowledge_cutoff = "2021-01",
                              .current_date = "2021-01-01",
                              .reasoning_effort = ReasoningEffort::Medium,
                              .valid_channels = {"analysis", "final"}},
      .messages = {user("What is 42 * pi?")}};
  EXPECT_EQ(render_text(conversation),
            "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            "Knowledge cutoff: 2021-01\n"
            "Current date: 2021-01-01\n"
            "\n"
            "Reasoning: medium\n"
            "\n"
            "# Valid channels: analysis, final. Channel must be included for every message.<|end|>"
            "<|start|>user<|message|>What is 42 * pi?<|end|><|start|>assistant");
}

// test-data/test_no_tools.txt: the system message alone, with a date.
TEST(HarmonyRender, SystemDefaults) {
  Conversation conversation{.system = SystemContent{.current_date = "2025-06-28"}};
  EXPECT_EQ(render_text(conversation),
            "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            "Knowledge cutoff: 2024-06\n"
            "Current date: 2025-06-28\n"
            "\n"
            "Reasoning: medium\n"
            "\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message."
            "<|end|><|start|>assistant");
}

// test-data/test_simple_convo.txt: what `ossrl generate --prompt` renders.
TEST(HarmonyRender, PromptFromUserText) {
  EXPECT_EQ(render_text(conversation_from_prompt("What is 2 + 2?", ReasoningEffort::Medium)),
            "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            "Knowledge cutoff: 2024-06\n"
            "\n"
            "Reasoning: medium\n"
            "\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message."
            "<|end|><|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant");
}

// test-data/test_simple_convo_{low,medium,high}_effort.txt
TEST(HarmonyRender, DeveloperInstructionsAtEachEffort) {
  for (ReasoningEffort effort : {ReasoningEffort::Low, ReasoningEffort::Medium, ReasoningEffort::High}) {
    Conversation conversation{
        .system = SystemContent{.reasoning_effort = effort},
        .developer = DeveloperContent{.instructions = "Answer the user's questions like a robot."},
        .messages = {user("What is the capital of the largest country in the world?")}};
    EXPECT_EQ(render_text(conversation),
              "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
              "Knowledge cutoff: 2024-06\n"
              "\n"
              "Reasoning: " +
                  std::string(effort_name(effort)) +
                  "\n"
                  "\n"
                  "# Valid channels: analysis, commentary, final. Channel must be included for every "
                  "message.<|end|><|start|>developer<|message|># Instructions\n"
                  "\n"
                  "Answer the user's questions like a robot.<|end|>"
                  "<|start|>user<|message|>What is the capital of the largest country in the world?<|end|>"
                  "<|start|>assistant")
        << effort_name(effort);
  }
}

// test-data/test_render_functions_with_parameters.txt: a tool without parameters, two with
// plain schemas, and one exercising titles, examples, nullable, enums, defaults and oneOf.
TEST(HarmonyRender, DeveloperWithFunctionTools) {
  std::vector<ToolDescription> tools = {
      {.name = "get_location", .description = "Gets the location of the user."},
      {.name = "get_current_weather",
       .description = "Gets the current weather in the provided location.",
       .parameters = ordered_json::parse(R"({
         "type": "object",
         "properties": {
           "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
           "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}
         },
         "required": ["location"]})")},
      {.name = "get_multiple_weathers",
       .description = "Gets the current weather in the provided list of locations.",
       .parameters = ordered_json::parse(R"({
         "type": "object",
         "properties": {
           "locations": {"type": "array", "items": {"type": "string"},
                         "description": "List of city and state, e.g. [\"San Francisco, CA\", \"New York, NY\"]"},
           "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}
         },
         "required": ["locations"]})")},
      {.name = "kitchensink",
       .description = "A function with various complex schemas.",
       .parameters = ordered_json::parse(R"({
         "description": "params object",
         "type": "object",
         "properties": {
           "string": {"type": "string", "title": "STRING", "description": "A string", "examples": ["hello", "world"]},
           "string_nullable": {"type": "string", "nullable": true, "description": "A nullable string",
                               "default": "the default"},
           "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
           "oneof_string_or_number": {
             "oneOf": [{"type": "string", "default": "default_string_in_oneof"},
                       {"type": "number", "description": "numbers can happen too"}],
             "description": "a oneof",
             "default": 20}
         }})")},
  };
  Conversation conversation{
      .system = SystemContent{.current_date = "2025-06-28", .reasoning_effort = ReasoningEffort::High},
      .developer = DeveloperContent{.instructions = "Always respond in riddles", .tools = tools},
      .messages = {user("What is the weather like in SF?")}};
  EXPECT_EQ(render_text(conversation), R"(<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-06-28

Reasoning: high

# Valid channels: analysis, commentary, final. Channel must be included for every message.
Calls to these tools must go to the commentary channel: 'functions'.<|end|><|start|>developer<|message|># Instructions

Always respond in riddles

# Tools

## functions

namespace functions {

// Gets the location of the user.
type get_location = () => any;

// Gets the current weather in the provided location.
type get_current_weather = (_: {
// The city and state, e.g. San Francisco, CA
location: string,
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

// Gets the current weather in the provided list of locations.
type get_multiple_weathers = (_: {
// List of city and state, e.g. ["San Francisco, CA", "New York, NY"]
locations: string[],
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

// A function with various complex schemas.
type kitchensink = (_: // params object
{
// STRING
//
// A string
// Examples:
// - "hello"
// - "world"
string?: string,
// A nullable string
string_nullable?: string | null, // default: "the default"
string_enum?: "a" | "b" | "c",
// a oneof
// default: 20
oneof_string_or_number?:
 | string // default: "default_string_in_oneof"
 | number // numbers can happen too
,
}) => any;

} // namespace functions<|end|><|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant)");
}

// ---- rendering: conversations ----

const std::vector<Message> kTwoTurns = {
    user("What is 2 + 2?"),
    assistant("analysis", "User asks a simple question: \"What is 2 + 2?\" The answer: 4."),
    assistant("final", "2 + 2 equals 4."),
    user("What about 9 / 2?"),
};

// test-data/test_dropping_cot_by_default.txt: the answered turn's analysis is left out.
TEST(HarmonyRender, EarlierAnalysisDropped) {
  EXPECT_EQ(render_text({.messages = kTwoTurns}),
            "<|start|>user<|message|>What is 2 + 2?<|end|>"
            "<|start|>assistant<|channel|>final<|message|>2 + 2 equals 4.<|end|>"
            "<|start|>user<|message|>What about 9 / 2?<|end|><|start|>assistant");
}

// test-data/test_preserve_cot.txt: the same with auto_drop_analysis off.
TEST(HarmonyRender, AnalysisKeptOnRequest) {
  EXPECT_EQ(render_text({.messages = kTwoTurns}, {.drop_analysis = false}),
            "<|start|>user<|message|>What is 2 + 2?<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>User asks a simple question: \"What is 2 + 2?\" "
            "The answer: 4.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>2 + 2 equals 4.<|end|>"
            "<|start|>user<|message|>What about 9 / 2?<|end|><|start|>assistant");
}

// test-data/test_keep_analysis_between_finals.txt (tests/test_harmony.py): only analysis
// before the first final answer goes; the last turn's stays.
TEST(HarmonyRender, LastTurnAnalysisKept) {
  Conversation conversation{.messages = {user("What is 2 + 2?"), assistant("analysis", "thinking 2+2"),
                                         assistant("final", "4"), user("What is 3 + 5?"),
                                         assistant("analysis", "thinking 3+5"), assistant("final", "8")}};
  EXPECT_EQ(render_text(conversation, plain()),
            "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant<|channel|>final<|message|>4<|end|>"
            "<|start|>user<|message|>What is 3 + 5?<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>thinking 3+5<|end|>"
            "<|start|>assistant<|channel|>final<|message|>8<|end|>");
}

// Where this renderer and harmony's code part ways (see RenderOptions::drop_analysis): every
// answered turn loses its analysis, the turn being trained on keeps it, and so does a turn
// still calling tools.
TEST(HarmonyRender, OnlyAnsweredTurnsLoseAnalysis) {
  Conversation three_turns{.messages = {user("1?"), assistant("analysis", "a1"), assistant("final", "1"),
                                        user("2?"), assistant("analysis", "a2"), assistant("final", "2"),
                                        user("3?"), assistant("analysis", "a3"), assistant("final", "3")}};
  EXPECT_EQ(render_text(three_turns, {.mode = RenderMode::Training}),
            "<|start|>user<|message|>1?<|end|><|start|>assistant<|channel|>final<|message|>1<|end|>"
            "<|start|>user<|message|>2?<|end|><|start|>assistant<|channel|>final<|message|>2<|end|>"
            "<|start|>user<|message|>3?<|end|><|start|>assistant<|channel|>analysis<|message|>a3<|end|>"
            "<|start|>assistant<|channel|>final<|message|>3<|return|>");
  Conversation calling{.messages = {user("1?"), assistant("analysis", "a1"), assistant("final", "1"),
                                    user("2?"), assistant("analysis", "a2"),
                                    {.role = Role::Assistant, .channel = "commentary", .recipient = "functions.f",
                                     .content = "{}"}}};
  EXPECT_EQ(render_text(calling, plain()),
            "<|start|>user<|message|>1?<|end|><|start|>assistant<|channel|>final<|message|>1<|end|>"
            "<|start|>user<|message|>2?<|end|><|start|>assistant<|channel|>analysis<|message|>a2<|end|>"
            "<|start|>assistant to=functions.f<|channel|>commentary<|message|>{}<|call|>");
}

// tests/test_harmony.py test_render_conversation_for_training_*: a last final message ends in
// <|return|>, anything else renders as plain.
TEST(HarmonyRender, TrainingEndsFinalWithReturn) {
  Conversation answered{.messages = {user("hi"), assistant("final", "hello")}};
  EXPECT_EQ(render_text(answered, {.mode = RenderMode::Training}),
            "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>hello<|return|>");
  Conversation unanswered{.messages = {user("hi")}};
  EXPECT_EQ(render_text(unanswered, {.mode = RenderMode::Training}), render_text(unanswered, plain()));
}

// test-data/test_does_not_drop_if_ongoing_analysis.txt: harmony puts the recipient before
// the channel; the call ends in <|call|>; a tool result without channel or recipient; the
// turn does not end on final, so its analysis stays.
TEST(HarmonyRender, ToolCallAndResult) {
  Conversation conversation{
      .messages = {user("What is the weather in SF?"),
                   assistant("analysis", "User asks: \u201cWhat is the weather in SF?\u201d We need to use "
                                         "lookup_weather tool."),
                   {.role = Role::Assistant,
                    .channel = "commentary",
                    .recipient = "functions.lookup_weather",
                    .content_type = "<|constrain|>json",
                    .content = R"({"location": "San Francisco"})"},
                   {.role = Role::Tool,
                    .name = "functions.lookup_weather",
                    .content = R"({"temperature": 20, "description": "sunny"})"}}};
  EXPECT_EQ(render_text(conversation),
            "<|start|>user<|message|>What is the weather in SF?<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>User asks: \u201cWhat is the weather in SF?\u201d "
            "We need to use lookup_weather tool.<|end|>"
            "<|start|>assistant to=functions.lookup_weather<|channel|>commentary <|constrain|>json<|message|>"
            R"({"location": "San Francisco"})"
            "<|call|>"
            "<|start|>functions.lookup_weather<|message|>"
            R"({"temperature": 20, "description": "sunny"})"
            "<|end|><|start|>assistant");
}

// docs/format.md "Handling tool calls": a tool result addressed to the assistant on
// commentary, which is what a JSON "tool" message becomes.
TEST(HarmonyRender, ToolResultFromJson) {
  Conversation conversation = conversation_from_json(
      nlohmann::json::parse(R"([{"role": "tool", "name": "functions.get_weather",
                                  "content": "{\"sunny\": true, \"temperature\": 20}"}])"),
      ReasoningEffort::Medium);
  conversation.system.reset();
  EXPECT_EQ(render_text(conversation, plain()),
            "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
            R"({"sunny": true, "temperature": 20})"
            "<|end|>");
}

TEST(HarmonyRender, ToolMessageNeedsName) {
  Conversation conversation{.messages = {{.role = Role::Tool, .content = "{}"}}};
  EXPECT_THROW(render_text(conversation), Error);
}

// ---- conversations from JSON ----

TEST(HarmonyJson, MessagesAndInstructions) {
  Conversation conversation = conversation_from_json(nlohmann::json::parse(R"([
      {"role": "system", "content": "Answer the user's questions like a robot."},
      {"role": "user", "content": "What is 2 + 2?"},
      {"role": "assistant", "content": "4"},
      {"role": "user", "content": "And 3 + 5?"}])"),
                                                     ReasoningEffort::Low);
  ASSERT_TRUE(conversation.system);
  EXPECT_EQ(conversation.system->reasoning_effort, ReasoningEffort::Low);
  ASSERT_TRUE(conversation.developer);
  EXPECT_EQ(conversation.developer->instructions, "Answer the user's questions like a robot.");
  ASSERT_EQ(conversation.messages.size(), 3u);
  EXPECT_EQ(conversation.messages[1].role, Role::Assistant);
  EXPECT_EQ(conversation.messages[1].channel, "final");  // assistant messages default to final
  EXPECT_EQ(conversation.messages[2].content, "And 3 + 5?");
}

TEST(HarmonyJson, ErrorsNameTheMessage) {
  auto error_of = [](const char* text) -> std::string {
    try {
      conversation_from_json(nlohmann::json::parse(text), ReasoningEffort::Medium);
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_EQ(error_of(R"({"role": "user"})"), "a conversation must be a JSON list of messages, not object");
  EXPECT_EQ(error_of(R"([{"role": "user", "content": "a"}, {"role": "user"}])"), "message 1: \"content\" is missing");
  EXPECT_EQ(error_of(R"([{"role": "robot", "content": "a"}])"),
            "message 0: unknown role 'robot' (expected system, developer, user, assistant or tool)");
  EXPECT_EQ(error_of(R"([{"role": "user", "content": 3}])"), "message 0: \"content\" must be a string, not number");
  EXPECT_EQ(error_of(R"([{"role": "tool", "content": "{}"}])"),
            "message 0: a tool message needs \"name\" (e.g. \"functions.get_weather\")");
  EXPECT_EQ(error_of(R"([3])"), "message 0: expected an object with \"role\" and \"content\", got number");
}

TEST(HarmonyJson, ReasoningEffortNames) {
  EXPECT_EQ(parse_effort("high"), ReasoningEffort::High);
  EXPECT_THROW(parse_effort("max"), Error);
}

// ---- parsing (text) ----

// docs/format.md "Example output": analysis, then the final answer and <|return|>.
TEST(HarmonyParse, AnalysisThenFinal) {
  ParsedCompletion parsed = parse_completion_text(
      "<|channel|>analysis<|message|>User asks: \"What is 2 + 2?\" Simple arithmetic. Provide answer.<|end|>"
      "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>");
  EXPECT_TRUE(parsed.well_formed) << parsed.problem;
  EXPECT_EQ(parsed.stop, StopReason::Return);
  ASSERT_EQ(parsed.messages.size(), 2u);
  EXPECT_EQ(parsed.messages[0].role, Role::Assistant);
  EXPECT_EQ(parsed.messages[0].channel, "analysis");
  EXPECT_EQ(parsed.messages[0].content, "User asks: \"What is 2 + 2?\" Simple arithmetic. Provide answer.");
  EXPECT_EQ(parsed.messages[1].channel, "final");
  EXPECT_EQ(parsed.final_answer, "2 + 2 = 4.");
}

// docs/format.md "Receiving tool calls", and the two header orders of harmony's
// test_tool_call_with_* tests (recipient before or after the channel, <|constrain|> adjacent).
TEST(HarmonyParse, ToolCall) {
  for (const char* header : {"<|channel|>commentary to=functions.get_weather <|constrain|>json",
                             "<|channel|>commentary to=functions.get_weather<|constrain|>json",
                             " to=functions.get_weather<|channel|>commentary<|constrain|>json"}) {
    ParsedCompletion parsed = parse_completion_text(
        std::string("<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant") +
        header + R"(<|message|>{"location":"San Francisco"}<|call|>)");
    EXPECT_TRUE(parsed.well_formed) << header << ": " << parsed.problem;
    EXPECT_EQ(parsed.stop, StopReason::Call);
    EXPECT_FALSE(parsed.final_answer);
    ASSERT_EQ(parsed.messages.size(), 2u);
    const Message& call = parsed.messages[1];
    EXPECT_EQ(call.channel, "commentary");
    EXPECT_EQ(call.recipient, "functions.get_weather");
    EXPECT_EQ(call.content_type, "<|constrain|>json");
    EXPECT_EQ(call.content, R"({"location":"San Francisco"})");
  }
}

// One row per way a completion can go wrong: what is kept, how it stopped, what is reported.
TEST(HarmonyParse, Malformed) {
  struct Case {
    const char* text;
    size_t messages;
    std::optional<std::string> final_answer;
    StopReason stop;
    const char* problem;
  };
  const Case cases[] = {
      {"", 0, std::nullopt, StopReason::Truncated, "empty completion"},
      {"<|channel|>analysis<|message|>Let me th", 1, std::nullopt, StopReason::Truncated,
       "the last message is never closed"},
      {"<|channel|>final<|message|>4", 1, "4", StopReason::Truncated, "the last message is never closed"},
      {"<|channel|>analysis<|message|>hm<|end|>", 1, std::nullopt, StopReason::Truncated,
       "the completion ends without <|return|> or <|call|>"},
      {"<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|chan", 1, std::nullopt, StopReason::Truncated,
       "the completion ends inside a message header"},
      {"just some words", 0, std::nullopt, StopReason::Truncated, "the completion ends inside a message header"},
      {"<|channel|>final<|message|>4<|endoftext|>2<|return|>", 1, "42", StopReason::Return,
       "stray <|endoftext|> in message content"},
      {"<|channel|>final<|message|>4<|reserved_200013|><|return|>", 1, "4", StopReason::Return,
       "stray <|reserved_200013|> in message content"},
      {"<|channel|>final<|message|>4<|return|><|start|>assistant<|channel|>final<|message|>5<|return|>", 1, "4",
       StopReason::Return, "<|start|> after <|return|>"},
      {"<|channel|>final<|message|>4<|return|>trailing", 1, "4", StopReason::Return, "text 'trailing' after <|return|>"},
      {"<|channel|>thoughts<|message|>hm<|end|>", 1, std::nullopt, StopReason::Truncated, "unknown channel 'thoughts'"},
      {"<|message|>4<|return|>", 1, std::nullopt, StopReason::Return, "a message without a channel"},
      // harmony's test_missing_message_token_requires_non_strict_mode: the header words
      // become the content.
      {"<|channel|>final Hello<|return|>", 1, "Hello", StopReason::Return,
       "a message header ended by <|return|> without <|message|>"},
      {"<|channel|>analysis<|message|>done<|return|>", 1, std::nullopt, StopReason::Return,
       "<|return|> ends a message on channel 'analysis', not 'final'"},
      {"<|channel|>commentary<|message|>{}<|call|>", 1, std::nullopt, StopReason::Call,
       "<|call|> ends a message that has no recipient"},
      {"<|channel|>analysis<|message|>a<|start|>assistant<|channel|>final<|message|>b<|return|>", 2, "b",
       StopReason::Return, "<|start|> before the message was closed"},
      {"<|channel|>analysis<|message|>a<|end|>oops<|start|>assistant<|channel|>final<|message|>b<|return|>", 2, "b",
       StopReason::Return, "text 'oops' between messages, where <|start|> belongs"},
      {"<|channel|>analysis<|message|>a<|end|><|start|>user<|channel|>final<|message|>b<|return|>", 2, "b",
       StopReason::Return, "a message from 'user', not from the assistant"},
      {"<|channel|>final json xml<|message|>4<|return|>", 1, "4", StopReason::Return,
       "unexpected 'xml' in a message header"},
  };
  for (const Case& c : cases) {
    ParsedCompletion parsed = parse_completion_text(c.text);
    EXPECT_FALSE(parsed.well_formed) << c.text;
    EXPECT_EQ(parsed.problem, c.problem) << c.text;
    EXPECT_EQ(parsed.messages.size(), c.messages) << c.text;
    EXPECT_EQ(parsed.final_answer, c.final_answer) << c.text;
    EXPECT_EQ(parsed.stop, c.stop) << c.text;
  }
}

TEST(HarmonyParse, InvalidUtf8BecomesReplacementCharacter) {
  ParsedCompletion parsed = parse_completion_text("<|channel|>final<|message|>caf\xC3<|return|>");
  EXPECT_TRUE(parsed.well_formed) << parsed.problem;
  EXPECT_EQ(parsed.final_answer, "caf\xEF\xBF\xBD");
}

// "<|" that names no token is ordinary text.
TEST(HarmonyParse, AngleBarsInContent) {
  ParsedCompletion parsed = parse_completion_text("<|channel|>final<|message|>a <|b|> <|c<|return|>");
  EXPECT_TRUE(parsed.well_formed) << parsed.problem;
  EXPECT_EQ(parsed.final_answer, "a <|b|> <|c");
}

// Render assistant messages for training, then parse them back as the model's completion.
TEST(HarmonyParse, RoundTrip) {
  std::vector<Message> reply = {
      assistant("analysis", "Need the weather."),
      {.role = Role::Assistant,
       .channel = "commentary",
       .recipient = "functions.get_weather",
       .content_type = "<|constrain|>json",
       .content = R"({"city": "Paris"})"},
  };
  const std::string prompt_end = "<|start|>assistant";
  for (bool tool_call : {true, false}) {
    if (!tool_call) reply.back() = assistant("final", "It is sunny.\nEnjoy!");
    std::string text = render_text({.messages = reply}, {.mode = RenderMode::Training});
    ASSERT_TRUE(text.starts_with(prompt_end));
    ParsedCompletion parsed = parse_completion_text(std::string_view(text).substr(prompt_end.size()));
    EXPECT_TRUE(parsed.well_formed) << parsed.problem;
    EXPECT_EQ(parsed.stop, tool_call ? StopReason::Call : StopReason::Return);
    ASSERT_EQ(parsed.messages.size(), reply.size());
    for (size_t i = 0; i < reply.size(); ++i) {
      EXPECT_EQ(parsed.messages[i].role, reply[i].role);
      EXPECT_EQ(parsed.messages[i].channel, reply[i].channel);
      EXPECT_EQ(parsed.messages[i].recipient, reply[i].recipient);
      EXPECT_EQ(parsed.messages[i].content_type, reply[i].content_type);
      EXPECT_EQ(parsed.messages[i].content, reply[i].content);
    }
  }
}

// ---- tokens (need the tokenizer data) ----

std::shared_ptr<const Tokenizer> load_tokenizer() {
  if (!std::filesystem::exists(Tokenizer::default_path())) return nullptr;
  return Tokenizer::load();
}

#define REQUIRE_TOKENIZER(tokenizer)                                                        \
  auto tokenizer = load_tokenizer();                                                        \
  if (!tokenizer) GTEST_SKIP() << "no tokenizer data at " << Tokenizer::default_path()      \
                               << " (scripts/setup.sh writes it)"

// harmony's own tests compare the rendered tokens with the fixture text encoded with
// special tokens allowed: each text run encoded alone must give the same tokens.
TEST(HarmonyTokens, RenderMatchesEncodedText) {
  REQUIRE_TOKENIZER(tokenizer);
  std::vector<Conversation> conversations = {
      conversation_from_prompt("What is 2 + 2?", ReasoningEffort::High),
      {.messages = {user("What is the weather in SF?"),
                    {.role = Role::Assistant,
                     .channel = "commentary",
                     .recipient = "functions.lookup_weather",
                     .content_type = "<|constrain|>json",
                     .content = R"({"location": "San Francisco"})"},
                    {.role = Role::Tool,
                     .name = "functions.lookup_weather",
                     .channel = "commentary",
                     .recipient = "assistant",
                     .content = R"({"temperature": 20})"}}},
  };
  for (const Conversation& conversation : conversations) {
    std::string text = render_text(conversation);
    EXPECT_EQ(render_conversation(*tokenizer, conversation), tokenizer->encode(text, SpecialTokens::All)) << text;
  }
}

// docs/format.md (StreamableParser example): the tokens of an analysis message and a final
// answer, as gpt-oss generates them after `<|start|>assistant`.
TEST(HarmonyTokens, ParseGeneratedTokens) {
  REQUIRE_TOKENIZER(tokenizer);
  const std::vector<TokenId> tokens = {200005, 35644, 200008, 1844,  31064, 25,    392,    4827,   382,
                                       220,    17,    659,    220,   17,    16842, 12295,  81645,  13,
                                       51441,  6052,  13,     200007, 200006, 173781, 200005, 17196, 200008,
                                       17,     659,   220,    17,    314,   220,   19,     13,     200002};
  ParsedCompletion parsed = parse_completion(*tokenizer, tokens);
  EXPECT_TRUE(parsed.well_formed) << parsed.problem;
  EXPECT_EQ(parsed.stop, StopReason::Return);
  ASSERT_EQ(parsed.messages.size(), 2u);
  EXPECT_EQ(parsed.messages[0].content, "User asks: \"What is 2 + 2?\" Simple arithmetic. Provide answer.");
  EXPECT_EQ(parsed.final_answer, "2 + 2 = 4.");
}

// harmony src/tests.rs test_simple_tool_call: recipient and a bare content type after the
// channel; the tokens stop before <|call|>, so the completion is truncated.
TEST(HarmonyTokens, ParseTruncatedToolCall) {
  REQUIRE_TOKENIZER(tokenizer);
  const std::vector<TokenId> tokens = {200005, 35644, 200008, 1844,   31064, 25,     392,    4827,  382,
                                       290,    11122, 306,    40510,  16842, 1416,   1309,   316,   1199,
                                       37342,  170154, 4584,  13,     200007, 200006, 173781, 200005, 35644,
                                       316,    28,    29712,  170154, 3490,  200008, 10848,  7693,  1243,
                                       392,    173844, 18583};
  ParsedCompletion parsed = parse_completion(*tokenizer, tokens);
  EXPECT_FALSE(parsed.well_formed);
  EXPECT_EQ(parsed.stop, StopReason::Truncated);
  ASSERT_EQ(parsed.messages.size(), 2u);
  EXPECT_EQ(parsed.messages[0].content, "User asks: \"What is the weather in Tokyo?\" We need to use lookup_weather tool.");
  EXPECT_EQ(parsed.messages[1].channel, "analysis");
  EXPECT_EQ(parsed.messages[1].recipient, "lookup_weather");
  EXPECT_EQ(parsed.messages[1].content_type, "code");
  EXPECT_EQ(parsed.messages[1].content, R"({"location": "Tokyo"})");
}

TEST(HarmonyTokens, GarbageTokensNeverThrow) {
  REQUIRE_TOKENIZER(tokenizer);
  const std::vector<TokenId> tokens = {-5, 200008, 999999999, 200002, 200006, 200006, 17, 201087, 200012, 0};
  ParsedCompletion parsed;
  EXPECT_NO_THROW(parsed = parse_completion(*tokenizer, tokens));
  EXPECT_FALSE(parsed.well_formed);
  EXPECT_EQ(parsed.problem, "token id -5 is outside the vocabulary");
}

TEST(HarmonyTokens, RoundTrip) {
  REQUIRE_TOKENIZER(tokenizer);
  Conversation reply{.messages = {assistant("analysis", "Two plus two."), assistant("final", "4 \u2014 four.")}};
  std::vector<TokenId> tokens = render_conversation(*tokenizer, reply, {.mode = RenderMode::Training});
  ASSERT_GE(tokens.size(), 2u);
  ASSERT_EQ(tokens[0], harmony_tokens::kStart);
  // Drop `<|start|>assistant`: the end of the prompt, not part of the completion.
  std::vector<TokenId> prompt_end = tokenizer->encode("assistant");
  ParsedCompletion parsed =
      parse_completion(*tokenizer, std::span(tokens).subspan(1 + prompt_end.size()));
  EXPECT_TRUE(parsed.well_formed) << parsed.problem;
  ASSERT_EQ(parsed.messages.size(), 2u);
  EXPECT_EQ(parsed.messages[0].content, "Two plus two.");
  EXPECT_EQ(parsed.final_answer, "4 \u2014 four.");
}

}  // namespace
}  // namespace ossrl::harmony
