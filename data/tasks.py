"""
Synthetic evaluation tasks, generated locally and deterministically from a seed (no downloads).

The paper judges RePo on noisy-context retrieval (RULER), structured data (tables, graphs) and
longer contexts. Each generator here renders one family as natural-language text sized to a
token budget with the model's tokenizer, and returns an Example whose answers are right by
construction. eval.py scores them by greedy generation; the same generators also write training
documents (prompt + target) for small-scale experiments, from a disjoint seed stream.

    noisy       niah_single, niah_multikey, niah_multivalue, niah_multiquery  (needle in a haystack,
                RULER-style: filler is generated natural text or distractor records), vt (variable
                tracking), cwe / fwe (common / frequent word extraction)          metric: recall
    structured  table_cell, table_row (markdown or CSV table lookups),
                graph_connectivity, graph_shortest_path (edge lists)              metric: exact_match

    python data/tasks.py niah_multikey 256     # print one example rendered to 256 byte tokens
"""
import random
import string
import sys
from collections import deque
from dataclasses import dataclass, field

ADJ = ("red blue green quiet loud small large ancient modern bright dark happy sad brave calm clever "
       "gentle proud silent swift warm cold heavy light rough smooth sharp soft young old rich").split()
NOUN = ("river mountain forest city garden window teacher farmer doctor child bird horse ship train "
        "castle island valley bridge market library kitchen letter song story engine planet candle "
        "lantern mirror pocket basket").split()
VERB = "watches follows finds carries paints visits remembers builds crosses opens guards greets".split()
PLACE = "near behind beside under above across beyond inside".split()
NAMES = ("Alice Bruno Chen Dara Elif Femi Gita Hugo Ines Jun Kofi Lena Milo Nadia Omar Priya Quinn Rosa "
         "Sami Tara Umar Vera Wen Xena Yusuf Zoe Arjun Bela Cyra Dmitri Emil Farah Goran Hana Ivo Jana "
         "Karim Lior Maya Nils Olga Pavel Rafael Sofia Tomas Uma Viktor Willa Yara Zaid").split()
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass
class Example:
    task: str
    prompt: str
    answers: list            # expected strings; right by construction
    metric: str              # "recall" (share of answers found in the output) or "exact_match"
    max_new_tokens: int
    target: str              # canonical completion, used for training documents
    needles: list = field(default_factory=list)  # (start, end) character spans of answer-bearing text


def _count(enc, text):
    return len(enc.encode_ordinary(text))


def _example(task, prompt, answers, metric, target, enc, needles=()):
    # room for the canonical answer plus a little slack for the model to finish its sentence
    return Example(task, prompt, list(answers), metric, _count(enc, target) + 4, target, list(needles))


def _fit(enc, make, length):
    """make(budget) renders an example whose body uses about `budget` tokens; shrink the budget
    until prompt + answer fit in `length` tokens. make must be deterministic given the budget."""
    budget = length
    while budget > 0:
        ex = make(budget)
        over = _count(enc, ex.prompt) + ex.max_new_tokens - length
        if over <= 0:
            return ex
        budget -= max(over, 4)
    raise ValueError(f"length {length} is too short to render task {ex.task!r} with tokenizer {enc.name!r}")


def _distinct(draw, n):
    out = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def _sentence(r):
    return (f"The {r.choice(ADJ)} {r.choice(NOUN)} {r.choice(VERB)} the {r.choice(ADJ)} "
            f"{r.choice(NOUN)} {r.choice(PLACE)} the {r.choice(NOUN)}.")


def _haystack(r, enc, budget, needles, filler):
    """Filler units with the needles inserted, in order, at random depths; <= budget tokens.
    Returns the text and the character span of each needle."""
    units, n = [], sum(_count(enc, " " + s) for s in needles)
    while True:
        u = filler()
        n += _count(enc, " " + u)
        if n > budget:
            break
        units.append(u)
    for i, slot in enumerate(sorted(r.randint(0, len(units)) for _ in needles)):
        units.insert(slot + i, None)  # placeholder, filled with needle i below
    text, spans, it = "", [], iter(needles)
    for u in units:
        text += " " if text else ""
        if u is None:
            u = next(it)
            spans.append((len(text), len(text) + len(u)))
        text += u
    return text, spans


# ----- noisy context ---------------------------------------------------------------------------

NIAH_INTRO = "Remember the magic numbers hidden in this text.\n"


