"""Training pairs -> token ids with completion-only labels, the global-batch schedule, the loss.

Tokenization is ONE function, `prompt_ids`, used by training, validation, `ftcot eval` and the
server alike, so a student never sees at inference a prompt it was not trained on (a T5
tokenizer appends `</s>`, a Llama-style one prepends BOS: both are kept, everywhere).

Decoder-only: input = prompt ids + completion ids + EOS; labels = -100 on the prompt (and on
padding), the completion ids + EOS elsewhere, so the loss is on the completion only.
Encoder-decoder: input = prompt ids; labels = completion ids + EOS (the decoder is fed the
labels shifted right from `decoder_start_token_id`, which the model does itself).
Sequences over `train.max_length` are truncated (counted in the stats) or refused, per config.

A step is a GLOBAL batch of `train.batch_size` examples drawn from one stream of seeded epoch
permutations (`global_batch`); each worker takes its stride of it, micro-batch by micro-batch.
The loss of a step is the sum of the token losses over the whole batch divided by the batch's
label tokens (`token_loss`), so 2 workers x 8 is the same objective as 1 x 16, token for token.

The examples reach a worker as a Ray Dataset it streams (`ExampleWindow`): for the next window of
steps the worker computes which positions its share of those steps needs, streams the table in
its (fixed) order, and keeps just those rows; only two small columns of every example (its label
tokens and its task: 5 bytes) are held whole, because a step's token mean needs the whole global
batch's count. Memory per worker: one window, never the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

IGNORE = -100
TASKS = ("label", "rationale")  # distilling step-by-step's two tasks; single-task pairs count as "label"


@dataclass
class EncodeStats:
    examples: int = 0
    truncated_count: int = 0
    dropped_no_target: int = 0  # prompts that fill the whole limit leave nothing to learn
    max_seen_length: int = 0
    label_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Encoded:
    examples: list[dict] = field(default_factory=list)  # {"input_ids": [...], "labels": [...]}
    stats: EncodeStats = field(default_factory=EncodeStats)


# --------------------------------------------------------------------------- tokenization


def prompt_ids(tokenizer, text: str, family: str) -> list[int]:
    """The prompt's token ids, identical in training, validation, eval and serving.

    With the tokenizer's own special tokens (BOS for Llama-style tokenizers, `</s>` after a T5
    encoder input), as the pretrained model expects. A decoder-only prompt is continued by the
    completion, so an EOS the tokenizer would append to it is dropped.
    """
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if family == "decoder" and ids and ids[-1] == tokenizer.eos_token_id:
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not plain or plain[-1] != tokenizer.eos_token_id:
            ids = ids[:-1]
    return ids


def completion_ids(tokenizer, text: str) -> list[int]:
    """The completion's ids + EOS: the student learns to stop."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def split_pairs(rows: list[dict], path: Path | str) -> tuple[list[dict], list[dict]]:
    """(train, val) rows of a pair file; a clear error when nothing is left to train on."""
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    if not train:
        raise DataError(
            f"no curated rows left to train on in {path} ({len(rows)} rows, none with split 'train'): "
            "the teacher got too few answers right, or curate filtered them all; check the curate summary"
        )
    return train, val


def _where(row: dict) -> str:
    return f"sample_index={row.get('sample_index')} sample_idx={row.get('sample_idx')}"


def encode_pair(row: dict, tokenizer, family: str, max_length: int, on_overlength: str = "truncate",
                source: str = "pairs") -> tuple[dict | None, bool, int]:
    """(example or None when nothing is left to learn, whether it was over `max_length`, its full length)."""
    p = prompt_ids(tokenizer, row["prompt"], family)
    c = completion_ids(tokenizer, row["completion"])
    ex, over = _encode_seq2seq(p, c, max_length) if family == "encoder-decoder" else _encode_decoder(p, c, max_length)
    length = len(p) + len(c)
    if over and on_overlength == "refuse":
        raise DataError(
            f"{source}: {_where(row)} is {length} tokens, over train.max_length={max_length} "
            "(set train.on_overlength=truncate to cut it, or raise train.max_length)"
        )
    if ex is not None:
        ex["task"] = TASKS.index(row.get("task", "label"))  # step-by-step pairs say which task they are
    return ex, over, length


