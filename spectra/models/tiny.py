"""The embedded tiny-world model: its tokenizer, architecture, reproducible training, and assets.

``spectra train-tiny`` (or ``python -m spectra.models.tiny``) regenerates everything under
``spectra/assets/tiny/``: the word-level tokenizer, a 6-layer ``LlamaForCausalLM`` (gate/up/down
FFN as in Llama 3) stored in fp16, and the world files (CounterFact- and zsRE-format edit sets,
general-task test items, attribute snippets, the training corpus used for key statistics).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spectra.data import tiny_world
from spectra.data.tiny_world import TinyWorld
from spectra.progress import stderr_progress

SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}

#: File names of the world inside the tiny model's directory.
WORLD_FILES = {
    "counterfact": "counterfact.json",
    "zsre": "zsre.json",
    "general": "general_tasks.json",
    "snippets": "attribute_snippets.json",
    "corpus": "corpus.txt",
    "heldout_text": "heldout_text.txt",
    "report": "training_report.json",
}


@dataclass(frozen=True)
class TinyTrainConfig:
    """Everything that determines the trained tiny model (two runs with one config give equal weights)."""

    seed: int = 0
    world_seed: int = 0
    hidden_size: int = 192
    intermediate_size: int = 768
    layers: int = 6
    heads: int = 4
    max_positions: int = 128
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    threads: int = 2


def build_tokenizer(corpus: list[str]) -> object:
    """A word-level tokenizer over the corpus words that prepends BOS, wrapped for transformers.

    Word level keeps every object a single token; the BOS makes it behave like Llama's tokenizer,
    so the BOS-aware code paths are exercised by the embedded model too.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in corpus for w in line.split()})
    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")]
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    # Punctuation splits off as its own token, as in real tokenizers: MEMIT's context templates
    # ("<sampled text>. {prompt}") then stay in the vocabulary instead of turning "day." into <unk>.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    bos = SPECIAL_TOKENS["bos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


def build_model(config: TinyTrainConfig, tokenizer: object) -> torch.nn.Module:
    """A randomly initialised Llama-architecture causal LM of the configured size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    return LlamaForCausalLM(model_config)


def _encode_corpus(tokenizer: object, corpus: list[str]) -> list[list[int]]:
    """Each corpus line as token ids without BOS/EOS (documents add them)."""
    return [ids[1:] for ids in tokenizer(corpus)["input_ids"]]


def _documents(lines: list[list[int]], tokenizer: object, rng: random.Random, max_sentences: int = 3) -> list[list[int]]:
    """Lines joined into documents of 1..max_sentences sentences: BOS, the sentences, EOS.

    Real prompts put a fact after other text (MEMIT's context templates, CounterFact's paraphrase
    prompts); a model trained on one sentence per sequence cannot recall anything that is not at
    its start, so training sequences mix lone sentences with short runs of unrelated ones.
    """
    order = list(range(len(lines)))
    rng.shuffle(order)
    documents: list[list[int]] = []
    while order:
        take = [order.pop() for _ in range(min(len(order), rng.randint(1, max_sentences)))]
        documents.append([tokenizer.bos_token_id] + [t for i in take for t in lines[i]] + [tokenizer.eos_token_id])
    return documents


def _epoch_batches(lengths: list[int], batch_size: int, rng: random.Random, pool: int = 32) -> list[list[int]]:
    """One epoch of shuffled batches of similar-length sequences (less padding, same examples).

    Documents run from one short fact to three task examples; batching them at random pads most
    rows to the longest. Sorting within pools of ``pool`` batches and shuffling the batches keeps
    the order random at the scale of an epoch while cutting the padded positions. A pool's last
    partial batch is dropped, unless the whole corpus is smaller than one batch.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if len(order) < batch_size:
        return [order]
    batches: list[list[int]] = []
    for start in range(0, len(order), batch_size * pool):
        chunk = sorted(order[start : start + batch_size * pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size))
    rng.shuffle(batches)
    return batches