def _needle(key, value):
    return f"The magic number for {key} is {value}."


def _niah(rng, enc, length, task, n_keys=1, n_values=1, n_query=1, distractors=False):
    keys = _distinct(lambda: f"{rng.choice(ADJ)}-{rng.choice(NOUN)}", n_keys)
    values = {k: _distinct(lambda: str(rng.randint(10000, 99999)), n_values) for k in keys}
    pairs = [(k, v) for k in keys for v in values[k]]
    asked = keys[:n_query]
    what = " and ".join((", ".join(asked[:-1]), asked[-1])) if n_query > 1 else asked[0]
    if n_query > 1 or n_values > 1:
        question = f"Question: What are all the magic numbers for {what}? Answer: The magic numbers for {what} are"
    else:
        question = f"Question: What is the magic number for {what}? Answer: The magic number for {what} is"
    answers = [v for k in asked for v in values[k]]
    sub = rng.getrandbits(64)

    def make(budget):
        r = random.Random(sub)

        def filler():  # distractor records with other keys, or generated natural text
            k = f"{r.choice(ADJ)}-{r.choice(NOUN)}"
            return _needle(k, r.randint(10000, 99999)) if distractors and k not in keys else _sentence(r)
        body, spans = _haystack(r, enc, budget - _count(enc, NIAH_INTRO + question), [_needle(k, v) for k, v in pairs], filler)
        off = len(NIAH_INTRO)
        needles = [(a + off, b + off) for (a, b), (k, _) in zip(spans, pairs) if k in asked]
        return _example(task, NIAH_INTRO + body + "\n" + question, answers, "recall",
                        " " + ", ".join(answers) + ".", enc, needles)
    return _fit(enc, make, length)






def _niah_drill(rng, enc, length, task):
    """Training only (data/task_mix.py): records of several keys among natural sentences, then one
    question per key in the niah tasks' own wording, answered in turn. Every answer is supervised,
    so a document teaches retrieval many times over, instead of once at its very end."""
    keys = _distinct(lambda: f"{rng.choice(ADJ)}-{rng.choice(NOUN)}", 3)
    values = {k: str(rng.randint(10000, 99999)) for k in keys}
    sub = rng.getrandbits(64)

    def make(budget):
        r = random.Random(sub)
        qa = "".join(f"\nQuestion: What is the magic number for {k}? Answer: The magic number for {k} is {values[k]}."
                     for k in r.sample(keys, len(keys)))
        body, _ = _haystack(r, enc, budget - _count(enc, NIAH_INTRO + qa), [_needle(k, values[k]) for k in keys],
                            lambda: _sentence(r))
        return _example(task, NIAH_INTRO + body + qa, [], "recall", "", enc)
    return _fit(enc, make, length)


def _vt(rng, enc, length, task, hops=4):
    names = _distinct(lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), hops + 1)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    intro = "Track the variable assignments hidden in this text.\n"
    question = (f"Question: Which variables are assigned the value {value}? "
                f"Answer: The variables assigned the value {value} are:")
    sub = rng.getrandbits(64)

    def make(budget):
        body, spans = _haystack(random.Random(sub), enc, budget - _count(enc, intro + question), chain, lambda: NOISE)
        return _example(task, intro + body + "\n" + question, names, "recall", " " + " ".join(names) + ".", enc,
                        [(a + len(intro), b + len(intro)) for a, b in spans])
    return _fit(enc, make, length)