def encode_pairs(rows: list[dict], tokenizer, family: str, max_length: int, on_overlength: str = "truncate",
                 source: str = "pairs") -> Encoded:
    out = Encoded()
    for row in rows:
        ex, over, length = encode_pair(row, tokenizer, family, max_length, on_overlength, source)
        out.stats.max_seen_length = max(out.stats.max_seen_length, length)
        out.stats.truncated_count += over
        if ex is None:
            out.stats.dropped_no_target += 1
            continue
        out.examples.append(ex)
        out.stats.label_tokens += ex["label_tokens"]
    out.stats.examples = len(out.examples)
    return out


def encode_batch(rows: list[dict], tokenizer, family: str, max_length: int, on_overlength: str = "truncate",
                 source: str = "pairs", split: str = "train") -> list[dict]:
    """One Ray Data batch of pairs (those of `split`) -> examples with a `truncated` flag; pairs that
    leave nothing to learn are dropped (the stage counts them as rows in minus rows out)."""
    out = []
    for row in rows:
        if row["split"] != split:
            continue
        ex, over, _ = encode_pair(row, tokenizer, family, max_length, on_overlength, source)
        if ex is not None:
            out.append(ex | {"truncated": bool(over)})
    return out


def _encode_decoder(p: list[int], c: list[int], max_length: int) -> tuple[dict | None, bool]:
    ids = list(p) + c
    labels = [IGNORE] * len(p) + c
    over = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]  # the paper truncates inputs and labels alike
    # The label of position t is predicted from position t-1: the first position predicts nothing.
    n = sum(1 for t in labels[1:] if t != IGNORE)
    if n == 0:
        return None, over
    return {"input_ids": ids, "labels": labels, "label_tokens": n}, over


def _encode_seq2seq(p: list[int], c: list[int], max_length: int) -> tuple[dict | None, bool]:
    over = len(p) > max_length or len(c) > max_length
    labels = c[:max_length]
    return {"input_ids": list(p)[:max_length], "labels": labels, "label_tokens": len(labels)}, over


def collate(batch: list[dict], pad_id: int, family: str) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples; padding is masked from attention and from the loss."""
    n = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), n), dtype=torch.long)
    m = n if family == "decoder" else max(len(ex["labels"]) for ex in batch)
    labels = torch.full((len(batch), m), IGNORE, dtype=torch.long)
    for i, ex in enumerate(batch):
        k = len(ex["input_ids"])
        input_ids[i, :k] = torch.tensor(ex["input_ids"])
        attention[i, :k] = 1
        labels[i, : len(ex["labels"])] = torch.tensor(ex["labels"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batch_tokens(batch: dict[str, torch.Tensor], family: str) -> int:
    """Real (non-pad) tokens a step processes: inputs, plus decoder labels for encoder-decoders."""
    n = int(batch["attention_mask"].sum())
    if family == "encoder-decoder":
        n += int((batch["labels"] != IGNORE).sum())
    return n


# --------------------------------------------------------------------------- the schedule and the loss


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return max(1, -(-n_examples // batch_size))


def global_batch(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step` (0-based): the next `batch_size` of an endless
    stream of seeded epoch permutations. The same for every worker count, and resumable at any step."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_examples)
        perm = epoch_permutation(n_examples, seed, epoch)
        take = min(batch_size - len(out), n_examples - offset)
        out.extend(int(i) for i in perm[offset:offset + take])
        pos += take
    return out


@lru_cache(maxsize=4)
def epoch_permutation(n_examples: int, seed: int, epoch: int):
    """Epoch `epoch`'s order of the examples (kept for the next steps: at a million examples it costs 15 ms)."""
    return np.random.RandomState((seed, epoch)).permutation(n_examples)