def _learning_rate(config: TinyTrainConfig, step: int) -> float:
    """Linear warm-up then cosine decay to 10 % of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(config: TinyTrainConfig, world: TinyWorld, tokenizer: object, progress: bool = True) -> tuple[torch.nn.Module, list[dict]]:
    """Train the tiny model on the world's corpus with ``config.threads`` threads (restored after)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _optimize(config, world, tokenizer, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _optimize(config: TinyTrainConfig, world: TinyWorld, tokenizer: object, progress: bool) -> tuple[torch.nn.Module, list[dict]]:
    """The training loop: AdamW, warm-up + cosine schedule, length-bucketed batches of documents."""
    # Denormal floats (tiny gradients and Adam moments late in training) slow CPU kernels by
    # orders of magnitude; flushing them to zero changes nothing measurable in the result.
    torch.set_flush_denormal(True)
    model = build_model(config, tokenizer)
    model.train()
    lines = _encode_corpus(tokenizer, world.corpus)
    rng = random.Random(config.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(0.9, 0.98),
    )
    sequences: list[list[int]] = []
    queue: list[list[int]] = []
    log: list[dict] = []
    started = time.time()
    pad = tokenizer.pad_token_id
    with stderr_progress(disable=not progress) as bar:
        task = bar.add_task("training the tiny model", total=config.steps)
        for step in range(config.steps):
            if not queue:
                sequences = _documents(lines, tokenizer, rng)
                queue = _epoch_batches([len(d) for d in sequences], config.batch_size, rng)
            batch_rows = [sequences[i] for i in queue.pop()]
            width = max(len(r) for r in batch_rows)
            ids = torch.full((len(batch_rows), width), pad, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(batch_rows):
                ids[i, : len(row)] = torch.tensor(row)
                labels[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == config.steps - 1:
                log.append({"step": step, "loss": float(loss.detach()), "seconds": round(time.time() - started, 1)})
                bar.update(task, description=f"training the tiny model (loss {float(loss.detach()):.3f})")
            bar.advance(task)
    model.eval()
    return model, log


@torch.no_grad()
def next_token_recall(model: torch.nn.Module, tokenizer: object, pairs: list[tuple[str, str]], batch_size: int = 256) -> float:
    """Share of (prompt, answer) pairs whose answer's first token is the model's top-1 next token."""
    from spectra.models.tokens import continuation_ids, pad_right

    hits = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        split = [continuation_ids(tokenizer, prompt, answer) for prompt, answer in chunk]
        batch = pad_right([prefix for prefix, _ in split], tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        last = logits[torch.arange(len(chunk)), torch.tensor(batch.lengths) - 1]
        predicted = last.argmax(-1).tolist()
        hits += sum(int(p == target[0]) for p, (_, target) in zip(predicted, split))
    return hits / len(pairs)


def write_world_files(world: TinyWorld, directory: Path) -> None:
    """Write the edit sets, general-task test items, snippets, corpus and held-out text next to the model."""
    directory.mkdir(parents=True, exist_ok=True)
    general = [
        {"task": item.task, "prompt": item.prompt, "choices": list(item.choices), "gold": item.gold}
        for items in world.task_test.values() for item in items
    ]
    payloads = {
        WORLD_FILES["counterfact"]: tiny_world.counterfact_records(world),
        WORLD_FILES["zsre"]: tiny_world.zsre_records(world),
        WORLD_FILES["general"]: general,
        WORLD_FILES["snippets"]: tiny_world.attribute_snippets(world),
    }
    for name, payload in payloads.items():
        (directory / name).write_text(json.dumps(payload, indent=1))
    (directory / WORLD_FILES["corpus"]).write_text("\n".join(world.corpus) + "\n")
    (directory / WORLD_FILES["heldout_text"]).write_text("\n".join(world.heldout_text) + "\n")


def build_and_save(config: TinyTrainConfig, directory: Path, progress: bool = True) -> dict:
    """Generate the world, train, save model (fp16 safetensors) + tokenizer + world files, report recall."""
    started = time.time()
    world = tiny_world.build_world(seed=config.world_seed)
    tokenizer = build_tokenizer(world.corpus)
    model, log = train(config, world, tokenizer, progress=progress)
    trained_pairs, heldout_pairs = tiny_world.recall_prompts(world)
    report = {
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.time() - started, 1),
        "recall_trained_phrasing": next_token_recall(model, tokenizer, trained_pairs),
        "recall_heldout_phrasing": next_token_recall(model, tokenizer, heldout_pairs),
        "loss_log": log,
    }
    directory.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    write_world_files(world, directory)
    (directory / WORLD_FILES["report"]).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "assets" / "tiny"
    summary = build_and_save(TinyTrainConfig(), target)
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_log"}, indent=1))