def _word_counts(r, task, top, n_slots):
    """cwe: `top` words appear k times, the others k // 3 times (RULER: 30 vs 3).
    fwe: coded words with Zipf-like counts; the `top` asked words strictly lead."""
    if task == "cwe":
        pool = [f"{a}{b}" for a in ADJ for b in NOUN]
        r.shuffle(pool)
        k = max(3, n_slots // (3 * top))
        counts = {w: k for w in pool[:top]}
        rare_count = k // 3
    else:
        pool = _distinct(lambda: "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)), 300)
        base = max(2, n_slots // ((top + 1) * (top + 2)))
        counts = {w: base * (top + 1 - j) for j, w in enumerate(pool[:top])}  # > base * 2 - 1 ...
        rare_count = max(1, base // 2)                                        # ... > every rare word
    for w in pool[top:]:
        if sum(counts.values()) + rare_count > n_slots:
            break
        counts[w] = rare_count
    return counts


def _word_list_task(rng, enc, length, task, top):
    if task == "cwe":
        intro = "Here is a numbered list of words; some appear more often than others.\n"
        question = f"Question: What are the {top} most common words in the list? Answer: The {top} most common words are:"
    else:
        intro = "Here is a coded text; track how often each coded word appears.\n"
        question = (f"Question: What are the {top} most frequent coded words? "
                    f"Answer: The {top} most frequent coded words are:")
    sub = rng.getrandbits(64)

    def make(budget):
        r = random.Random(sub)
        per_word = _count(enc, " 99. abcdefgh")
        counts = _word_counts(r, task, top, max(3 * top + 2, (budget - _count(enc, intro + question)) // per_word))
        words = [w for w, c in counts.items() for _ in range(c)]
        r.shuffle(words)
        body = " ".join(f"{j + 1}. {w}" for j, w in enumerate(words))
        ranked = sorted(counts, key=lambda w: -counts[w])[:top]
        return _example(task, intro + body + "\n" + question, ranked, "recall", " " + " ".join(ranked) + ".", enc)
    return _fit(enc, make, length)




# ----- structured data ---------------------------------------------------------------------------

COLUMNS = ("age", "score", "height", "rank", "level", "points", "weight", "year")


def _render_table(fmt, cols, rows):
    if fmt == "markdown":
        lines = ["| name | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
        lines += ["| " + n + " | " + " | ".join(map(str, vals)) + " |" for n, vals in rows]
    else:
        lines = ["name," + ",".join(cols)] + [n + "," + ",".join(map(str, vals)) for n, vals in rows]
    return lines


def _table(rng, enc, length, task):
    sub = rng.getrandbits(64)

    def make(budget):
        r = random.Random(sub)
        cols, fmt, names = r.sample(COLUMNS, 4), r.choice(("markdown", "csv")), r.sample(NAMES, len(NAMES))
        # distinct values per column, so "who has the score 512?" has exactly one answer
        columns = [r.sample(range(10, 1000), len(names)) for _ in cols]
        n = 2
        while n < len(names) and _count(enc, "\n".join(_render_table(fmt, cols, [(names[i], [c[i] for c in columns])
                                                                                for i in range(n + 1)]))) <= budget - 40:
            n += 1
        rows = [(names[i], [c[i] for c in columns]) for i in range(n)]
        j, ci = r.randrange(n), r.randrange(len(cols))
        name, value = rows[j][0], str(rows[j][1][ci])
        if task == "table_cell":
            question, answer = f"Question: In the table above, what is the {cols[ci]} of {name}?\nAnswer:", value
        else:
            question, answer = f"Question: In the table above, who has the {cols[ci]} {value}?\nAnswer:", name
        lines = _render_table(fmt, cols, rows)
        intro = f"Here is a table in {fmt} format.\n"
        start = len(intro) + sum(len(x) + 1 for x in lines[:j + len(lines) - n])  # the asked row's line
        span = (start, start + len(lines[j + len(lines) - n]))
        return _example(task, intro + "\n".join(lines) + "\n" + question, [answer], "exact_match", " " + answer + "\n",
                        enc, [span])
    return _fit(enc, make, length)




def shortest_path_length(edges, a, b):
    """BFS distance in an undirected graph; None when b is unreachable from a."""
    adj = {}
    for u, v in edges:
        adj.setdefault(u, []).append(v)
        adj.setdefault(v, []).append(u)
    dist, todo = {a: 0}, deque([a])
    while todo:
        u = todo.popleft()
        for w in adj.get(u, ()):
            if w not in dist:
                dist[w] = dist[u] + 1
                todo.append(w)
    return dist.get(b)


def _graph(rng, enc, length, task):
    sub = rng.getrandbits(64)
    line = lambda u, v: f"Node {u} is connected to node {v}."

    def make(budget):
        r = random.Random(sub)
        n_edges = max(4, (budget - 40) // _count(enc, " " + line(10, 20)))
        n_nodes = max(4, (n_edges * 4) // 5)
        nodes = r.sample(range(max(10, 2 * n_nodes)), n_nodes)
        comps = (nodes[:n_nodes // 2], nodes[n_nodes // 2:])  # two components: a no-path answer exists
        edges = [(comp[r.randrange(i)], comp[i]) for comp in comps for i in range(1, len(comp))]  # random trees
        for _ in range(4 * n_edges):  # plus extra edges inside the components, for cycles
            if len(edges) >= n_edges:
                break
            u, v = r.sample(comps[r.randrange(2)], 2)
            if (u, v) not in edges and (v, u) not in edges:
                edges.append((u, v))
        r.shuffle(edges)
        own, other = (comps[0], comps[1]) if r.random() < 0.5 else (comps[1], comps[0])
        a = r.choice(own)
        if task == "graph_connectivity":  # half the questions have a path, half do not
            b = r.choice([x for x in own if x != a]) if r.random() < 0.5 else r.choice(other)
            question = f"Question: Is there a path between node {a} and node {b}? Answer yes or no.\nAnswer:"
            answer = "no" if shortest_path_length(edges, a, b) is None else "yes"
        else:
            b = r.choice([x for x in own if x != a])
            question = f"Question: What is the length of the shortest path from node {a} to node {b}?\nAnswer:"
            answer = str(shortest_path_length(edges, a, b))
        intro = "In an undirected graph, the edges are:\n"
        return _example(task, intro + " ".join(line(u, v) for u, v in edges) + "\n" + question, [answer], "exact_match",
                        " " + answer + "\n", enc)
    return _fit(enc, make, length)




# ----- the task table, generation and scoring --------------------------------------------------

TASKS = {  # name -> (dimension at the training length, generator(rng, enc, length, task) and its options)
    "niah_single": ("noisy", _niah, {}),
    "niah_multikey": ("noisy", _niah, dict(distractors=True)),
    "niah_multivalue": ("noisy", _niah, dict(n_values=4)),
    "niah_multiquery": ("noisy", _niah, dict(n_keys=4, n_query=4)),
    "vt": ("noisy", _vt, {}),
    "cwe": ("noisy", _word_list_task, dict(top=3)),
    "fwe": ("noisy", _word_list_task, dict(top=3)),
    "table_cell": ("structured", _table, {}),
    "table_row": ("structured", _table, {}),
    "graph_connectivity": ("structured", _graph, {}),
    "graph_shortest_path": ("structured", _graph, {}),
}
TRAINING_ONLY = {"niah_drill": (None, _niah_drill, {})}  # extra documents for data/task_mix.py, never scored


def generate(task, enc, length, n, seed=0, split="eval"):
    """n examples of `task` whose prompt + answer fit in `length` tokens. split="train" and
    split="eval" draw from disjoint seed streams, so training documents never repeat test items."""
    entry = TASKS.get(task) or (TRAINING_ONLY.get(task) if split == "train" else None)
    if entry is None:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    _, make, options = entry
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    _check_renders(enc, string.ascii_letters + string.digits + " .,:;|-?\n", task)
    out = []
    for i in range(n):
        ex = make(random.Random(f"{task}/{split}/{seed}/{i}"), enc, length, task, **options)
        _check_renders(enc, ex.prompt + ex.target, task)
        out.append(ex)
    return out


def _check_renders(enc, text, task):
    try:
        ok = enc.decode(enc.encode_ordinary(text)) == text
    except Exception:
        ok = False
    except BaseException as e:  # tiktoken panics (a BaseException) on bytes missing from its vocabulary
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        ok = False
    if not ok:
        raise ValueError(f"the tokenizer {enc.name!r} cannot render task {task!r} (its text does not round-trip)")


def normalize(text):
    return text.strip().split("\n")[0].strip().strip(".").strip().lower()


def score(ex: Example, output: str) -> float:
    """recall: share of the expected strings found in the output (RULER's string match);
    exact_match: the first line of the output, normalized, equals the answer."""
    if ex.metric == "recall":
        out = output.lower()
        return sum(a.lower() in out for a in ex.answers) / len(ex.answers)
    return float(normalize(output) == normalize(ex.answers[0]))


if __name__ == "__main__":
    import tiktoken
    task, length = (sys.argv[1] if len(sys.argv) > 1 else "niah_multikey"), int(sys.argv[2]) if len(sys.argv) > 2 else 256
    enc = tiktoken.Encoding(name="byte", pat_str=r"(?s:.)", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<|endoftext|>": 256})
    ex = generate(task, enc, length, 1)[0]
    print(ex.prompt, f"\n--- answers {ex.answers} ({ex.metric}); prompt {len(enc.encode_ordinary(ex.prompt))} tokens; "
          f"needle spans {ex.needles}")