def micro_batches(indices: list[int], rank: int, world: int, accum: int) -> list[list[int]]:
    """This worker's `accum` micro-batches of a global batch (a stride: together, every index once)."""
    mine = indices[rank::world]
    size = -(-len(mine) // accum)
    return [mine[i * size:(i + 1) * size] for i in range(accum)]


def token_losses(model, batch: dict, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a micro-batch: (summed cross-entropy over its label tokens, their count); -100 ignored."""
    labels = batch["labels"]
    if family == "encoder-decoder":
        logits = model(**batch).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=IGNORE, reduction="none").view(labels.shape)
    return ce.sum(dim=1), (labels != IGNORE).sum(dim=1)


def token_loss(model, batch: dict, family: str) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the label tokens, their count) for one micro-batch."""
    sums, counts = token_losses(model, batch, family)
    return sums.sum(), int(counts.sum())


def row_weights(examples: list[dict], indices: list[int], rationale_weight: float | None = None) -> dict[int, float]:
    """The weight of each example's summed token loss in the step's objective.

    One task: 1 / (label tokens of the whole global batch), i.e. the step's token mean, however the
    batch is split over workers. Distilling step-by-step (`rationale_weight` = lambda): the label
    task's token mean + lambda x the rationale task's token mean, each over the global batch.
    """
    if rationale_weight is None:
        total = sum(examples[i]["label_tokens"] for i in indices)
        return {i: 1.0 / total for i in indices}
    counts = [sum(examples[i]["label_tokens"] for i in indices if examples[i]["task"] == t) for t in range(len(TASKS))]
    scale = (1.0, rationale_weight)
    return {i: scale[examples[i]["task"]] / counts[examples[i]["task"]] for i in indices}


# --------------------------------------------------------------------------- streaming the examples to a worker


class ExampleWindow:
    """A worker's examples for a window of steps, gathered from a stream of the whole table.

    `stream()` yields the table's batches (dicts of columns) in one fixed order, the same on every
    worker, so a row's running position is its index. `label_tokens` and `task` hold those two
    columns for every example (what `row_weights` needs of the whole global batch). Each window
    covers as many steps as fit `max_rows` of this worker's examples; a new window streams again.
    """

    def __init__(self, stream, label_tokens, task, *, batch_size: int, seed: int, rank: int, world: int, accum: int,
                 max_rows: int = 65536):
        self.stream, self.label_tokens, self.task = stream, label_tokens, task
        self.n = len(label_tokens)
        self.batch_size, self.seed, self.rank, self.world, self.accum = batch_size, seed, rank, world, accum
        self.steps_per_window = max(1, max_rows // max(1, -(-batch_size // world)))
        self.start = self.end = 0
        self.rows: dict[int, dict] = {}

    def __getitem__(self, i: int) -> dict:
        """label_tokens and task of any example (what `row_weights` needs of the whole global batch)."""
        return {"label_tokens": int(self.label_tokens[i]), "task": int(self.task[i])}

    def micro_batches(self, step: int) -> tuple[list[int], list[list[dict]]]:
        """(the global batch's indices, this worker's micro-batches of examples) for optimizer step `step`."""
        if not self.start <= step < self.end:
            self.load(step)
        indices = global_batch(self.n, self.batch_size, step, self.seed)
        return indices, [[self.rows[i] | {"index": i} for i in mb]
                         for mb in micro_batches(indices, self.rank, self.world, self.accum)]

    def load(self, step: int) -> None:
        """Stream the table once and keep the rows this worker's steps [step, step + window) use."""
        import numpy as np

        self.start, self.end = step, step + self.steps_per_window
        needed = np.zeros(self.n, dtype=bool)
        for s in range(self.start, self.end):
            for mb in micro_batches(global_batch(self.n, self.batch_size, s, self.seed), self.rank, self.world, self.accum):
                needed[mb] = True
        last = int(np.flatnonzero(needed).max()) if needed.any() else -1
        self.rows = {}
        pos = 0
        for batch in self.stream():
            k = len(batch["label_tokens"])
            for j in np.flatnonzero(needed[pos:pos + k]):
                self.rows[pos + int(j)] = {"input_ids": np.asarray(batch["input_ids"][j]).tolist(),
                                           "labels": np.asarray(batch["labels"][j]).tolist(),
                                           "label_tokens": int(batch["label_tokens"][j]), "task": int(batch["task"][j])}
            pos += k
            if pos > last:
                break
        if pos < min(self.n, last + 1):
            raise RuntimeError(f"the examples stream ended at row {pos} of {self.n}: the table changed under training")
